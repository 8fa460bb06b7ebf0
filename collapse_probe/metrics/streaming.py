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

import math

import torch

from . import functional as MF
from .sums import ImageSums, _Sums


class CrossLayerAccumulator(_Sums):
    """S[p, q] (mean column cosine) and R[p, q] (fraction above ``threshold``) over every pair of ``num_blocks`` blocks.

    Within a batch, each block's map is stored with unit columns in a [B*H*N, L, N] buffer (``storage_dtype`` may be
    float16/bfloat16 to halve it); ``end_batch`` turns the buffer into all L x L cosines with one batched matmul per
    chunk of rows, so cost is one pass over the stored maps instead of one per block pair, and frees the buffer.

    Why not fold each pair in as its block arrives: block L needs the columns of every earlier block anyway, so the
    buffer peaks at the same size; and a per-block matrix-vector product re-reads the whole buffer L/2 times
    (memory-bound), while the batched Gram reads it once.

    Samples marked invalid (``valid[b] == False``, e.g. non-finite maps) are stored as zero columns and not counted,
    so each pair's mean is over the samples valid in both blocks.
    """

    _names = ("sum_cos", "above", "count")

    def __init__(self, num_blocks: int, threshold: float = 0.9, storage_dtype: torch.dtype = torch.float32,
                 chunk_bytes: int = 32 * 2**20) -> None:
        self.L, self.threshold, self.storage_dtype, self.chunk_bytes = num_blocks, threshold, storage_dtype, chunk_bytes
        self.sum_cos = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
        self.above = torch.zeros_like(self.sum_cos)
        self.count = torch.zeros_like(self.sum_cos)  # number of (b, h, t) seen by each pair
        self._buf: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # [L, B] bool
        self._filled: list[bool] = [False] * num_blocks

    def add(self, block: int, attn: torch.Tensor, cols: torch.Tensor | None = None,
            valid: torch.Tensor | None = None) -> None:
        """Block ``block``'s maps for the current batch, [B, H, N, N].

        ``cols`` (optional) is ``unit_columns(attn)`` already computed by the caller (shared with other accumulators);
        ``valid`` [B] bool marks the samples to count (default all).
        """
        B, H, N, N2 = attn.shape
        if N != N2:
            raise ValueError(f"attention maps must be square, got {tuple(attn.shape)}")
        if self._buf is None:
            self._buf = torch.empty(B * H * N, self.L, N, dtype=self.storage_dtype, device=attn.device)
            self._valid = torch.ones(self.L, B, dtype=torch.bool, device=attn.device)
        elif self._buf.shape[0] != B * H * N or self._buf.shape[2] != N:
            raise ValueError(f"block {block} has maps {tuple(attn.shape)}, unlike the batch's earlier blocks")
        if cols is None:
            cols, valid = unit_columns(attn, valid)
        self._buf[:, block].copy_(cols.reshape(B * H * N, N))  # rows = (b, h, t); casts to the storage dtype
        if valid is not None:
            self._valid[block] = valid
        self._filled[block] = True

    def end_batch(self) -> None:
        if self._buf is None:
            return
        idx = torch.tensor([i for i, f in enumerate(self._filled) if f])
        buf = self._buf[:, idx] if len(idx) < self.L else self._buf
        L, N = buf.shape[1], buf.shape[2]
        rows = max(1, self.chunk_bytes // (L * N * 4))
        sum_cos = torch.zeros(L, L, dtype=torch.float64, device=buf.device)
        above = torch.zeros_like(sum_cos)
        for start in range(0, buf.shape[0], rows):
            x = buf[start:start + rows].float()
            gram = torch.bmm(x, x.transpose(1, 2))  # [rows, L, L] = every c^{p,q}
            sum_cos += gram.sum(0, dtype=torch.float64)
            above += (gram > self.threshold).sum(0, dtype=torch.float64)
        grid = idx[:, None], idx[None, :]
        v = self._valid[idx.to(self._valid.device)].double()  # [L', B]
        per_sample = buf.shape[0] // v.shape[1]  # H * N rows per sample
        self.sum_cos[grid] += sum_cos.cpu()
        self.above[grid] += above.cpu()
        self.count[grid] += (v @ v.T).cpu() * per_sample
        self._buf, self._valid, self._filled = None, None, [False] * self.L

    def buffer_bytes(self) -> int:
        """Bytes held for the current batch (0 between batches)."""
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()

    def similarity(self) -> torch.Tensor:
        """[L, L] mean column cosine (NaN for pairs never seen together)."""
        return self.sum_cos / self.count

    def ratio(self) -> torch.Tensor:
        """[L, L] fraction of column cosines above the threshold."""
        return self.above / self.count


def unit_columns(attn: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, H, N, N] maps -> (cols [B, H, t, i] float32 contiguous = A[b, h, i, t] / |A[b, h, :, t]|, valid [B] or None).

    One pass: the column norms, then a transposing divide written straight into a contiguous tensor (what
    ``normalize_columns(attn).transpose(-1, -2).contiguous()`` does in three). ``valid`` defaults to "every column norm
    of the sample is finite", which catches any NaN/Inf in the map at no extra pass; it is None when all samples are
    valid. Invalid samples are zeroed, so they add nothing to any sum.
    """
    norms = torch.linalg.vector_norm(attn, dim=-2, dtype=torch.float32)  # [B, H, t]
    if valid is None:
        finite = torch.isfinite(norms).flatten(1).all(1)
        valid = None if bool(finite.all()) else finite
    cols = torch.empty(attn.shape, dtype=torch.float32, device=attn.device)
    torch.div(attn.transpose(-1, -2), norms.clamp_min_(MF.EPS).unsqueeze(-1), out=cols)
    if valid is not None and not bool(valid.all()):
        cols[~valid] = 0
    return cols, valid


class CrossHeadAccumulator(_Sums):
    """Mean H x H column-cosine matrix between the heads of each block (Fig. 3c)."""

    _names = ("sum_hh", "count")

    def __init__(self, num_blocks: int, num_heads: int) -> None:
        self.sum_hh = torch.zeros(num_blocks, num_heads, num_heads, dtype=torch.float64)
        self.count = torch.zeros(num_blocks, dtype=torch.float64)

    def add(self, block: int, attn: torch.Tensor, cols: torch.Tensor | None = None,
            valid: torch.Tensor | None = None) -> None:
        """[B, H, N, N] maps (``cols``/``valid`` as in ``CrossLayerAccumulator.add``)."""
        B, H, N, _ = attn.shape
        if cols is None:
            cols, valid = unit_columns(attn, valid)
        # sum over (b, t) of <col_h, col_g> = one [H, N*N] Gram per sample: a GEMM, no per-token batching
        x = cols.reshape(B, H, N * N)
        self.sum_hh[block] += torch.bmm(x, x.transpose(1, 2)).sum(0, dtype=torch.float64).cpu()
        n_valid = B if valid is None else int(valid.sum())
        self.count[block] += n_valid * N

    def matrices(self) -> torch.Tensor:
        """[L, H, H] mean head-to-head similarity."""
        return self.sum_hh / self.count[:, None, None]

    def mean(self) -> torch.Tensor:
        """[L] mean similarity between different heads."""
        return torch.tensor([MF.mean_off_diagonal(m) for m in self.matrices()], dtype=torch.float64)


class RankAccumulator(_Sums):
    """Effective rank and 99%-energy rank per block, averaged over images and heads.

    SVDs cost far more than the forward pass (on 2 CPU cores one 197 x 197 SVD takes ~7 ms, so 12 heads x 12 blocks
    of ViT-S cost ~5x the image's forward); ``max_images`` caps how many images (per block) enter the average, the
    first valid ones seen.
    """

    _names = ("sum_erank", "sum_energy", "count")

    def __init__(self, num_blocks: int, energy: float = 0.99, max_images: int | None = None) -> None:
        self.energy, self.max_images = energy, max_images
        self.sum_erank = torch.zeros(num_blocks, dtype=torch.float64)
        self.sum_energy = torch.zeros_like(self.sum_erank)
        self.count = torch.zeros_like(self.sum_erank)  # number of (b, h) maps
        self._images = [0] * num_blocks

    def add(self, block: int, attn: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if valid is not None and not bool(valid.all()):
            attn = attn[valid]
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


class FeatureAccumulator(ImageSums):
    """Token-feature cosine between block outputs (Fig. 4) as [L, L], plus per block Dong et al.'s residual ratio and
    the token uniformity: the mean cosine between different tokens of one image, averaged over images (1: every token
    points the same way), from the sum S of an image's unit tokens: (|S|^2 - sum_n |u_n|^2) / (N (N - 1)).

    Like ``CrossLayerAccumulator``: unit token vectors of the batch in an [L, B*N*C] buffer, one Gram at ``end_batch``;
    invalid samples are zeroed and not counted. Per-image rows: "residual", "token_uniformity" [L] (NaN: excluded).
    """

    _names = ("sum_cos", "count", "sum_resid", "images", "sum_unif")

    def __init__(self, num_blocks: int, storage_dtype: torch.dtype = torch.float32) -> None:
        super().__init__({"residual": (num_blocks,), "token_uniformity": (num_blocks,)})
        self.L, self.storage_dtype = num_blocks, storage_dtype
        self.sum_cos = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
        self.count = torch.zeros_like(self.sum_cos)
        self.sum_resid = torch.zeros(num_blocks, dtype=torch.float64)
        self.images = torch.zeros_like(self.sum_resid)
        self.sum_unif = torch.zeros_like(self.sum_resid)
        self._buf: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._filled = [False] * num_blocks

    def add(self, block: int, feats: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """Block output [B, N, C]; ``valid`` [B] bool marks the samples to count (default: every token norm finite,
        which catches any NaN/Inf). Returns the validity used (None: all valid)."""
        B, N, C = feats.shape
        if self._buf is None:
            self._buf = torch.empty(self.L, B * N * C, dtype=self.storage_dtype, device=feats.device)
            self._valid = torch.ones(self.L, B, dtype=torch.bool, device=feats.device)
            self._stage = torch.full((2, self.L, B), math.nan, device=feats.device)  # residual, uniformity
            self._tokens = N
        elif self._buf.shape[1] != B * N * C:
            raise ValueError(f"block {block} has features {tuple(feats.shape)}, unlike the batch's earlier blocks")
        x = feats.float()
        tok = torch.linalg.vector_norm(x, dim=-1)  # [B, N]; reused for |X|_F and the finiteness check
        if valid is None:
            finite = torch.isfinite(tok).all(1)
            valid = None if bool(finite.all()) else finite
        slot = self._buf[block].view(B, N, C)
        safe = tok.clamp_min(MF.EPS)
        torch.div(x, safe.unsqueeze(-1), out=slot)
        # Dong et al.'s residual |X - 1 mean(X)|_F / |X|_F, as MF.residual_norm_ratio but reusing the token norms
        resid = torch.linalg.vector_norm(x - x.mean(dim=1, keepdim=True), dim=(1, 2))
        resid = resid / tok.square().sum(1).sqrt().clamp_min(MF.EPS)
        unit_sq = (tok / safe).square().sum(1)  # sum_n |u_n|^2 (N unless some token is zero)
        unif = (slot.sum(1, dtype=torch.float32).square().sum(1) - unit_sq) / max(N * (N - 1), 1)
        unif = unif if N > 1 else torch.full_like(unif, math.nan)  # one token: no pair to compare
        self._stage[0, block], self._stage[1, block] = resid, unif
        if valid is not None and not bool(valid.all()):
            slot[~valid] = 0
            resid, unif = resid[valid], unif[valid]
            self._valid[block] = valid
        self._filled[block] = True
        self.sum_resid[block] += resid.sum(dtype=torch.float64).cpu()
        self.sum_unif[block] += unif.sum(dtype=torch.float64).cpu()
        self.images[block] += resid.shape[0]
        return valid

    def end_batch(self) -> None:
        if self._buf is None:
            return
        idx = torch.tensor([i for i, f in enumerate(self._filled) if f])
        x = (self._buf[idx.to(self._buf.device)] if len(idx) < self.L else self._buf).float()  # [L', B*N*C]
        grid = idx[:, None], idx[None, :]
        v = self._valid[idx.to(self._valid.device)].double()
        self.sum_cos[grid] += (x @ x.T).double().cpu()
        self.count[grid] += (v @ v.T).cpu() * self._tokens
        filled = torch.tensor(self._filled, device=self._valid.device)[:, None]
        stage = torch.where(self._valid & filled, self._stage, math.nan)
        self._append({"residual": stage[0].T, "token_uniformity": stage[1].T})
        self._buf, self._valid, self._filled = None, None, [False] * self.L

    def buffer_bytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()

    def similarity(self) -> torch.Tensor:
        return self.sum_cos / self.count

    def residual(self) -> torch.Tensor:
        return self.sum_resid / self.images

    def token_uniformity(self) -> torch.Tensor:
        """[L] mean cosine between different tokens of an image (Dong et al.'s rank collapse seen as directions)."""
        return self.sum_unif / self.images


class FindingsAccumulator(_Sums):
    """Per site: how many non-finite values its tensors held and in how many images (those images are excluded)."""

    _names = ("nonfinite", "images")

    def __init__(self, num_sites: int) -> None:
        self.nonfinite = torch.zeros(num_sites, dtype=torch.float64)
        self.images = torch.zeros_like(self.nonfinite)

    def add(self, site: int, tensor: torch.Tensor, valid: torch.Tensor) -> None:
        bad = tensor[~valid]
        self.nonfinite[site] += float((~torch.isfinite(bad)).sum())
        self.images[site] += bad.shape[0]
