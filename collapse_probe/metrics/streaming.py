"""Streaming accumulators: feed maps block by block and batch by batch; memory is bounded by one batch.

Each accumulator keeps sums (float64) and counts, so feeding a dataset in any batch split gives the same numbers as one
big batch, and two accumulators (e.g. from two ranks) combine with ``merge`` or an all-reduce of ``state()``.

    acc = CrossLayerAccumulator(num_blocks=12, threshold=0.9)
    for images in loader:
        for l, attn in enumerate(maps_of(images)):   # [B, H, N, N] each, blocks in any order
            acc.add(l, attn)
        acc.end_batch()                               # folds the batch in and frees its maps
    S, R = acc.similarity(), acc.ratio()              # [L, L]
"""
from __future__ import annotations

import torch

from . import functional as MF


class _Sums:
    """Named float64 sum tensors that merge by addition (and all-reduce as a flat vector)."""

    _names: tuple[str, ...] = ()

    def state(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._names}

    def merge(self, other: _Sums) -> None:
        for n in self._names:
            setattr(self, n, getattr(self, n) + getattr(other, n).to(getattr(self, n)))

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for n in self._names:
            setattr(self, n, state[n].to(torch.float64).cpu())


class CrossLayerAccumulator(_Sums):
    """S[p, q] (mean column cosine) and R[p, q] (fraction above ``threshold``) over every pair of ``num_blocks`` blocks.

    Within a batch, each block's map is stored with unit columns in a [B*H*N, L, N] buffer (``storage_dtype`` may be
    float16/bfloat16 to halve it); ``end_batch`` turns the buffer into all L x L cosines with one batched matmul per
    chunk, so cost is one pass over the stored maps instead of one per block pair.
    """

    _names = ("sum_cos", "above", "count")

    def __init__(self, num_blocks: int, threshold: float = 0.9, storage_dtype: torch.dtype = torch.float32,
                 chunk_rows: int = 16384) -> None:
        self.L, self.threshold, self.storage_dtype, self.chunk_rows = num_blocks, threshold, storage_dtype, chunk_rows
        self.sum_cos = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
        self.above = torch.zeros_like(self.sum_cos)
        self.count = torch.zeros_like(self.sum_cos)  # number of (b, h, t) seen by each pair
        self._buf: torch.Tensor | None = None
        self._filled: list[bool] = [False] * num_blocks

    def add(self, block: int, attn: torch.Tensor) -> None:
        """Block ``block``'s maps for the current batch, [B, H, N, N]."""
        B, H, N, N2 = attn.shape
        if N != N2:
            raise ValueError(f"attention maps must be square, got {tuple(attn.shape)}")
        if self._buf is None:
            self._buf = torch.zeros(B * H * N, self.L, N, dtype=self.storage_dtype, device=attn.device)
        elif self._buf.shape[0] != B * H * N or self._buf.shape[2] != N:
            raise ValueError(f"block {block} has maps {tuple(attn.shape)}, unlike the batch's earlier blocks")
        cols = MF.normalize_columns(attn.float()).transpose(-1, -2).reshape(B * H * N, N)  # rows = (b, h, t)
        self._buf[:, block] = cols.to(self.storage_dtype)
        self._filled[block] = True

    def end_batch(self) -> None:
        if self._buf is None:
            return
        idx = torch.tensor([i for i, f in enumerate(self._filled) if f])
        buf = self._buf[:, idx] if len(idx) < self.L else self._buf
        sum_cos = torch.zeros(len(idx), len(idx), dtype=torch.float64, device=buf.device)
        above = torch.zeros_like(sum_cos)
        for start in range(0, buf.shape[0], self.chunk_rows):
            x = buf[start:start + self.chunk_rows].float()
            gram = torch.bmm(x, x.transpose(1, 2))  # [rows, L, L]
            sum_cos += gram.sum(0, dtype=torch.float64)
            above += (gram > self.threshold).sum(0, dtype=torch.float64)
        grid = idx[:, None], idx[None, :]
        self.sum_cos[grid] += sum_cos.cpu()
        self.above[grid] += above.cpu()
        self.count[grid] += buf.shape[0]
        self._buf, self._filled = None, [False] * self.L

    def similarity(self) -> torch.Tensor:
        """[L, L] mean column cosine (NaN for pairs never seen together)."""
        return self.sum_cos / self.count

    def ratio(self) -> torch.Tensor:
        """[L, L] fraction of column cosines above the threshold."""
        return self.above / self.count


