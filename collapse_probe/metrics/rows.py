"""Row statistics of attention maps: how far each query's distribution is from uniform, and how the rows of two blocks
compare (the column cosine of ``columns`` looks down the query axis and is blind to *which* keys a row attends: two
blocks whose queries all attend alike give cosine 1 whatever keys they attend).

Per block, for the rows A[b, h, i, :] over the N keys (natural log throughout):

    entropy    -sum_j A_ij log A_ij / log N     1 for uniform rows, 0 for one-hot rows      ("probs" only)
    tv_uniform  1/2 sum_j |A_ij - 1/N|          0 for uniform rows, -> 1 for one-hot rows   ("probs" only)
    row cosine  <A^p_i, A^q_i> / (|A^p_i| |A^q_i|) for every block pair, [L, L]             (both kinds)
    row JSD     Jensen-Shannon divergence of A^l_i and A^{l-1}_i, [L] (NaN for block 0)     ("probs" only)

each averaged over (b, h, i). "mixed" maps (after Re-attention's Theta and Norm) are not row-stochastic and can be
negative, so the distribution measures are NaN for them.
"""
from __future__ import annotations

import math

import torch

from . import functional as MF
from .sums import ImageSums, reuse

TINY = torch.finfo(torch.float32).tiny  # log() floor: x log x -> 0 for x = 0 without a NaN from 0 * -inf
LOG2 = math.log(2.0)


def _neg_entropy_sum(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [...] sum_j x_j log x_j (nats), zeros contributing 0; the logs go to ``scratch`` (shaped like x)."""
    torch.clamp_min(x, TINY, out=scratch).log_()
    return _dot(x, scratch)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product over the last axis as a batched matmul: no product-sized temporary (vecdot makes one)."""
    N = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, N), b.reshape(-1, N, 1)).view(a.shape[:-1])


