"""Models that drop input tokens at random in every forward (HF ViT-MAE): masking off while probing, then restored.

    patches = masking_patches(model)     # Patch objects for ``capture`` to apply and undo
    notes = masking_notes(model)         # what was switched, for ``ModelInfo.adjustments``

ViT-MAE's embeddings keep ``int(N * (1 - config.mask_ratio))`` patches in the order of ``argsort(noise)`` with fresh
random noise (75 % dropped, shuffled). While probing, ``mask_ratio`` is 0 and, when the caller passes no ``noise``,
increasing noise is passed, so HF's own ``random_masking`` keeps every patch in image order: two probes of one model
give identical maps, equal to HF's attentions for the same (no) masking. Both are restored on exit.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapters import Patch


def _maskers(model: nn.Module) -> list[nn.Module]:
    """Modules with HF's ``random_masking`` and a ``config.mask_ratio`` (even 0: the patches are still shuffled)."""
    out = []
    for m in model.modules():
        ratio = getattr(getattr(m, "config", None), "mask_ratio", None)
        if callable(getattr(m, "random_masking", None)) and isinstance(ratio, (int, float)):
            out.append(m)
    return out


class Unmasked(Patch):
    """``config.mask_ratio = 0`` and image-order noise for one ViT-MAE embeddings module; ``undo`` restores both."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.ratio, self.own = module, None, None

    def _in_order(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def random_masking(sequence: torch.Tensor, noise: torch.Tensor | None = None) -> Any:
            if noise is None:  # increasing noise: argsort keeps the patches in image order
                b, n = sequence.shape[:2]
                noise = torch.arange(n, device=sequence.device, dtype=torch.float32).expand(b, n)
            return original(sequence, noise)
        return random_masking

    def apply(self) -> None:
        config = self.module.config
        self.ratio = config.mask_ratio
        config.mask_ratio = 0.0
        self.own = self.module.__dict__.get("random_masking")  # an instance attribute, if someone set one
        self.module.random_masking = self._in_order(self.module.random_masking)

    def undo(self) -> None:
        if self.ratio is not None:
            self.module.config.mask_ratio = self.ratio
            self.ratio = None
        self.module.__dict__.pop("random_masking", None)
        if self.own is not None:
            self.module.random_masking, self.own = self.own, None


def masking_patches(model: nn.Module) -> list[Patch]:
    """One ``Unmasked`` patch per masking module of ``model`` (none for models that do not mask)."""
    return [Unmasked(m) for m in _maskers(model)]


def masking_notes(model: nn.Module) -> list[str]:
    """What ``masking_patches`` switches, in words."""
    def as_saved(ratio: float) -> str:
        return f"drops {ratio:.0%} of the patches at random" if ratio > 0 else "shuffles the patches at random"

    return [f"random masking off while probing: {type(m).__name__} config.mask_ratio {m.config.mask_ratio:g} set to 0 "
            "and every patch kept in image order (restored afterwards; as saved, the model "
            f"{as_saved(m.config.mask_ratio)} in each forward)" for m in _maskers(model)]
