"""Column statistics of attention maps across blocks and heads, all from one Gram per (image, key token).

Notation: A^l[b, h, i, j] is block l's map, rows i = queries, columns j = keys (``functional``). For column t of block
p, head g, write x = A^p[b, g, :, t] over the N queries, its mean mu, norm |x| and centred part c = x - mu 1, and keep

    a = sqrt(N) mu / |x|           one number per column
    z = sqrt(N) c / |x|            the column centred *before* it is scaled or multiplied

Every statistic below is then exact algebra on a, z and the Gram g = <z_p, z_q> of two columns:

    cosine  = a_p a_q + g / N      the paper's M^{p,q}_{h,t} (``similarity``)
    floor   = a_p a_q              = N mu_p mu_q / (|x_p| |x_q|): what two uncorrelated non-negative columns with these
                                   means and norms score; cosine - floor = g / N is the excess over it
    Pearson = g / sqrt(g_pp g_qq)  the centred similarity; 0 where a column is constant (no direction), i.e. its
                                   centred part is under ``CONSTANT`` of its norm
    |A - 1 abar^T|_F^2 = sum_t |x_t|^2 g_tt / N    (abar = mean row; Dong et al.'s rank-1 residual, per (b, h))

Centring first matters for near-uniform maps: there cosine and floor agree to ~1e-6 and (cosine - floor) from two
float32 numbers would be rounding noise, while g is a product of small centred vectors, accurate to float32 relative
precision. The per-(b, t) Gram spans all L x H columns of the batch's maps, so one buffer and one batched matmul give
the same-head cross-layer statistics (its head diagonal), the within-block head-to-head matrices (Fig. 3c) and the
head-permutation-invariant ``matched`` similarity (optimal head matching between two blocks) at once. Everything here
applies to both kinds of map, "probs" and "mixed" (the floor's "non-negative" reading only to "probs").
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import functional as MF
from .sums import ImageSums

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

    Within a batch the centred columns z of every block and head are stored in a [B*N, L*H, N] buffer (rows (b, t);
    ``storage_dtype`` float16/bfloat16 halves it, float16 loses Pearson precision for columns whose centred part is
    under ~1e-4 of their norm, where z underflows), with a [B*N, L*H] buffer of a. ``end_batch`` takes the Gram of
    each row's L*H columns in chunks of ``chunk_bytes``, folds it into the sums and per-image rows, and frees both.

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

    def add(self, block: int, attn: torch.Tensor, valid: torch.Tensor | None = None,
            check: bool = True) -> torch.Tensor | None:
        """Block ``block``'s maps [B, H, N, N] for the current batch; returns the validity used ([B] bool, or None:
        all valid). ``check``: find invalid images (any non-finite column, one host sync per block) and combine them
        with ``valid``; False trusts ``valid`` (None: all valid)."""
        B, H, N, N2 = attn.shape
        if N != N2 or H != self.H:
            raise ValueError(f"block {block}: maps {tuple(attn.shape)}, expected [B, {self.H}, N, N]")
        x = attn.float()
        if self._buf is None:
            dev = x.device
            self._on(dev)
            self._buf = torch.empty(B * N, self.L * H, N, dtype=self.storage_dtype, device=dev)
            self._a = torch.zeros(B, N, self.L, H, device=dev)  # a per (b, t, l, h)
            self._sq = torch.zeros(self.L, B, H, N, device=dev)  # |x|^2 per column
            self._valid = torch.zeros(self.L, B, dtype=torch.bool, device=dev)
            self._filled = [False] * self.L
        elif self._buf.shape[0] != B * N or self._buf.shape[2] != N:
            raise ValueError(f"block {block} has maps {tuple(attn.shape)}, unlike the batch's earlier blocks")
        sq = (x * x).sum(-2)  # [B, H, t]; (x*x).sum is ~7x faster than vector_norm over the strided query axis
        if check:
            finite = torch.isfinite(sq).flatten(1).all(1)
            finite = finite if valid is None else finite & valid
            valid = None if bool(finite.all()) else finite
        mu = x.mean(-2)
        scale = math.sqrt(N) / sq.sqrt().clamp_min(MF.EPS)  # a zero column gets z = 0, a = 0: cosine 0 with anything
        centred = torch.empty(B, H, N, N, device=x.device)
        torch.sub(x.transpose(-1, -2), mu.unsqueeze(-1), out=centred)  # [B, H, t, i]: centre before scaling
        slot = self._buf.view(B, N, self.L, H, N)[:, :, block]  # [B, t, H, i]
        torch.mul(centred.transpose(1, 2), scale.transpose(1, 2).unsqueeze(-1), out=slot)
        self._a[:, :, block] = (mu * scale).transpose(1, 2)
        self._sq[block] = sq
        if valid is not None:
            slot[~valid] = 0
            self._a[~valid, :, block] = 0
            self._sq[block][~valid] = 0
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
        img = {"g": torch.zeros(B, LH, LH, device=dev), "above": torch.zeros(B, L, L, device=dev),
               "pearson": torch.zeros(B, L, L, device=dev)}
        a = self._a.view(rows, L, H)
        r2 = torch.empty(rows, L, H, device=dev)  # |c|^2 / |x|^2 per column: the Gram's diagonal
        for b0, b1, t0, t1 in self._chunks(B, N, LH):
            r0, r1 = b0 * N + t0, (b1 - 1) * N + t1
            sums, r2[r0:r1] = self._chunk(self._buf[r0:r1].float(), a[r0:r1], b1 - b0, N)
            for k, v in sums.items():
                img[k][b0:b1] += v
        self._fold(B, N, img, r2.view(B, N, L, H))
        self._buf = self._a = self._sq = None

    def _chunks(self, B: int, N: int, LH: int) -> list[tuple[int, int, int, int]]:
        """(b0, b1, t0, t1) row ranges whose Gram and float32 input each take at most ``chunk_bytes``: whole images,
        or pieces of one image."""
        per_row = LH * max(LH, N) * 4
        if N * per_row <= self.chunk_bytes:
            step = self.chunk_bytes // (N * per_row)
            return [(b, min(B, b + step), 0, N) for b in range(0, B, step)]
        step = max(1, self.chunk_bytes // per_row)
        return [(b, b + 1, t, min(N, t + step)) for b in range(B) for t in range(0, N, step)]

    def _chunk(self, x: torch.Tensor, a: torch.Tensor, images: int,
               N: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows (b, t) of ``images`` consecutive images: x [n, L*H, N] stored z, a [n, L, H]. Returns per-image sums
        (g [images, L*H, L*H] of the excess <z, z'> / N, above and pearson [images, L, L], same head) and each row's
        |c|^2 / |x|^2 [n, L, H]."""
        L, H = self.L, self.H
        g = torch.baddbmm(x.new_zeros(()), x, x.transpose(1, 2), beta=0, alpha=1.0 / N)  # [n, LH, LH]
        # the per-entry statistics need each row's same-head entries; everything linear is summed per image first
        same = g.view(-1, L, H, L, H).diagonal(dim1=2, dim2=4)  # [n, L(p), L(q), H] (a strided view)
        cos = torch.addcmul(same, a[:, :, None], a[:, None])
        norm = same.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # [n, H, L]: |c| / |x| per column
        inv = torch.where(norm > CONSTANT, 1.0 / norm.clamp_min(CONSTANT), 0.0).transpose(1, 2)  # no direction: 0
        pear = same * (inv[:, :, None] * inv[:, None])
        per_image = (images, -1, L, L, H)
        return {"g": g.view(images, -1, L * H, L * H).sum(1),
                "above": (cos > self.threshold).view(per_image).sum((1, 4), dtype=torch.float32),
                "pearson": pear.view(per_image).sum((1, 4))}, norm.square().transpose(1, 2)

    def _fold(self, B: int, N: int, img: dict[str, torch.Tensor], r2: torch.Tensor) -> None:
        """Add the batch's per-image sums to the totals and append its per-image rows."""
        L, H = self.L, self.H
        v = self._valid.T  # [B, L]
        both = v[:, :, None] & v[:, None]  # [B, L, L]
        vf = v.double()
        a_img = self._a.view(B, N, L * H)
        aa = torch.bmm(a_img.transpose(1, 2), a_img)  # [B, LH, LH]: per-image sum over t of the floors
        cos_hh = (aa + img["g"]).view(B, L, H, L, H)  # per-image sum over t of every column cosine
        self.count += (vf.T @ vf) * N
        self.sum_floor += aa.sum(0).double()
        self.sum_cos += cos_hh.view(B, L * H, L * H).sum(0).double()
        self.above += img["above"].sum(0).double()
        self.sum_pearson += img["pearson"].sum(0).double()
        sq = self._sq.permute(1, 3, 0, 2)  # [B, t, L, H] |x|^2 per column
        # |A - 1 abar^T|_F^2 / |A|_F^2 = sum_t |c_t|^2 / sum_t |x_t|^2 per (b, h): [B, L, H]
        resid = ((sq * r2).sum(1) / sq.sum(1).clamp_min(MF.EPS)).sqrt()
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
        """Bytes held for the current batch (0 between batches)."""
        if self._buf is None:
            return 0
        return self._buf.numel() * self._buf.element_size() + (self._a.numel() + self._sq.numel()) * 4

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
