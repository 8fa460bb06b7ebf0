"""Column statistics of attention maps across blocks and heads, all from one Gram per (image, key token).

Notation: A^l[b, h, i, j] is block l's map, rows i = queries, columns j = keys (``functional``). For column t of block
p, head g, write x = A^p[b, g, :, t] over the N queries, its mean mu, centred part c = x - mu 1 and norm |x|, with
|x|^2 = N mu^2 + |c|^2. The batch's centred columns c are stored (centred *before* any product) and, per (b, t), their
Gram G = <c_p, c_q> over all L x H columns is taken; with a = sqrt(N) mu / |x| every statistic is exact algebra:

    excess  = G / (|x_p| |x_q|)        the cosine's part beyond what the column means explain
    floor   = a_p a_q                  = N mu_p mu_q / (|x_p| |x_q|): what two uncorrelated non-negative columns with
                                       these means and norms score
    cosine  = floor + excess           the paper's M^{p,q}_{h,t} (``similarity``)
    Pearson = G / (|c_p| |c_q|)        the centred similarity; 0 where a column is constant (no direction), i.e. its
                                       centred part is under ``CONSTANT`` of its norm
    |A - 1 abar^T|_F^2 / |A|_F^2 = sum_t |c_t|^2 / sum_t |x_t|^2   per (b, h): Dong et al.'s rank-1 residual (abar =
                                       the mean row), |c_t|^2 = G_tt

Centring first matters for near-uniform maps: there cosine and floor agree to ~1e-6 and (cosine - floor) from two
float32 numbers would be rounding noise, while G is a product of small centred vectors, accurate to float32 relative
precision. The norms come from the Gram's diagonal and the means, so the maps are read once for the means and once to
write the centred columns. The per-(b, t) Gram spans all L x H columns of the batch's maps, so one buffer and one
batched matmul give the same-head cross-layer statistics (its head diagonal), the within-block head-to-head matrices
(Fig. 3c) and the head-permutation-invariant ``matched`` similarity (optimal head matching between two blocks) at once.
Everything here applies to both kinds of map, "probs" and "mixed" (the floor's "non-negative" reading only to "probs").
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import functional as MF
from .sums import ImageSums, reuse

CONSTANT = 1e-6  # |c| / |x| under this: the column is constant within float32 rounding of the map's entries


def matched_similarity(hh: np.ndarray) -> np.ndarray:
    """[L, L, H, H] mean column cosine between head g of block p and head h of block q -> [L, L]: the mean cosine of
    the head matching that maximises it (``scipy.optimize.linear_sum_assignment``); NaN where a pair was never seen."""
    L = hh.shape[0]
    out = np.full((L, L), math.nan)
    for p in range(L):
        for q in range(L):
            m = hh[p, q]
            if np.isfinite(m).all():
                rows, cols = linear_sum_assignment(m, maximize=True)
                out[p, q] = float(m[rows, cols].mean())
    return out


class ColumnAccumulator(ImageSums):
    """Column cosine, its floor and excess, Pearson, head matrices, matched similarity and rank-1 residual, streamed.

    Within a batch the centred columns c of every block and head are stored in a [B*N, L*H, N] buffer (rows (b, t)),
    with the column means in a [B, N, L, H] one. ``storage_dtype`` float16/bfloat16 halves the buffer; then columns
    are stored scaled by sqrt(N) / |x| (one more read of the map, and their scale kept) so that float16 neither
    overflows nor underflows, and Pearson stays accurate down to centred parts of ~1e-4 of a column's norm.
    ``end_batch`` takes the Gram of each row's L*H columns in chunks of ``chunk_bytes`` and folds it into the sums and
    per-image rows; the buffer is kept for the next batch of the same shape (``sums.reuse``) until ``release``.

    Sums (float64): sum_cos, sum_floor [L*H, L*H] over (b, t) (index l * H + h); sum_pearson, above [L, L] over
    (b, h, t), same head; count [L, L] (b, t) seen by each pair (images valid in both x N); sum_resid [L] rank-1
    residual over valid (b, h); images [L] valid images per block. Per-image rows: "similarity", "ratio" [L, L]
    (means over (h, t)), "pearson_prev", "cross_head", "rank1_residual" [L]. Images marked invalid
    (``valid[b] == False``) are stored as zero columns and not counted; their per-image rows are NaN.
    """

    _names = ("sum_cos", "sum_floor", "sum_pearson", "above", "count", "sum_resid", "images")

    def __init__(self, num_blocks: int, num_heads: int, threshold: float = 0.9,
                 storage_dtype: torch.dtype = torch.float32, chunk_bytes: int = 32 * 2**20) -> None:
        L, H = num_blocks, num_heads
        super().__init__({"similarity": (L, L), "ratio": (L, L), "pearson_prev": (L,), "cross_head": (L,),
                          "rank1_residual": (L,)})
        self.L, self.H, self.threshold = L, H, threshold
        self.storage_dtype, self.chunk_bytes = storage_dtype, chunk_bytes
        self.sum_cos = torch.zeros(L * H, L * H, dtype=torch.float64)
        self.sum_floor = torch.zeros_like(self.sum_cos)
        self.sum_pearson = torch.zeros(L, L, dtype=torch.float64)
        self.above = torch.zeros_like(self.sum_pearson)
        self.count = torch.zeros_like(self.sum_pearson)
        self.sum_resid = torch.zeros(L, dtype=torch.float64)
        self.images = torch.zeros_like(self.sum_resid)  # valid images per block
        self._buf: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None  # the last batch's buffer, for the next one

    def add(self, block: int, attn: torch.Tensor, valid: torch.Tensor | None = None,
            check: bool = True) -> torch.Tensor | None:
        """Block ``block``'s maps [B, H, N, N] for the current batch; returns the validity used ([B] bool, or None:
        all valid). ``check``: find invalid images (any non-finite column, one host sync per block) and combine them
        with ``valid``; False trusts ``valid`` (None: all valid)."""
        B, H, N, N2 = attn.shape
        if N != N2 or H != self.H:
            raise ValueError(f"block {block}: maps {tuple(attn.shape)}, expected [B, {self.H}, N, N]")
        x = attn.float()
        half = self.storage_dtype != torch.float32
        if self._buf is None:
            dev = x.device
            self._on(dev)
            self._buf = reuse(self._kept, (B * N, self.L * H, N), self.storage_dtype, dev)
            self._mu = torch.zeros(B, N, self.L, H, device=dev)  # column means per (b, t, l, h)
            self._scale = torch.ones(B, N, self.L, H, device=dev) if half else None  # stored = c * scale
            self._valid = torch.zeros(self.L, B, dtype=torch.bool, device=dev)
            self._filled = [False] * self.L
        elif self._buf.shape[0] != B * N or self._buf.shape[2] != N:
            raise ValueError(f"block {block} has maps {tuple(attn.shape)}, unlike the batch's earlier blocks")
        mu = x.mean(-2)  # [B, H, t]; any NaN/Inf in a column makes its mean non-finite
        if check:
            finite = torch.isfinite(mu).flatten(1).all(1)
            finite = finite if valid is None else finite & valid
            valid = None if bool(finite.all()) else finite
        slot = self._buf.view(B, N, self.L, H, N)[:, :, block]  # [B, t, H, i]
        mu_t = mu.transpose(1, 2)  # [B, t, H]
        if half:  # centre in float32, then scale into the half-precision slot
            # sqrt(N) / |x|: entries ~ |c| / |x|, within float16's normal range down to ~1e-4
            scale = (math.sqrt(N) / (x * x).sum(-2).sqrt().clamp_min(MF.EPS)).transpose(1, 2)  # [B, t, H]
            centred = torch.empty(B, N, H, N, device=x.device)
            torch.sub(x.permute(0, 3, 1, 2), mu_t.unsqueeze(-1), out=centred)
            torch.mul(centred, scale.unsqueeze(-1), out=slot)
            self._scale[:, :, block] = scale
        else:  # one transposing pass: the slot holds x^T - mu, centred before any product
            torch.sub(x.permute(0, 3, 1, 2), mu_t.unsqueeze(-1), out=slot)
        self._mu[:, :, block] = mu_t
        if valid is not None:
            slot[~valid] = 0
            self._mu[~valid, :, block] = 0
            self._valid[block] = valid
        else:
            self._valid[block] = True
        self._filled[block] = True
        return valid

    def end_batch(self) -> None:
        if self._buf is None:
            return
        L, H = self.L, self.H
        rows, LH, N = self._buf.shape
        B = rows // N
        dev = self._buf.device
        for blk in (b for b, f in enumerate(self._filled) if not f):  # a block that did not run: counts nowhere
            self._buf.view(B, N, L, H, N)[:, :, blk] = 0
        img = {"g": torch.zeros(B, LH, LH, device=dev), "floor": torch.zeros(B, LH, LH, device=dev),
               "above": torch.zeros(B, L, L, device=dev), "pearson": torch.zeros(B, L, L, device=dev),
               "csq": torch.zeros(B, L, H, device=dev), "xsq": torch.zeros(B, L, H, device=dev)}
        mu = self._mu.view(rows, L, H)
        scale = None if self._scale is None else self._scale.view(rows, L, H)
        for b0, b1, t0, t1 in self._chunks(B, N, LH):
            r0, r1 = b0 * N + t0, (b1 - 1) * N + t1
            sums = self._chunk(self._buf[r0:r1].float(), mu[r0:r1], None if scale is None else scale[r0:r1],
                               b1 - b0, N)
            for k, v in sums.items():
                img[k][b0:b1] += v
        self._fold(B, N, img)
        self._kept, self._buf, self._mu, self._scale = self._buf, None, None, None

    def _chunks(self, B: int, N: int, LH: int) -> list[tuple[int, int, int, int]]:
        """(b0, b1, t0, t1) row ranges whose Gram and float32 input each take at most ``chunk_bytes``: whole images,
        or pieces of one image."""
        per_row = LH * max(LH, N) * 4
        if N * per_row <= self.chunk_bytes:
            step = self.chunk_bytes // (N * per_row)
            return [(b, min(B, b + step), 0, N) for b in range(0, B, step)]
        step = max(1, self.chunk_bytes // per_row)
        return [(b, b + 1, t, min(N, t + step)) for b in range(B) for t in range(0, N, step)]

    def _chunk(self, x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor | None, images: int,
               N: int) -> dict[str, torch.Tensor]:
        """Rows (b, t) of ``images`` consecutive images: x [n, L*H, N] stored columns, mu (and scale) [n, L, H].
        Returns per-image sums over t: g (excess) and floor [images, L*H, L*H]; above, pearson [images, L, L] (same
        head); csq = |c|^2 and xsq = |x|^2 [images, L, H]."""
        L, H = self.L, self.H
        g = torch.bmm(x, x.transpose(1, 2))  # [n, LH, LH] of the stored columns
        csq = g.diagonal(dim1=1, dim2=2).view(-1, L, H).clamp_min(0)
        if scale is not None:
            csq = csq / scale.square()
        xsq = N * mu.square() + csq
        inv = torch.where(xsq > MF.EPS**2, xsq.clamp_min(MF.EPS**2).rsqrt(), 0.0)  # 1 / |x|; a zero column: 0
        w = (inv if scale is None else inv / scale).view(-1, L * H)
        g.mul_(w[:, :, None]).mul_(w[:, None, :])  # now the excess G / (|x_p| |x_q|)
        a = (math.sqrt(N) * mu * inv).view(-1, L * H)
        # the per-entry statistics need each row's same-head entries; everything linear is summed per image first
        same = g.view(-1, L, H, L, H).diagonal(dim1=2, dim2=4)  # [n, L(p), L(q), H] (a strided view)
        a3 = a.view(-1, L, H)
        cos = torch.addcmul(same, a3[:, :, None], a3[:, None])
        ratio = (csq * inv.square()).sqrt()  # |c| / |x| per column: no direction under CONSTANT
        rinv = torch.where(ratio > CONSTANT, 1.0 / ratio.clamp_min(CONSTANT), 0.0)
        pear = same * (rinv[:, :, None] * rinv[:, None])
        per_image, per_row = (images, -1, L, L, H), (images, -1, L * H)
        a_img = a.view(per_row)
        return {"g": g.view(images, -1, L * H, L * H).sum(1), "floor": torch.bmm(a_img.transpose(1, 2), a_img),
                "above": (cos > self.threshold).view(per_image).sum((1, 4), dtype=torch.float32),
                "pearson": pear.view(per_image).sum((1, 4)),
                "csq": csq.view(images, -1, L, H).sum(1), "xsq": xsq.view(images, -1, L, H).sum(1)}

    def _fold(self, B: int, N: int, img: dict[str, torch.Tensor]) -> None:
        """Add the batch's per-image sums to the totals and append its per-image rows."""
        L, H = self.L, self.H
        v = self._valid.T  # [B, L]
        both = v[:, :, None] & v[:, None]  # [B, L, L]
        vf = v.double()
        cos_hh = (img["floor"] + img["g"]).view(B, L, H, L, H)  # per-image sum over t of every column cosine
        self.count += (vf.T @ vf) * N
        self.sum_floor += img["floor"].sum(0).double()
        self.sum_cos += cos_hh.view(B, L * H, L * H).sum(0).double()
        self.above += img["above"].sum(0).double()
        self.sum_pearson += img["pearson"].sum(0).double()
        resid = (img["csq"] / img["xsq"].clamp_min(MF.EPS)).sqrt()  # [B, L, H]
        self.sum_resid += torch.where(v[:, :, None], resid, 0.0).sum((0, 2)).double()
        self.images += vf.sum(0)
        nan = torch.tensor(math.nan, device=v.device)
        per = H * N
        same_img = cos_hh.diagonal(dim1=2, dim2=4).sum(-1)  # [B, L, L]
        within = cos_hh.diagonal(dim1=1, dim2=3)  # [B, H, H, L]
        off = within.sum((1, 2)) - within.diagonal(dim1=1, dim2=2).sum(-1)  # [B, L] sum over g != h
        prev = torch.full((B, L), math.nan, device=v.device)
        prev[:, 1:] = torch.where(v[:, 1:] & v[:, :-1],
                                  torch.diagonal(img["pearson"], offset=-1, dim1=1, dim2=2) / per, nan)
        cross = off / (N * H * (H - 1)) if H > 1 else torch.full_like(off, math.nan)
        self._append({"similarity": torch.where(both, same_img / per, nan),
                      "ratio": torch.where(both, img["above"] / per, nan),
                      "pearson_prev": prev, "cross_head": torch.where(v, cross, nan),
                      "rank1_residual": torch.where(v, resid.mean(-1), nan)})

    def buffer_bytes(self) -> int:
        """Bytes of the per-batch buffers held (kept between batches of one shape; 0 after ``release``)."""
        buf = self._kept if self._buf is None else self._buf
        extra = 0 if self._mu is None else self._mu.numel() + (0 if self._scale is None else self._scale.numel())
        return (0 if buf is None else buf.numel() * buf.element_size()) + extra * 4

    def release(self) -> None:
        """Free the buffer kept for the next batch."""
        self._kept = None

    # ----------------------------------------------------------------------------------------------- results

    def _same_head(self, m: torch.Tensor) -> torch.Tensor:
        """[L*H, L*H] -> [L, L] sum over heads of the same-head entries."""
        return m.view(self.L, self.H, self.L, self.H).diagonal(dim1=1, dim2=3).sum(-1)

    def similarity(self) -> torch.Tensor:
        """[L, L] mean column cosine over (b, h, t), the paper's similarity (NaN for pairs never seen together)."""
        return self._same_head(self.sum_cos).cpu() / (self.H * self.count.cpu())

    def ratio(self) -> torch.Tensor:
        """[L, L] fraction of column cosines above the threshold."""
        return self.above.cpu() / (self.H * self.count.cpu())

    def floor(self) -> torch.Tensor:
        """[L, L] mean floor N mu_p mu_q / (|x_p| |x_q|); ``similarity() - floor()`` is the excess."""
        return self._same_head(self.sum_floor).cpu() / (self.H * self.count.cpu())

    def pearson(self) -> torch.Tensor:
        """[L, L] mean column Pearson correlation over (b, h, t)."""
        return self.sum_pearson.cpu() / (self.H * self.count.cpu())

    def head_matrices(self) -> torch.Tensor:
        """[L, L, H, H]: mean column cosine between head g of block p and head h of block q."""
        hh = self.sum_cos.cpu().view(self.L, self.H, self.L, self.H).permute(0, 2, 1, 3)
        return hh / self.count.cpu()[:, :, None, None]

    def matrices(self) -> torch.Tensor:
        """[L, H, H] within-block head-to-head similarity (Fig. 3c), as ``CrossHeadAccumulator.matrices``."""
        return self.head_matrices().diagonal(dim1=0, dim2=1).permute(2, 0, 1)

    def cross_head(self) -> torch.Tensor:
        """[L] mean similarity between different heads of a block."""
        return torch.tensor([MF.mean_off_diagonal(m) for m in self.matrices()], dtype=torch.float64)

    def matched(self) -> torch.Tensor:
        """[L, L] mean column cosine under the best one-to-one matching of the heads of p to those of q."""
        return torch.from_numpy(matched_similarity(self.head_matrices().numpy()))

    def rank1_residual(self) -> torch.Tensor:
        """[L] mean over (b, h) of |A - 1 abar^T|_F / |A|_F (0: every row equal to the mean row)."""
        return self.sum_resid.cpu() / (self.H * self.images.cpu())
