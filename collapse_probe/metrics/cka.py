"""Linear CKA between block outputs (Kornblith et al. 2019), computed per image over its tokens and averaged.

For image b and block l let X = out^l[b] be its N x C tokens, centred over the tokens (X - 1 mean(X)), and
K = X X^T its N x N Gram. Then

    CKA(p, q) = <K_p, K_q>_F / (|K_p|_F |K_q|_F)        (HSIC of the centred Grams, normalised)

which is Kornblith et al.'s linear CKA with the image's tokens as the examples. Choice made here: CKA is taken per
image (how similarly two blocks arrange *the tokens of one image*) and the per-image values are averaged, rather than
pooling every token of every image into one Gram; that streams in bounded memory, weighs each image equally like the
other per-block means, and does not mix token geometry across images. Invariant to rotating and to scaling either
block's features; 1 for identical token geometry up to those.
"""
from __future__ import annotations

import math

import torch

from .columns import CONSTANT
from .sums import ImageSums, reuse


class CkaAccumulator(ImageSums):
    """[L, L] mean per-image linear CKA between block outputs, streamed.

    Within a batch each block's centred token Gram (N x N per image) is stored in a [B, L, N*N] float32 buffer;
    ``end_batch`` takes all L x L inner products per image with one batched matmul (the buffer is kept for the next
    batch of the same shape until ``release``). Cost per block and
    image: one N x N x C matmul (the N x N form is the cheaper one while N < C, e.g. ViT-S: 197 tokens, 384 channels).
    Sums (float64): sum_cka, count [L, L] (images valid in both blocks). Images marked invalid are not counted, nor
    is a pair where an image's tokens are all equal in one block (their centred part under ``columns.CONSTANT`` of
    their norm: no geometry, CKA undefined).
    """

    _names = ("sum_cka", "count")

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.L = num_blocks
        self.sum_cka = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
        self.count = torch.zeros_like(self.sum_cka)
        self._buf: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None

    def add(self, block: int, feats: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Block output [B, N, C]; ``valid`` [B] bool marks the images to count (None: all)."""
        B, N, _ = feats.shape
        x = feats.float()
        if self._buf is None:
            self._on(x.device)
            self._buf = reuse(self._kept, (B, self.L, N * N), torch.float32, x.device)
            self._filled = [False] * self.L
            self._valid = torch.zeros(self.L, B, dtype=torch.bool, device=x.device)
        elif self._buf.shape[0] != B or self._buf.shape[2] != N * N:
            raise ValueError(f"block {block} has features {tuple(feats.shape)}, unlike the batch's earlier blocks")
        centred = x - x.mean(dim=1, keepdim=True)
        # computed contiguous, then copied into the strided slot: bmm(out=) into a strided view falls off the BLAS
        # path (measured 30x slower on the CPU for B=16, N=17, C=64)
        self._buf[:, block] = torch.bmm(centred, centred.transpose(1, 2)).reshape(B, N * N)
        gram = self._buf[:, block].view(B, N, N)
        # tokens equal within float32 rounding (centred part under CONSTANT of the norm) have no geometry to compare
        spread = gram.diagonal(dim1=1, dim2=2).sum(-1) > CONSTANT**2 * x.square().sum((1, 2))
        if valid is not None:
            gram[~valid] = 0
        self._valid[block] = spread if valid is None else spread & valid
        self._filled[block] = True

    def end_batch(self) -> None:
        if self._buf is None:
            return
        for blk in (b for b, f in enumerate(self._filled) if not f):  # a block that did not run adds 0
            self._buf[:, blk] = 0
        hsic = torch.bmm(self._buf, self._buf.transpose(1, 2))  # [B, L, L]
        norm = hsic.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # |K_l|_F
        v = self._valid.T  # [B, L]
        den = norm[:, :, None] * norm[:, None]
        both = v[:, :, None] & v[:, None]
        cka = hsic / torch.where(both, den, 1.0)
        self.sum_cka += torch.where(both, cka, 0.0).sum(0).double()
        self.count += both.sum(0).double()
        self._kept, self._buf = self._buf, None

    def release(self) -> None:
        """Free the buffer kept for the next batch."""
        self._kept = None

    def cka(self) -> torch.Tensor:
        """[L, L] mean per-image linear CKA (NaN for pairs never seen together)."""
        out = self.sum_cka.cpu() / self.count.cpu()
        return torch.where(self.count.cpu() > 0, out, math.nan)
