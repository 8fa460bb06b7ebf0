"""collapse-probe: measure attention collapse in Vision Transformers (DeepViT, Zhou et al. 2021).

    >>> import torch, collapse_probe as cp
    >>> result = cp.probe("checkpoints/vit_micro_d4.safetensors", "builtin:digits", num_images=8, progress=False)
    >>> result.applied_kind, len(result.attention["probs"].blocks)
    ('probs', 4)
    >>> loaded = cp.load_model("checkpoints/deepvit_micro_d4.safetensors")   # every safety check applies
    >>> with cp.capture(loaded.model) as cap:
    ...     _ = loaded.model(torch.randn(2, 3, 32, 32))
    >>> cap.maps["blocks.0.attn.probs"].shape                                  # [B, H, N, N]
    torch.Size([2, 4, 65, 65])

The public API is below; everything is imported on first use, so ``collapse-probe --help`` starts without torch.
``import collapse_probe.models`` registers our architectures with timm (``load_model`` and ``probe`` do it for you).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BadArgumentError,
    CollapseProbeError,
    MalformedFileError,
    RefusedContentError,
    UnsupportedLayoutError,
    UnsupportedModelError,
)

_LAZY = {
    "load_model": "collapse_probe.loading.build",
    "probe": "collapse_probe.probing.checked",
    "capture": "collapse_probe.hooks.capture",
    "ProbeResult": "collapse_probe.probing.result",
    "AttentionStats": "collapse_probe.probing.result",
    "FeatureStats": "collapse_probe.probing.result",
    "ModelInfo": "collapse_probe.loading.info",
    "ImageInfo": "collapse_probe.loading.info",
    "LoadedModel": "collapse_probe.loading.info",
    "judge": "collapse_probe.probing.verdict",
    "Criterion": "collapse_probe.probing.blocks",
    "CollapseMonitor": "collapse_probe.probing.monitor",
}

__all__ = ["__version__", "load_model", "probe", "capture", "judge", "Criterion", "CollapseMonitor", "ProbeResult",
           "AttentionStats", "FeatureStats", "ModelInfo", "ImageInfo", "LoadedModel", "CollapseProbeError",
           "BadArgumentError", "RefusedContentError", "MalformedFileError", "UnsupportedLayoutError",
           "UnsupportedModelError"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names below are resolved lazily
    from .hooks.capture import capture
    from .loading.build import load_model
    from .loading.info import ImageInfo, LoadedModel, ModelInfo
    from .probing.blocks import Criterion
    from .probing.checked import probe
    from .probing.monitor import CollapseMonitor
    from .probing.result import AttentionStats, FeatureStats, ProbeResult
    from .probing.verdict import judge


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in ("models", "loading", "hooks", "metrics", "probing", "reports", "plots", "train"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'collapse_probe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
