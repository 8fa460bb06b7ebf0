"""DeepViT checkpoints without our metadata: the official layout (zhoudaquan/dvit_repo) and our own bare state dicts.

    sd = to_ours(state_dict)                    # official key names -> ours (a no-op for any other layout)
    spec = infer_deepvit(sd, num_heads=None)    # ArchSpec for one of our presets, shapes read from the weights
    spec = infer_deepvit(sd, name="deepvit_S")  # an official registered name decides what the weights cannot show
    official = to_official(model.state_dict())  # ours -> official key names (round trips, exports)

Official layout (see /work/shared/paper-notes.md, "Official checkpoint layout"): Re-attention blocks hold
``blocks.N.attn.reatten_matrix.{weight,bias}`` (Θ as Conv2d(H, H, 1)) and ``blocks.N.attn.var_norm.*``
(BatchNorm2d(H)); DeepViT-S/L have the CNN stem ``patch_embed.conv1/bn1/conv2/bn2/proj``. Ours are ``attn.theta``,
``attn.mix_norm`` and ``patch_embed.proj.{0,1,3,4,6}`` (one nn.Sequential), with the same tensors in the same order.

What the weights show: depth, width, heads (Θ is [H, H, 1, 1]), MLP ratio, which blocks have Re-attention, stem,
patch and image size (pos_embed), classes. What they cannot show: ``scale_adjustment`` (0.5 in S and L: our
``res_scale`` 2) and ``transform_scale`` (S only: our ``reattn_scale="head_dim"``). Those come from a registered name
(``--model``, a training file's ``arch``) or, without one, from the S / L fingerprint: width 396 / 420, or the
16-block last-5 / 32-block last-12 Re-attention pattern of a CNN-stem model. A CNN-stem model matching neither is
refused rather than guessed (exit 5), because a wrong scale silently changes every Re-attention map.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedLayoutError
from .heads import SD, ArchSpec, decide_heads

LAYOUT = "official DeepViT (zhoudaquan/dvit_repo): keys renamed to collapse-probe's"


@dataclass(frozen=True)
class Variant:
    """What one official registered name fixes beyond the shapes; ``preset`` is our equivalent."""

    preset: str
    conv_stem: bool
    scale_adjustment: float  # official: x + f(norm(x * s)) / s; ours: res_scale = 1 / s
    transform_scale: bool  # official: Re-attention maps times head_dim ** -0.5; ours: reattn_scale="head_dim"
    depth: int
    dim: int
    reattn_last: int  # Re-attention in the last k blocks
    img_size: int = 224


OFFICIAL: dict[str, Variant] = {
    "deepvit_patch16_224_re_attn_16b": Variant("deepvit_16b", False, 1.0, False, 16, 384, 16),
    "deepvit_patch16_224_re_attn_24b": Variant("deepvit_24b", False, 1.0, False, 24, 384, 24),
    "deepvit_patch16_224_re_attn_32b": Variant("deepvit_32b", False, 1.0, False, 32, 384, 32),
    "deepvit_S": Variant("deepvit_s", True, 0.5, True, 16, 396, 5),
    "deepvit_L": Variant("deepvit_l", True, 0.5, False, 32, 420, 12),
    "deepvit_L_384": Variant("deepvit_l", True, 0.5, False, 32, 420, 12, 384),
}
# the official CNN stem's modules -> their index in our ConvStemEmbed's nn.Sequential (2 and 5 are ReLUs)
_STEM = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "proj": "6"}
_REATTN_OFFICIAL = re.compile(r"blocks\.(\d+)\.attn\.reatten_matrix\.weight$")
_REATTN_OURS = re.compile(r"blocks\.(\d+)\.attn\.theta\.weight$")


def official_variant(name: str | None) -> Variant | None:
    """The official variant registered as ``name`` (case-sensitive, as the official repository spells it)."""
    return OFFICIAL.get(name) if isinstance(name, str) else None


def is_official(sd: SD) -> bool:
    """Whether the keys are the official DeepViT layout (a Re-attention matrix or the official CNN stem)."""
    return "blocks.0.attn.qkv.weight" in sd and (
        "patch_embed.conv1.weight" in sd or any(_REATTN_OFFICIAL.match(k) for k in sd))


def is_ours(sd: SD) -> bool:
    """Whether the keys are our DeepViT layout with something timm's ViT lacks (Θ or the CNN stem)."""
    return "blocks.0.attn.qkv.weight" in sd and (
        "patch_embed.proj.0.weight" in sd or any(_REATTN_OURS.match(k) for k in sd))


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if old in key:
            return key.replace(old, new, 1)
    return key


def to_ours(sd: SD) -> SD:
    """Official key names -> ours; any other layout is returned unchanged (the same dict)."""
    if not is_official(sd):
        return sd
    conv = "patch_embed.conv1.weight" in sd
    # proj first: in the CNN stem it is the last conv (index 6); with the plain 16x16 stem it keeps its name
    stem = [(f"patch_embed.{o}.", f"patch_embed.proj.{i}.") for o, i in _STEM.items()] if conv else []
    table = stem + [(".attn.reatten_matrix.", ".attn.theta."), (".attn.var_norm.", ".attn.mix_norm.")]
    return {_rename(k, table): v for k, v in sd.items()}


