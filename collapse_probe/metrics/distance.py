"""Mean attention distance (Dosovitskiy et al. 2021, Fig. 7): how far, in patches, each head looks.

For the patch tokens of a square g x g patch grid (tokens N = prefix + g^2; the prefix tokens, i.e. class,
distillation and register tokens, come first), query i at grid position (r_i, c_i) has distance

    d_i = sum_j A_ij |(r_i, c_i) - (r_j, c_j)|      over the patch keys j (Euclidean, in patch units)

The attention a query pays to prefix keys has no position: it adds nothing and is not renormalised away (so a head
attending only to the class token has distance 0), as in the usual implementations. d is averaged over the patch
queries of an image, then over images, per block and head [L, H]; the block mean [L] averages the heads. Only for
row-stochastic maps ("probs") and for grids of at least 8 x 8 (smaller grids leave too few distances to tell local
from global heads); otherwise a reason is stated instead of a number.
"""
from __future__ import annotations

import math

import torch

from .sums import ImageSums

MIN_GRID = 8


def patch_grid(tokens: int, prefix: int | None) -> tuple[int | None, str | None]:
    """(grid side g, None) when ``tokens`` = ``prefix`` + g^2 with g >= 8, else (None, the reason)."""
    if prefix is None:
        return None, "the model's prefix-token count is unknown (pass prefix_tokens)"
    patches = tokens - prefix
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        return None, f"{tokens} tokens less {prefix} prefix tokens leave {patches}, not a square patch grid"
    if side < MIN_GRID:
        return None, f"patch grid {side}x{side} is under {MIN_GRID}x{MIN_GRID}"
    return side, None


def distance_weights(tokens: int, prefix: int, side: int, device: torch.device | None = None) -> torch.Tensor:
    """[N, N] float32: Euclidean distance between the grid positions of patch tokens i and j (row-major), 0 in the
    prefix rows and columns, divided by g^2 so that <A[b, h], W> is the mean over patch queries."""
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    d = torch.cdist(pos.double(), pos.double())
    w = torch.zeros(tokens, tokens, dtype=torch.float64)
    w[prefix:, prefix:] = d / side**2
    return w.float().to(device)


class DistanceAccumulator(ImageSums):
    """Mean attention distance per block and head, streamed: one matrix-vector product per map.

    Sums (float64): sum_dist [L, H] over valid images of each image's mean distance; images [L]. ``note`` is the
    reason no distance is measured (set from the first map's token count), else None.
    """

    _names = ("sum_dist", "images")

    def __init__(self, num_blocks: int, num_heads: int, prefix_tokens: int | None) -> None:
        super().__init__()
        self.prefix = prefix_tokens
        self.sum_dist = torch.zeros(num_blocks, num_heads, dtype=torch.float64)
        self.images = torch.zeros(num_blocks, dtype=torch.float64)
        self.note: str | None = None
        self._w: torch.Tensor | None = None

    def add(self, block: int, attn: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Block ``block``'s maps [B, H, N, N]; ``valid`` [B] bool marks the images to count (None: all)."""
        B, H, N, _ = attn.shape
        if self._w is None or self._w.shape[0] != N:
            side, self.note = patch_grid(N, self.prefix)
            if side is None:
                return
            self._w = distance_weights(N, self.prefix, side, attn.device).reshape(N * N)
            self._on(attn.device)
        elif self.note is not None:
            return
        d = (attn.float().reshape(B * H, N * N) @ self._w).view(B, H)  # mean distance per (b, h)
        if valid is not None:
            d = torch.where(valid[:, None], d, 0.0)
        self.sum_dist[block] += d.sum(0)
        self.images[block] += B if valid is None else valid.sum()

    def end_batch(self) -> None:
        """Nothing is held between blocks (kept for the accumulators' common call sequence)."""

    def heads(self) -> torch.Tensor:
        """[L, H] mean distance in patches per block and head."""
        return self.sum_dist.cpu() / self.images.cpu()[:, None]

    def mean(self) -> torch.Tensor:
        """[L] mean distance in patches per block (mean over heads)."""
        return self.heads().mean(1)
