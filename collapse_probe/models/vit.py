"""ViT and DeepViT built on timm's VisionTransformer, registered in timm's model registry.

    >>> import timm, collapse_probe.models                 # importing the package registers the presets
    >>> with torch.device("meta"):                          # shapes only: no memory for 48M parameters
    ...     len(timm.create_model("deepvit_32b").reattn_block_indices)    # 32 blocks, all with Re-attention
    32
    >>> timm.create_model("deepvit_micro", depth=16).patch_embed.num_patches   # 32 px CPU preset (digits)
    64

Only the blocks, the optional convolutional stem and the Re-attention options are ours; patch/position embeddings,
pooling, heads, weight init, ``no_weight_decay`` and ``forward_intermediates`` are timm's. Parameter names match timm's
ViT (``blocks.0.attn.qkv.weight`` ...), plus ``attn.theta`` and ``attn.mix_norm`` in Re-attention blocks.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed
from timm.models import VisionTransformer
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn

from .attention import Attention, AttentionShare, MixNorm, ThetaInit


class Block(nn.Module):
    """Pre-norm transformer block: x + s * attn(norm1(x / s)), then the same for the MLP.

    ``res_scale`` s = 2 reproduces DeepViT-S/L, whose official code multiplies the block input by 0.5 before the norm
    and divides the branch output by 0.5. Takes exactly the arguments timm's VisionTransformer passes; the ones this
    block does not implement (q/k norm, scale norms, projection without bias, another attention layer) are accepted
    only at their default values and otherwise fail loudly, so a model never claims an option it ignores.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        res_scale: float = 1.0,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        attn_layer: Any = None,
        depth: int | None = None,  # the block's index, which timm passes for its own blocks; unused here
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        unsupported = {k: v for k, v in dict(qk_norm=qk_norm, scale_attn_norm=scale_attn_norm,
                                               scale_mlp_norm=scale_mlp_norm, proj_bias=not proj_bias).items() if v}
        if attn_layer not in (None, "attn", TimmAttention):
            unsupported["attn_layer"] = attn_layer
        if unsupported:
            names = ", ".join(f"{k}={v if k != 'proj_bias' else False}" for k, v in unsupported.items())
            raise ValueError(f"collapse_probe's ViT/DeepViT block does not implement {names}; leave the default")
        self.res_scale = res_scale
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("collapse_probe's attention takes no mask (every token attends to every token)")
        s = self.res_scale
        if s == 1.0:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x / s)))) * s
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x / s)))) * s


class ConvStemEmbed(PatchEmbed):
    """DeepViT-S/L patch stem: 7x7/2 conv (64) + BN + ReLU, 3x3 conv (64) + BN + ReLU, (p/2)x(p/2)/(p/2) conv to dim.

    Same overall stride as a p x p patch embedding, so token grid and position embeddings are unchanged.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, stem_chs: int = 64, **kwargs: Any):
        kwargs.pop("bias", None)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        if self.patch_size[0] != self.patch_size[1] or self.patch_size[0] % 2:
            raise ValueError(f"the conv stem needs an even square patch size, got {self.patch_size}")
        k = self.patch_size[0] // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_chs, stem_chs, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_chs, embed_dim, k, stride=k),
        )


def resolve_reattn_blocks(spec: str | int | Sequence[int] | None, depth: int) -> list[int]:
    """Which blocks use Re-attention: "all", None/"none", an int k (the last k blocks) or explicit 0-based indices."""
    if spec is None or spec == "none":
        return []
    if spec == "all":
        return list(range(depth))
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 <= spec <= depth:
            raise ValueError(f"reattn_blocks={spec} must be between 0 and depth={depth}")
        return list(range(depth - spec, depth))
    if isinstance(spec, str):
        raise ValueError(f"reattn_blocks must be 'all', 'none', an int or a list of indices, got {spec!r}")
    idx = sorted({int(i) for i in spec})
    if idx and not (0 <= idx[0] and idx[-1] < depth):
        raise ValueError(f"reattn_blocks {idx} out of range for depth {depth}")
    return idx


class DeepVisionTransformer(VisionTransformer):
    """timm's VisionTransformer with our probe-able blocks and optional Re-attention.

    Args (on top of timm's):
        reattn_blocks: "all", "none", k (the last k blocks) or a list of 0-based block indices.
        mix_norm, theta_init, reattn_scale: see ``Attention``; ``reattn_scale="head_dim"`` means head_dim ** -0.5.
        res_scale: residual branch scale (2.0 in DeepViT-S/L).
        stem: "patch" (one p x p conv) or "conv" (the DeepViT-S/L three-conv stem).

    Paper baselines (default off; off means the model computes exactly what it did without them):
        attn_reuse_from: block b; every later block multiplies its V by block b's attention map (Q, K of those
            blocks go unused).
        attn_temperature: (first, last) softmax temperatures; block l uses first + (last - first) * l / (depth - 1).
        attn_drop_max: random attention dropping with a rate rising linearly from 0 (block 0) to this (last block).
    """

    def __init__(
        self,
        reattn_blocks: str | int | Sequence[int] | None = "none",
        mix_norm: MixNorm = "bn",
        theta_init: ThetaInit = "random",
        reattn_scale: float | str = 1.0,
        res_scale: float = 1.0,
        stem: str = "patch",
        attn_reuse_from: int | None = None,
        attn_temperature: Sequence[float] | None = None,
        attn_drop_max: float | None = None,
        **kwargs: Any,
    ) -> None:
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(
            block_fn=partial(Block, res_scale=res_scale),
            embed_layer=ConvStemEmbed if stem == "conv" else PatchEmbed,
            **kwargs,
        )
        depth = len(self.blocks)
        self.reattn_block_indices = resolve_reattn_blocks(reattn_blocks, depth)
        for i in self.reattn_block_indices:
            old = self.blocks[i].attn
            head_dim = old.head_dim
            scale = head_dim**-0.5 if reattn_scale == "head_dim" else float(reattn_scale)
            new = Attention(
                old.qkv.in_features,
                num_heads=old.num_heads,
                qkv_bias=old.qkv.bias is not None,
                attn_drop=old.attn_drop.p,
                proj_drop=old.proj_drop.p,
                reattention=True,
                mix_norm=mix_norm,
                theta_init=theta_init,
                reattn_scale=scale,
            )
            new.load_state_dict(old.state_dict(), strict=False)  # keep timm's initialisation of qkv/proj
            self.blocks[i].attn = new
        self._set_baselines(attn_reuse_from, attn_temperature, attn_drop_max)

    def _set_baselines(self, reuse_from: int | None, temperature: Sequence[float] | None,
                       drop_max: float | None) -> None:
        attns = [blk.attn for blk in self.blocks]
        depth = len(attns)
        if reuse_from is not None:
            if not 0 <= int(reuse_from) < depth - 1:
                raise ValueError(f"attn_reuse_from={reuse_from} must be a block index below the last ({depth - 1})")
            share = AttentionShare()
            attns[reuse_from].share = share
            for a in attns[reuse_from + 1:]:
                a.reuse = share
        if temperature is not None:
            t0, t1 = (float(t) for t in temperature)
            if min(t0, t1) <= 0:
                raise ValueError(f"attn_temperature must be positive, got {temperature}")
            for i, a in enumerate(attns):
                a.temperature = t0 + (t1 - t0) * i / max(depth - 1, 1)
        if drop_max is not None:
            if not 0.0 <= drop_max < 1.0:
                raise ValueError(f"attn_drop_max must be in [0, 1), got {drop_max}")
            for i, a in enumerate(attns):
                a.attn_drop.p = drop_max * i / max(depth - 1, 1)