def to_official(sd: SD) -> SD:
    """Our key names -> the official ones; refuses what the official model cannot hold (no Θ bias, LayerNorm mix)."""
    if any(k.endswith(".attn.mix_norm.norm.weight") for k in sd) or any(
            _REATTN_OURS.match(k) and k.replace(".weight", ".bias") not in sd for k in sd):
        raise UnsupportedLayoutError("the official DeepViT layout has Θ with bias and BatchNorm over heads; this model "
                                     "uses another Re-attention variant")
    conv = "patch_embed.proj.0.weight" in sd
    stem = [(f"patch_embed.proj.{i}.", f"patch_embed.{o}.") for o, i in _STEM.items()] if conv else []
    table = stem + [(".attn.theta.", ".attn.reatten_matrix."), (".attn.mix_norm.", ".attn.var_norm.")]
    return {_rename(k, table): v for k, v in sd.items()}


def _depth(sd: SD) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _fingerprint(conv: bool, dim: int, depth: int, reattn: list[int]) -> tuple[str, Variant] | None:
    """The official variant a CNN-stem (S / L) or plain-stem (16B / 24B / 32B) model's shapes identify, or None."""
    def last(k: int) -> bool:
        return reattn == list(range(depth - k, depth))

    if conv:
        if dim == 396 or (dim != 420 and depth == 16 and last(5)):
            return "deepvit_S", OFFICIAL["deepvit_S"]
        if dim == 420 or (depth == 32 and last(12)):
            return "deepvit_L", OFFICIAL["deepvit_L"]
        return None
    # plain stem: the 16B / 24B / 32B family, whose scales are the defaults at any depth
    name = f"deepvit_patch16_224_re_attn_{depth}b"
    return name if name in OFFICIAL else "deepvit_patch16_224_re_attn_16b", OFFICIAL.get(name, OFFICIAL[
        "deepvit_patch16_224_re_attn_16b"])


def _shapes(sd: SD) -> dict[str, Any]:
    """Shape arguments of our DeepVisionTransformer read from our-layout keys."""
    dim = int(sd["blocks.0.attn.qkv.weight"].shape[1])
    conv = "patch_embed.proj.0.weight" in sd
    proj = sd["patch_embed.proj.6.weight" if conv else "patch_embed.proj.weight"]
    patch = int(proj.shape[-1]) * (2 if conv else 1)  # the CNN stem's first conv has stride 2
    chans = int(sd["patch_embed.proj.0.weight" if conv else "patch_embed.proj.weight"].shape[1])
    tokens = int(sd["pos_embed"].shape[1]) if "pos_embed" in sd else 0
    grid = math.isqrt(max(tokens - 1, 0))
    if "cls_token" not in sd or grid * grid != tokens - 1 or grid == 0:
        raise UnsupportedLayoutError("DeepViT-like checkpoint without a class token and a square pos_embed grid; "
                                     "pass --model NAME")
    head = sd.get("head.weight")
    return dict(embed_dim=dim, depth=_depth(sd), patch_size=patch, in_chans=chans, img_size=grid * patch,
                mlp_ratio=int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / dim, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else 0,
                stem="conv" if conv else "patch")


def _mix_norm(sd: SD, block: int) -> str:
    pre = f"blocks.{block}.attn.mix_norm."
    return "bn" if f"{pre}running_mean" in sd else "ln" if f"{pre}norm.weight" in sd else "none"


def infer_deepvit(sd: SD, num_heads: int | None = None, name: str | None = None) -> ArchSpec:
    """Our DeepViT preset and arguments for a state dict in our layout (``to_ours`` first for an official file).

    ``name``: an official registered name whose scales apply (else the S / L fingerprint decides, see the module).
    """
    try:
        kw = _shapes(sd)
        theta = {int(m.group(1)): sd[k] for k in sd if (m := _REATTN_OURS.match(k))}
    except KeyError as e:
        raise UnsupportedLayoutError(f"partly recognised DeepViT layout, but key {e} is missing; pass --model NAME") \
            from None
    reattn = sorted(theta)
    evidence = None
    if reattn:
        shape = tuple(theta[reattn[0]].shape)
        evidence = (int(shape[0]), f"re-attention matrix Θ shape {shape} (block {reattn[0]})")
    heads, source = decide_heads(kw["embed_dim"], evidence, num_heads, kw["mlp_ratio"])
    notes: list[str] = []
    found = (name, OFFICIAL[name]) if name in OFFICIAL else _fingerprint(kw["stem"] == "conv", kw["embed_dim"],
                                                                          kw["depth"], reattn)
    if found is None:
        raise UnsupportedLayoutError(
            f"DeepViT with the CNN stem, width {kw['embed_dim']}, {kw['depth']} blocks: neither DeepViT-S nor -L, so "
            "the Re-attention scale (transform_scale) cannot be read from the weights; pass --model deepvit_S or "
            "--model deepvit_L")
    official, var = found
    notes.append(f"scales of official {official}: scale_adjustment {var.scale_adjustment}, transform_scale "
                 f"{var.transform_scale} ({'--model / arch' if name in OFFICIAL else 'from the shapes'})")
    if (kw["depth"], kw["embed_dim"], kw["img_size"]) != (var.depth, var.dim, var.img_size) or reattn != list(
            range(var.depth - var.reattn_last, var.depth)):
        notes.append(f"shapes differ from the registered {official}: built from the weights' shapes")
    kw.update(num_heads=heads, reattn_blocks=reattn, res_scale=1.0 / var.scale_adjustment,
              reattn_scale="head_dim" if var.transform_scale else 1.0)
    if reattn:
        kw["mix_norm"] = _mix_norm(sd, reattn[0])
    return ArchSpec("timm", var.preset, kw, heads, source, (kw["in_chans"], kw["img_size"], kw["img_size"]), notes)
