"""Paper presets and small CPU presets, registered with timm (``timm.create_model(name, **overrides)``).

| name                       | blocks | dim | heads | Re-attention      | stem  | input |
|----------------------------|--------|-----|-------|-------------------|-------|-------|
| vit_16b / 24b / 32b        | 16/24/32 | 384 | 12  | none              | patch | 224   |
| deepvit_16b / 24b / 32b    | 16/24/32 | 384 | 12  | all blocks        | patch | 224   |
| deepvit_s                  | 16     | 396 | 12    | last 5, scale d^-0.5, residual x2 | conv | 224 |
| deepvit_l                  | 32     | 420 | 12    | last 12, residual x2 | conv | 224 |
| vit_micro / deepvit_micro  | 8      | 64  | 4     | none / all        | patch 4 | 32  |

No preset has downloadable weights: ``pretrained=True`` is an error, never a download.
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .vit import DeepVisionTransformer

__all__ = ["PAPER_PRESETS", "create"]


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # DeepViT normalises inputs with mean = std = 0.5 (official configs).
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


_MICRO = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear")
default_cfgs = generate_default_cfgs({
    "vit_16b": _cfg(), "vit_24b": _cfg(), "vit_32b": _cfg(),
    "deepvit_16b": _cfg(), "deepvit_24b": _cfg(), "deepvit_32b": _cfg(),
    "deepvit_s": _cfg(first_conv="patch_embed.proj.0"), "deepvit_l": _cfg(first_conv="patch_embed.proj.0"),
    "vit_micro": _cfg(**_MICRO), "deepvit_micro": _cfg(**_MICRO),
})

_B = dict(patch_size=16, embed_dim=384, num_heads=12, mlp_ratio=3.0, qkv_bias=True)
_S = dict(patch_size=16, num_heads=12, mlp_ratio=3.0, qkv_bias=True, stem="conv", res_scale=2.0)
_MICRO_ARGS = dict(img_size=32, patch_size=4, embed_dim=64, num_heads=4, mlp_ratio=2.0, num_classes=10, depth=8)
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "vit_16b": dict(_B, depth=16), "vit_24b": dict(_B, depth=24), "vit_32b": dict(_B, depth=32),
    "deepvit_16b": dict(_B, depth=16, reattn_blocks="all"),
    "deepvit_24b": dict(_B, depth=24, reattn_blocks="all"),
    "deepvit_32b": dict(_B, depth=32, reattn_blocks="all"),
    "deepvit_s": dict(_S, depth=16, embed_dim=396, reattn_blocks=5, reattn_scale="head_dim"),
    "deepvit_l": dict(_S, depth=32, embed_dim=420, reattn_blocks=12),
    "vit_micro": dict(_MICRO_ARGS), "deepvit_micro": dict(_MICRO_ARGS, reattn_blocks="all"),
}


def create(variant: str, pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    """Build preset ``variant`` with ``kwargs`` overriding its arguments, recorded in ``model.collapse_probe_args``."""
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights (collapse-probe never downloads); load a checkpoint")
    args = {**PAPER_PRESETS[variant], **kwargs}
    model = build_model_with_cfg(DeepVisionTransformer, variant, pretrained=False, **args)
    model.collapse_probe_args = {"architecture": variant, "model_args": args}
    return model


@register_model
def vit_16b(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("vit_16b", pretrained, **kwargs)


@register_model
def vit_24b(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("vit_24b", pretrained, **kwargs)


@register_model
def vit_32b(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("vit_32b", pretrained, **kwargs)


@register_model
def deepvit_16b(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("deepvit_16b", pretrained, **kwargs)


@register_model
def deepvit_24b(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("deepvit_24b", pretrained, **kwargs)


@register_model
def deepvit_32b(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("deepvit_32b", pretrained, **kwargs)


@register_model
def deepvit_s(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("deepvit_s", pretrained, **kwargs)


@register_model
def deepvit_l(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("deepvit_l", pretrained, **kwargs)


@register_model
def vit_micro(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("vit_micro", pretrained, **kwargs)


@register_model
def deepvit_micro(pretrained: bool = False, **kwargs: Any) -> DeepVisionTransformer:
    return create("deepvit_micro", pretrained, **kwargs)
