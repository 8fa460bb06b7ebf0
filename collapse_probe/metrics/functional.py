"""Pure tensor functions for attention collapse. No hooks, no state; every function documents its shapes.

Notation (DeepViT, Sec. 3): A^l[b, h, i, j] is block l's map, rows i = queries (each sums to 1), columns j = keys.
The column cosine between blocks p and q (the paper's M^{p,q}_{h,t}) is

    c^{p,q}[b, h, t] = <A^p[b,h,:,t], A^q[b,h,:,t]> / (|A^p[b,h,:,t]| |A^q[b,h,:,t]|)

A zero column has no direction; its cosine with anything is defined as 0.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

EPS = 1e-12


def normalize_columns(attn: torch.Tensor) -> torch.Tensor:
    """[..., N, N] -> same shape with every column (over the query axis) scaled to unit length (zero stays zero)."""
    return F.normalize(attn, dim=-2, eps=EPS)


def column_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c^{p,q}: [B, H, N, N] x 2 -> [B, H, N] (one cosine per batch item, head and key token t)."""
    return (normalize_columns(a) * normalize_columns(b)).sum(dim=-2)


def cross_layer_similarity(maps: torch.Tensor, threshold: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """All block pairs at once. maps [L, B, H, N, N] -> (S, R), both [L, L] float64.

    S[p, q] = mean over (b, h, t) of c^{p,q}; R[p, q] = fraction of (b, h, t) with c^{p,q} > threshold.
    """
    L = maps.shape[0]
    cols = normalize_columns(maps.float()).transpose(-1, -2)  # [L, B, H, t, i]
    x = cols.permute(1, 2, 3, 0, 4).reshape(-1, L, maps.shape[-2])  # [(B H t), L, i]
    gram = torch.bmm(x, x.transpose(1, 2))  # [(B H t), L, L] = every c^{p,q}
    return gram.mean(0, dtype=torch.float64), (gram > threshold).double().mean(0)


def neighbor_similarity(sim: torch.Tensor, k: int = 1) -> torch.Tensor:
    """[L, L] -> [L]: entry l is the mean of sim[l, l-1], ..., sim[l, l-k]; NaN for the first k blocks."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    L = sim.shape[0]
    out = torch.full((L,), math.nan, dtype=torch.float64)
    for blk in range(k, L):
        out[blk] = sim[blk, blk - k:blk].double().mean()
    return out


def blocks_above(values: Sequence[float], threshold: float, blocks: Sequence[int] | None = None) -> list[int]:
    """The one "similar block" rule: blocks whose value (similarity with earlier blocks) exceeds ``threshold``.

    ``values[i]`` belongs to ``blocks[i]`` (default 0, 1, ...); NaN (no earlier block to compare with) never counts.
    """
    blocks = range(len(values)) if blocks is None else blocks
    return [b for b, v in zip(blocks, values) if not math.isnan(float(v)) and float(v) > threshold]


def collapse_onset(values: Sequence[float], threshold: float, blocks: Sequence[int] | None = None) -> int | None:
    """The first block from which every later block is similar (the paper's "after block 17"), or None when the last
    block is not similar. A block with nothing to compare with (the first) cannot be the onset."""
    blocks = list(range(len(values)) if blocks is None else blocks)
    similar = set(blocks_above(values, threshold, blocks))
    onset = None
    for b in reversed(blocks):
        if b not in similar:
            break
        onset = b
    return onset


def similar_indices(sim: torch.Tensor, threshold: float = 0.9, k: int = 1) -> list[int]:
    """0-based module indices l >= k whose mean similarity with the previous k blocks exceeds ``threshold``."""
    return blocks_above(neighbor_similarity(sim, k).tolist(), threshold)


def similar_blocks(sim: torch.Tensor, threshold: float = 0.9, k: int = 1) -> list[int]:
    """The same blocks as 1-based block numbers (block 1 = module 0), as every report prints them."""
    return [i + 1 for i in similar_indices(sim, threshold, k)]


def head_similarity_matrix(attn: torch.Tensor) -> torch.Tensor:
    """[B, H, N, N] -> [H, H] float64: mean over (b, t) of the column cosine between heads h and g of one block."""
    B, H, N, _ = attn.shape
    cols = normalize_columns(attn.float()).permute(0, 3, 1, 2).reshape(B * N, H, N)  # [(b t), h, i]
    return torch.bmm(cols, cols.transpose(1, 2)).mean(0, dtype=torch.float64)


def mean_off_diagonal(mat: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (cross-head similarity of one block, Fig. 3c)."""
    H = mat.shape[0]
    if H < 2:
        return math.nan
    return float((mat.sum() - mat.diagonal().sum()) / (H * (H - 1)))


def cross_head_similarity(attn: torch.Tensor) -> float:
    """[B, H, N, N] -> mean column cosine between different heads of one block."""
    return mean_off_diagonal(head_similarity_matrix(attn))


@contextlib.contextmanager
def _single_thread(active: bool = True) -> Iterator[int]:
    """Run the body with one intra-op thread; yields how many threads there were. MKL's threaded SVD of many small
    (~200 x 200) matrices is 10-40x slower than the sequential one when the cores are shared (measured 89-388 vs
    7-10 ms per 197 x 197 map on the 2-core dev box; benchmarks/README.md)."""
    n = torch.get_num_threads()
    if not active or n == 1:
        yield n
        return
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


_POOL: ThreadPoolExecutor | None = None


def _svdvals(x: torch.Tensor) -> torch.Tensor:
    """Singular values of [..., N, N]; on the CPU one sequential SVD per thread, the maps split over the threads
    (1.9x faster than one thread on 2 cores, identical values)."""
    global _POOL
    if x.device.type != "cpu":
        return torch.linalg.svdvals(x)
    with _single_thread() as n:
        flat = x.reshape(-1, *x.shape[-2:])
        if n == 1 or flat.shape[0] < 2 * n:
            return torch.linalg.svdvals(x)
        if _POOL is None or _POOL._max_workers != n:
            _POOL = ThreadPoolExecutor(n, thread_name_prefix="svd")
        parts = list(_POOL.map(torch.linalg.svdvals, flat.chunk(n)))  # svdvals releases the GIL
        return torch.cat(parts).reshape(*x.shape[:-1])


def singular_value_ranks(attn: torch.Tensor, energy: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, N] -> (effective rank, energy rank), both [...].

    Effective rank (Roy & Vetterli 2007): exp of the entropy of sigma / sum(sigma). Energy rank: the number of
    singular values needed for ``energy`` of sum(sigma^2). Uniform attention (all rows equal) has rank 1 in both.
    """
    s = _svdvals(attn.float())
    p = s / s.sum(-1, keepdim=True).clamp_min(EPS)
    entropy = -(p * torch.log(p.clamp_min(EPS))).sum(-1)
    e = s.square()
    frac = e.cumsum(-1) / e.sum(-1, keepdim=True).clamp_min(EPS)
    # count of singular values strictly needed: first index where the cumulative fraction reaches ``energy``, plus 1;
    # a small tolerance keeps exactly-rank-k inputs from being pushed to k+1 by float rounding
    energy_rank = (frac < energy - 1e-6).sum(-1) + 1
    return entropy.exp(), energy_rank.to(entropy.dtype)


def token_feature_similarity(features: torch.Tensor) -> torch.Tensor:
    """Block outputs [L, B, N, C] -> [L, L] float64: mean over (b, n) of the cosine of token n between blocks."""
    L = features.shape[0]
    x = F.normalize(features.float(), dim=-1, eps=EPS).reshape(L, -1)
    n = features.shape[1] * features.shape[2]
    return (x @ x.T).double() / n


def residual_norm_ratio(features: torch.Tensor) -> torch.Tensor:
    """Rank-collapse measure of Dong et al. (2021): [..., N, C] -> [...] |X - 1 mean(X)|_F / |X|_F (0 = rank one)."""
    x = features.float()
    res = x - x.mean(dim=-2, keepdim=True)
    return res.flatten(-2).norm(dim=-1) / x.flatten(-2).norm(dim=-1).clamp_min(EPS)
