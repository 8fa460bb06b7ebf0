"""How many heads a ViT has, when fused qkv weights cannot show it: the heads rule, written once.

    spec = ArchSpec("timm", "vit_small_patch16_224", {...}, *decide_heads(384, head_evidence(sd, 384), None, 4.0))

``head_evidence`` finds a per-head shape anywhere in a state dict; ``decide_heads`` applies the rule (evidence, then
``--num-heads``, then known families, then the width table, each guess labelled ``GUESS``); ``ArchSpec`` is what
shape inference (``infer``, ``official``, ``vitpytorch``) hands to ``build.instantiate``; ``layer_count`` and
``square_side`` are the two shape readings every inference needs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BadArgumentError, UnsupportedLayoutError

# width -> heads of published ViT/DeiT/BEiT/EVA/SigLIP/DINOv2 sizes (tiny, small, base, large, so400m, huge, giant, ...)
STANDARD_HEADS = {192: 3, 256: 4, 320: 5, 384: 6, 512: 8, 640: 10, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16,
                  1536: 24, 1664: 16}


SD = dict[str, torch.Tensor]


@dataclass
class ArchSpec:
    """What to build: ``family`` is "timm", "torchvision" or "vit-pytorch"; ``name`` a timm name or class name."""

    family: str
    name: str
    kwargs: dict[str, Any]
    heads: int
    heads_source: str
    input_size: tuple[int, int, int] = (3, 224, 224)
    notes: list[str] = field(default_factory=list)
    adjustments: list[str] = field(default_factory=list)  # assumptions that change the maps (ModelInfo.adjustments)

    @property
    def architecture(self) -> str:
        """A readable name: the class built plus the shape arguments read from the weights."""
        keys = ("embed_dim", "dim", "hidden_dim", "sm_dim", "lg_dim", "depth", "num_layers", "num_heads", "heads",
                "patch_size", "img_size", "image_size")
        shape = ", ".join(f"{k}={self.kwargs[k]}" for k in keys if k in self.kwargs)
        base = {"vit_base_patch16_224": "timm:VisionTransformer", "deit_base_distilled_patch16_224":
                "timm:VisionTransformerDistilled", "beit_base_patch16_224": "timm:Beit",
                "cait_xxs24_224": "timm:Cait"}.get(self.name, self.name)
        return f"{base if self.family == 'timm' else f'{self.family}:{self.name}'}({shape})"


def layer_count(sd: SD, pattern: str) -> int:
    """1 + the largest index that ``pattern`` (a regex with one group, matched at the key's start) finds; 0: none."""
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def square_side(n: int) -> int | None:
    """The side of a square of ``n`` cells, or None when ``n`` is not a positive square."""
    r = math.isqrt(max(n, 0))
    return r if r * r == n and r > 0 else None


# (width, MLP ratio) -> (heads, family): published configurations where the width alone would mislead
KNOWN_FAMILIES = {(384, 3.0): (12, "the DeepViT paper's ViT/DeepViT-16B/24B/32B"), (384, 4.0): (6, "timm/DeiT ViT-S")}


GUESS = "a guess: the file has no per-head weights; pass --num-heads N if the model was trained otherwise"


def decide_heads(dim: int, evidence: tuple[int, str] | None, num_heads: int | None,
                 mlp_ratio: float | None = None) -> tuple[int, str]:
    """(heads, source) by the heads rule above; ``evidence`` = (heads, what shape showed it) or None.

    >>> decide_heads(384, None, None, 3.0)[0], decide_heads(384, None, None, 4.0)[0]
    (12, 6)
    """
    if evidence is not None:
        heads, what = evidence
        if num_heads is not None and num_heads != heads:
            raise BadArgumentError(f"--num-heads {num_heads} contradicts the checkpoint: {what} says {heads} heads")
        return heads, what
    if num_heads is not None:
        if num_heads < 1 or dim % num_heads:
            raise BadArgumentError(f"--num-heads {num_heads} does not divide the attention width {dim}")
        return num_heads, "--num-heads"
    if mlp_ratio is not None and (dim, round(mlp_ratio, 4)) in KNOWN_FAMILIES:
        heads, family = KNOWN_FAMILIES[(dim, round(mlp_ratio, 4))]
        return heads, f"known family: {family} (width {dim}, MLP ratio {mlp_ratio:g}); {GUESS}"
    if dim in STANDARD_HEADS:
        return STANDARD_HEADS[dim], f"standard width->heads table (width {dim}); {GUESS}"
    # no guess beyond the table: a wrong head count still loads (fused qkv fits any) and silently skews every map
    raise UnsupportedLayoutError(f"cannot tell the number of heads of width {dim} (not a standard ViT width, and the "
                                 f"file has no per-head weights); pass --num-heads N (N one of {head_choices(dim)}), "
                                 "or --model NAME")


def head_choices(dim: int) -> str:
    """The head counts that divide an attention width, for error messages (head size at least 8 when possible).

    >>> head_choices(200)
    '1, 2, 4, 5, 8, 10, 20, 25'
    """
    divisors = [h for h in range(1, dim + 1) if dim % h == 0]
    usual = [h for h in divisors if dim // h >= 8] or divisors
    return ", ".join(map(str, usual))


DEFAULT_HEAD = 64  # vit-pytorch's default dim_head


def vit_pytorch_heads(inner: int, evidence: tuple[int, str] | None, num_heads: int | None) -> tuple[int, str]:
    """The heads rule for vit-pytorch files: evidence, then --num-heads, then its default head size 64 (a guess)."""
    if evidence is None and num_heads is None and inner % DEFAULT_HEAD == 0:
        return inner // DEFAULT_HEAD, f"vit-pytorch default head size {DEFAULT_HEAD} (dim_head); {GUESS}"
    return decide_heads(inner, evidence, num_heads)


_SQUARE_MIX = re.compile(r"(?:^|\.)attn\.(theta|reatten_matrix|proj_l|proj_w)\.weight$")


def head_evidence(sd: SD, attn_dim: int) -> tuple[int, str] | None:
    """(heads, what showed it) from every per-head shape in ``sd``, or None; shapes that disagree are an error.

    Square head-mixing matrices: Θ (ours ``attn.theta``, official ``attn.reatten_matrix``: [H, H, 1, 1]) and timm
    CaiT's talking heads (``attn.proj_l`` / ``proj_w``: [H, H]); relative-position tables [R, H]; q/k norms only when
    per head ([head_dim] smaller than the attention width; a full-width norm says nothing).
    """
    found: dict[int, str] = {}
    for k, v in sd.items():
        shape = tuple(v.shape)
        if _SQUARE_MIX.search(k) and v.ndim in (2, 4) and shape[0] == shape[1] and shape[2:] in ((), (1, 1)):
            found.setdefault(shape[0], f"{'re-attention' if 'proj' not in k else 'talking-heads'} matrix shape "
                                       f"{shape} ({k})")
        elif k.endswith("relative_position_bias_table") and v.ndim == 2:
            found.setdefault(shape[1], f"relative-position table shape {shape} ({k})")
        elif k.endswith("rel_pos.mlp.fc2.weight") and v.ndim == 2:  # timm vit_relpos: an MLP emits one bias per head
            found.setdefault(shape[0], f"relative-position MLP output shape {shape} ({k})")
        elif re.search(r"attn\.[qk]_norm\.weight$", k) and v.ndim == 1 and 0 < shape[0] < attn_dim \
                and attn_dim % shape[0] == 0:
            found.setdefault(attn_dim // shape[0], f"q/k-norm shape (head size {shape[0]}, {k})")
    if len(found) > 1:
        raise UnsupportedLayoutError("per-head weights disagree on the number of heads: " + "; ".join(
            f"{h} from {w}" for h, w in found.items()) + "; pass --model NAME")
    return next(iter(found.items())) if found else None