class CrossHeadAccumulator(_Sums):
    """Mean H x H column-cosine matrix between the heads of each block (Fig. 3c)."""

    _names = ("sum_hh", "count")

    def __init__(self, num_blocks: int, num_heads: int) -> None:
        self.sum_hh = torch.zeros(num_blocks, num_heads, num_heads, dtype=torch.float64)
        self.count = torch.zeros(num_blocks, dtype=torch.float64)

    def add(self, block: int, attn: torch.Tensor) -> None:
        B, H, N, _ = attn.shape
        self.sum_hh[block] += MF.head_similarity_matrix(attn).cpu() * (B * N)
        self.count[block] += B * N

    def matrices(self) -> torch.Tensor:
        """[L, H, H] mean head-to-head similarity."""
        return self.sum_hh / self.count[:, None, None]

    def mean(self) -> torch.Tensor:
        """[L] mean similarity between different heads."""
        return torch.tensor([MF.mean_off_diagonal(m) for m in self.matrices()], dtype=torch.float64)


class RankAccumulator(_Sums):
    """Effective rank and 99%-energy rank per block, averaged over images and heads.

    SVDs cost more than the forward pass for large N; ``max_images`` caps how many images (per block) enter the
    average, the first ones seen.
    """

    _names = ("sum_erank", "sum_energy", "count")

    def __init__(self, num_blocks: int, energy: float = 0.99, max_images: int | None = None) -> None:
        self.energy, self.max_images = energy, max_images
        self.sum_erank = torch.zeros(num_blocks, dtype=torch.float64)
        self.sum_energy = torch.zeros_like(self.sum_erank)
        self.count = torch.zeros_like(self.sum_erank)  # number of (b, h) maps
        self._images = [0] * num_blocks

    def add(self, block: int, attn: torch.Tensor) -> None:
        if self.max_images is not None:
            take = max(0, min(attn.shape[0], self.max_images - self._images[block]))
            attn = attn[:take]
        if attn.shape[0] == 0:
            return
        self._images[block] += attn.shape[0]
        erank, energy = MF.singular_value_ranks(attn, self.energy)
        self.sum_erank[block] += erank.sum(dtype=torch.float64).cpu()
        self.sum_energy[block] += energy.sum(dtype=torch.float64).cpu()
        self.count[block] += erank.numel()

    def effective_rank(self) -> torch.Tensor:
        return self.sum_erank / self.count

    def energy_rank(self) -> torch.Tensor:
        return self.sum_energy / self.count


class FeatureAccumulator(_Sums):
    """Token-feature cosine between block outputs (Fig. 4) as [L, L], plus Dong et al.'s residual ratio per block."""

    _names = ("sum_cos", "count", "sum_resid", "images")

    def __init__(self, num_blocks: int) -> None:
        self.L = num_blocks
        self.sum_cos = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
        self.count = torch.zeros_like(self.sum_cos)
        self.sum_resid = torch.zeros(num_blocks, dtype=torch.float64)
        self.images = torch.zeros_like(self.sum_resid)
        self._batch: dict[int, torch.Tensor] = {}

    def add(self, block: int, feats: torch.Tensor) -> None:
        """Block output [B, N, C]."""
        self._batch[block] = torch.nn.functional.normalize(feats.float(), dim=-1, eps=MF.EPS).reshape(-1)
        self.sum_resid[block] += MF.residual_norm_ratio(feats).sum(dtype=torch.float64).cpu()
        self.images[block] += feats.shape[0]
        self._tokens = feats.shape[0] * feats.shape[1]

    def end_batch(self) -> None:
        if not self._batch:
            return
        idx = sorted(self._batch)
        x = torch.stack([self._batch[i] for i in idx])  # [L', B*N*C]
        grid = torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]
        self.sum_cos[grid] += (x @ x.T).double().cpu()
        self.count[grid] += self._tokens
        self._batch = {}

    def similarity(self) -> torch.Tensor:
        return self.sum_cos / self.count

    def residual(self) -> torch.Tensor:
        return self.sum_resid / self.images

