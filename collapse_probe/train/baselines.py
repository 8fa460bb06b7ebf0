"""Paper baselines as training options, and the cosine-similarity regulariser of the official DeepViT code.

    model_args = baseline_model_args(cfg)          # attention reuse / temperature / dropping -> model keyword arguments
    reg = CosineRegularizer(model, weight=0.1, pairs=12)
    loss = criterion(model(x), y) + reg.loss()     # reg.loss() uses the maps of the forward just run

The baselines themselves live in the model (``DeepVisionTransformer(attn_reuse_from=, attn_temperature=,
attn_drop_max=)``) so that a saved checkpoint rebuilds the same model from its metadata.

Regulariser (paper-notes.md): weight x the mean, over the first ``pairs`` consecutive block pairs (l, l+1), of the
cosine similarity between their maps taken along the head axis (one cosine per batch item and map entry, averaged).
The maps are the ones that multiply V: Re-attention output ("mixed") where a block has it, else the softmax ("probs").
The paper does not say whether the pair terms are summed or averaged; we average, so ``weight`` bounds the term.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import Attention
from .config import TrainConfig


def baseline_model_args(cfg: TrainConfig) -> dict[str, Any]:
    """The model keyword arguments for the baselines switched on in ``cfg`` (empty when none is)."""
    args: dict[str, Any] = {}
    if cfg.attn_reuse_from is not None:
        args["attn_reuse_from"] = int(cfg.attn_reuse_from)
    if cfg.attn_temperature is not None:
        args["attn_temperature"] = [float(t) for t in cfg.attn_temperature]
    if cfg.attn_drop_max is not None:
        args["attn_drop_max"] = float(cfg.attn_drop_max)
    return args


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class CosineRegularizer:
    """Keeps (with gradients) the maps of the first ``pairs + 1`` attention modules of each forward.

    Hooks stay registered for the regulariser's lifetime (so a compiled model is not re-traced every step); call
    ``remove()`` when done. Shapes: each map [B, H, N, N]; ``loss()`` -> scalar.
    """

    def __init__(self, model: nn.Module, weight: float = 0.1, pairs: int = 12) -> None:
        self.weight = weight
        attns = [m for m in _unwrap(model).modules() if isinstance(m, Attention)]
        if len(attns) < 2:
            raise ValueError("the cosine regulariser needs a model with at least two of our attention blocks")
        self.n = min(pairs + 1, len(attns))
        self.maps: list[torch.Tensor | None] = [None] * self.n
        self.handles = []
        for i, a in enumerate(attns[:self.n]):
            # a block that reuses an earlier map passes it through ``probs`` and never reaches ``mixed``
            point = a.mixed if a.reattention and a.reuse is None else a.probs
            self.handles.append(point.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            self.maps[i] = output
        return hook

    def loss(self) -> torch.Tensor:
        """weight x mean over pairs of mean_{b,i,j} cos_h(A_l[b,:,i,j], A_{l+1}[b,:,i,j]); clears the stored maps."""
        maps, self.maps = self.maps, [None] * self.n
        if any(m is None for m in maps):
            raise RuntimeError("CosineRegularizer.loss() called before a forward pass")
        terms = [F.cosine_similarity(maps[i].float(), maps[i + 1].float(), dim=1, eps=1e-8).mean()
                 for i in range(self.n - 1)]
        return self.weight * torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