class RowAccumulator(ImageSums):
    """Entropy / log N, TV from uniform, row cosine [L, L] and consecutive-block row JSD, streamed.

    ``distributions``: the rows are probability distributions ("probs"); False ("mixed") measures only the row
    cosine. Within a batch each block's unit rows are stored in an [L, B*H*N*N] buffer (``storage_dtype`` as in
    ``CrossLayerAccumulator``); ``end_batch`` turns it into all L x L row-cosine sums with batched matrix products
    over chunks of ``chunk_bytes``; the buffer is kept for the next batch of the same shape until ``release``. The
    JSD of block l needs block l-1's map: it is held (a reference, not a copy; no supported model writes to its
    attention map after the capture point) only until block l has arrived; blocks may arrive in any order.

    JSD per row from entropies: with s = p + q, JSD = 1/2 (E(s) - E(p) - E(q)) + 1/2 log 2 (sum p + sum q), E(v) =
    -sum v log v, so each block pair costs one more log pass. Its absolute float32 error is ~1e-7 x log N per row.

    Sums (float64): sum_entropy, sum_tv [L] over valid (b, h, i) via per-image means, images [L]; sum_cos, count
    [L, L] (count = images valid in both x H x N); sum_jsd, jsd_images [L]. Per-image rows: "entropy", "tv_uniform"
    [L] (NaN for "mixed" and for excluded images).
    """

    _names = ("sum_entropy", "sum_tv", "images", "sum_cos", "count", "sum_jsd", "jsd_images")

    def __init__(self, num_blocks: int, distributions: bool = True, storage_dtype: torch.dtype = torch.float32,
                 chunk_bytes: int = 32 * 2**20) -> None:
        L = num_blocks
        super().__init__({"entropy": (L,), "tv_uniform": (L,)})
        self.L, self.distributions, self.storage_dtype, self.chunk_bytes = L, distributions, storage_dtype, chunk_bytes
        self.sum_entropy = torch.zeros(L, dtype=torch.float64)
        self.sum_tv, self.images = torch.zeros_like(self.sum_entropy), torch.zeros_like(self.sum_entropy)
        self.sum_jsd, self.jsd_images = torch.zeros_like(self.sum_entropy), torch.zeros_like(self.sum_entropy)
        self.sum_cos = torch.zeros(L, L, dtype=torch.float64)
        self.count = torch.zeros_like(self.sum_cos)
        self._buf: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None  # the last batch's buffer, for the next one
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._scratch: list[torch.Tensor] | None = None

    def add(self, block: int, attn: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Block ``block``'s maps [B, H, N, N]; ``valid`` [B] bool marks the images to count (None: all; the
        collector passes ``ColumnAccumulator.add``'s result, so maps are checked for NaN/Inf once)."""
        B, H, N, _ = attn.shape
        x = attn.float().contiguous()
        if self._buf is None:
            self._on(x.device)
            self._buf = reuse(self._kept, (self.L, B * H * N * N), self.storage_dtype, x.device)
            self._valid = torch.zeros(self.L, B, dtype=torch.bool, device=x.device)
            self._stage = torch.full((2, self.L, B), math.nan, device=x.device)  # entropy, tv per image
            self._filled = [False] * self.L
            self._per_image, self._n = H * N, N  # rows per image, entries per row
        elif self._buf.shape[1] != B * H * N * N:
            raise ValueError(f"block {block} has maps {tuple(attn.shape)}, unlike the batch's earlier blocks")
        v = torch.ones(B, dtype=torch.bool, device=x.device) if valid is None else valid
        slot = self._buf[block].view(B, H, N, N)
        torch.div(x, torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(MF.EPS), out=slot)
        if valid is not None:
            slot[~valid] = 0
        self._valid[block], self._filled[block] = v, True
        if not self.distributions:
            return
        # map-sized temporaries live in two scratch maps kept across blocks and batches: fresh 15 MB temporaries (ViT-S,
        # batch 16) come with fresh pages, which cost more than the arithmetic
        self._scratch = [reuse(t, x.shape, torch.float32, x.device) for t in self._scratch or (None, None)]
        neg_ent = _neg_entropy_sum(x, self._scratch[0])  # [B, H, N]
        rowsum = x.sum(-1)
        # 1/2 sum_j |a_j - c| = sum_j max(a_j, c) - (sum_j a_j + N c) / 2: one clamp pass, no |.| temporary
        tv = torch.clamp_min(x, 1.0 / N, out=self._scratch[0]).sum(-1) - (rowsum + 1) / 2
        ent = -neg_ent.mean((1, 2)) / math.log(N) if N > 1 else torch.full((B,), math.nan, device=x.device)
        self._stage[0, block], self._stage[1, block] = ent, tv.mean((1, 2))
        self.sum_entropy[block] += torch.where(v, ent, 0.0).sum()
        self.sum_tv[block] += torch.where(v, self._stage[1, block], 0.0).sum()
        self.images[block] += v.sum()
        self._held[block] = (x, neg_ent, rowsum, v)
        for hi in (block, block + 1):
            if hi - 1 in self._held and hi in self._held:
                self._jsd(hi)
        for blk in [b for b in self._held if (b == 0 or b - 1 in self._done) and b + 1 in self._done | {self.L}]:
            del self._held[blk]

    @property
    def _done(self) -> set[int]:
        return {b for b, f in enumerate(self._filled) if f}

    def _jsd(self, hi: int) -> None:
        """Fold in the row JSD between block ``hi`` and block ``hi - 1`` (both held)."""
        p, neg_p, sum_p, v_p = self._held[hi - 1]
        q, neg_q, sum_q, v_q = self._held[hi]
        s = torch.add(p, q, out=self._scratch[1])
        neg_s = _neg_entropy_sum(s, self._scratch[0])
        jsd = 0.5 * (neg_p + neg_q - neg_s) + 0.5 * LOG2 * (sum_p + sum_q)  # [B, H, N]
        v = v_p & v_q
        self.sum_jsd[hi] += torch.where(v, jsd.mean((1, 2)), 0.0).sum()
        self.jsd_images[hi] += v.sum()

    def end_batch(self) -> None:
        if self._buf is None:
            return
        for blk in (b for b, f in enumerate(self._filled) if not f):
            self._buf[blk] = 0
        # sum over rows of <r_p, r_q>: one L x L product per group of k rows, the groups summed, rather than one long
        # float32 GEMM over all B*H*N*N entries (as fast here, and 40x more accurate: ~1e-7 instead of ~5e-6)
        rows, N = self._buf.shape[1] // self._n, self._n
        k = max(d for d in range(1, 17) if rows % d == 0)
        groups = self._buf.view(self.L, rows // k, k * N).transpose(0, 1)  # [G, L, k*N]
        step = max(1, self.chunk_bytes // (self.L * k * N * 4))
        for g0 in range(0, groups.shape[0], step):
            x = groups[g0:g0 + step].float()
            self.sum_cos += torch.bmm(x, x.transpose(1, 2)).sum(0).double()
        vf = self._valid.double()
        self.count += (vf @ vf.T) * self._per_image
        nan = torch.tensor(math.nan, device=vf.device)
        stage = torch.where(self._valid, self._stage, nan) if self.distributions else self._stage
        self._append({"entropy": stage[0].T, "tv_uniform": stage[1].T})
        self._kept, self._buf, self._held = self._buf, None, {}

    def buffer_bytes(self) -> int:
        """Bytes of the per-batch buffer held (kept between batches of one shape; 0 after ``release``)."""
        buf = self._kept if self._buf is None else self._buf
        return 0 if buf is None else buf.numel() * buf.element_size()

    def release(self) -> None:
        """Free the buffer and scratch maps kept for the next batch."""
        self._kept = self._scratch = None

    # ----------------------------------------------------------------------------------------------- results

    def _nan_unless(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.distributions else torch.full_like(values, math.nan)

    def entropy(self) -> torch.Tensor:
        """[L] mean row entropy / log N (NaN for maps that are not distributions)."""
        return self._nan_unless(self.sum_entropy.cpu() / self.images.cpu())

    def tv_uniform(self) -> torch.Tensor:
        """[L] mean total-variation distance of a row from the uniform row."""
        return self._nan_unless(self.sum_tv.cpu() / self.images.cpu())

    def row_cosine(self) -> torch.Tensor:
        """[L, L] mean cosine between row i of block p and row i of block q, over (b, h, i)."""
        return self.sum_cos.cpu() / self.count.cpu()

    def jsd_prev(self) -> torch.Tensor:
        """[L] mean JSD (nats) between the rows of block l and block l - 1; NaN for block 0."""
        out = self.sum_jsd.cpu() / self.jsd_images.cpu()
        out[0] = math.nan
        return self._nan_unless(out)
