"""vit-pytorch models from the shapes of their state dicts: ViT, DeepViT, CaiT, SimpleViT, T2TViT and CrossViT (and
the ViT of the library's 2020 / early-2021 code, ``loading.vitpytorch_legacy``).

    spec = infer_vit_pytorch(state_dict, num_heads=None)   # ArchSpec, or None when the keys are not vit-pytorch's
    model = build_vit_pytorch(spec)                        # random init; the weights are loaded afterwards

What the weights cannot show, and what is assumed then (each said in ``ArchSpec.notes`` or, when it changes the maps,
``ArchSpec.adjustments``):
  heads       ``to_qkv`` holds heads x dim_head columns for any split: the library's default head size 64 is
              assumed (a guess; ``--num-heads`` overrides, evidence such as DeepViT's Θ wins)
  pooling     'cls' assumed (ViT, T2TViT)
  SimpleViT   its sin-cos position embedding is computed from ``image_size`` and never saved: the multiple of the
              patch size nearest 224 px is assumed
  T2TViT      the tokens-to-token strides are not saved: vit-pytorch's default ((7, 4), (3, 2), (3, 2)) is assumed
              when the kernels read from the weights are 7, 3, 3 (else refused); the image size is the one those
              strides map to the saved position-embedding grid
  CrossViT    three head counts (small branch, large branch, cross-attention), none visible: the default head size
              64 is assumed for all three (``--num-heads`` cannot say which one it means: refused)
"""
from __future__ import annotations

import itertools
import re
from typing import Any

from torch import nn

from ..errors import BadArgumentError, UnsupportedLayoutError
from .heads import DEFAULT_HEAD, SD, ArchSpec, layer_count, square_side, vit_pytorch_heads  # noqa: F401
from .vitpytorch_legacy import build_legacy_vit, infer_legacy_vit

T2T_DEFAULT = ((7, 4), (3, 2), (3, 2))  # vit-pytorch T2TViT's default t2t_layers: (kernel, stride)
_POOL_NOTE = "vit-pytorch pooling cannot be read from weights: 'cls' assumed"
_heads = vit_pytorch_heads


def _patch(patch_dim: int) -> tuple[int, int]:
    """(channels, patch size) from a flattened patch's length c * p * p (3 channels when that is square, else 1)."""
    chans = 3 if patch_dim % 3 == 0 and square_side(patch_dim // 3) else 1
    p = square_side(patch_dim // chans)
    if p is None:
        raise UnsupportedLayoutError(f"vit-pytorch patch embedding of width {patch_dim} is not channels x p x p")
    return chans, p


def _transformer(sd: SD, pre: str, num_heads: int | None) -> dict[str, Any]:
    """depth, heads, dim_head, mlp_dim of a vit-pytorch ``Transformer`` under ``pre`` (``to_qkv`` fused)."""
    inner = int(sd[f"{pre}layers.0.0.to_qkv.weight"].shape[0]) // 3
    heads, source = _heads(inner, None, num_heads)
    return {"depth": layer_count(sd, re.escape(pre) + r"layers\.(\d+)\."), "heads": heads, "dim_head": inner // heads,
            "mlp_dim": int(sd[f"{pre}layers.0.1.net.1.weight"].shape[0]), "heads_source": source}


def _vit(sd: SD, num_heads: int | None) -> ArchSpec:
    dim, patch_dim = (int(s) for s in sd["to_patch_embedding.2.weight"].shape)
    chans, p = _patch(patch_dim)
    cait = any(k.startswith("patch_transformer.") for k in sd)
    tokens = int(sd["pos_embedding"].shape[-2])
    grid = square_side(tokens if cait else tokens - 1)
    if grid is None:
        raise UnsupportedLayoutError("vit-pytorch model with an unreadable grid; pass --model NAME")
    if cait:
        pre, name = "patch_transformer.layers.", "CaiT"
        inner = int(sd[f"{pre}0.0.fn.to_q.weight"].shape[0])
        mix = sd[f"{pre}0.0.fn.mix_heads_pre_attn"]
        evidence = (int(mix.shape[0]), f"talking-heads matrix shape {tuple(mix.shape)}")
        mlp = int(sd[f"{pre}0.1.fn.net.1.weight"].shape[0])
    else:
        pre = "transformer.layers."
        inner = int(sd[f"{pre}0.0.to_qkv.weight"].shape[0]) // 3
        mlp = int(sd[f"{pre}0.1.net.1.weight"].shape[0])
        reattn = sd.get(f"{pre}0.0.reattn_weights")
        name = "DeepViT" if reattn is not None else "ViT"
        evidence = (int(reattn.shape[0]), f"re-attention matrix shape {tuple(reattn.shape)}") if reattn is not None \
            else None
    heads, source = _heads(inner, evidence, num_heads)
    head = sd.get("mlp_head.weight", sd.get("mlp_head.1.weight"))
    kw: dict[str, Any] = {"image_size": grid * p, "patch_size": p, "num_classes": int(head.shape[0]) if head is not
                          None else 0, "dim": dim, "depth": layer_count(sd, re.escape(pre) + r"(\d+)\."),
                          "heads": heads, "mlp_dim": mlp, "dim_head": inner // heads}
    if cait:
        kw["cls_depth"] = layer_count(sd, r"cls_transformer\.layers\.(\d+)\.")
    else:
        kw["channels"] = chans
    return ArchSpec("vit-pytorch", name, kw, heads, source, (chans, grid * p, grid * p),
                    [_POOL_NOTE] if not cait else [])


def _simple_vit(sd: SD, num_heads: int | None) -> ArchSpec:
    dim, patch_dim = (int(s) for s in sd["to_patch_embedding.2.weight"].shape)
    chans, p = _patch(patch_dim)
    t = _transformer(sd, "transformer.", num_heads)
    size = p * max(1, round(224 / p))
    kw = {"image_size": size, "patch_size": p, "num_classes": int(sd["linear_head.weight"].shape[0]), "dim": dim,
          "channels": chans, **{k: t[k] for k in ("depth", "heads", "mlp_dim", "dim_head")}}
    assumed = (f"image size {size} px assumed (a guess): SimpleViT computes its sin-cos position embedding from "
               f"image_size and does not save it; these are the maps of a {size // p}x{size // p} patch grid")
    return ArchSpec("vit-pytorch", "SimpleViT", kw, t["heads"], t["heads_source"], (chans, size, size),
                    adjustments=[assumed])


def _unfold(size: int, layers: tuple[tuple[int, int], ...]) -> int:
    """T2TViT's output grid side for an input side (``conv_output_size`` per layer, padding stride // 2)."""
    for k, s in layers:
        size = int((size - k + 2 * (s // 2)) / s + 1)
    return size


def _t2t(sd: SD, num_heads: int | None) -> ArchSpec:
    linears = [int(m.group(1)) for k, v in sd.items() if (m := re.fullmatch(r"to_patch_embedding\.(\d+)\.weight", k))
               and v.ndim == 2]
    if not linears:
        raise UnsupportedLayoutError("T2TViT-like checkpoint without the final patch projection "
                                     "(to_patch_embedding.N.weight); pass the whole state dict")
    last = max(linears)
    n_layers = last // 4
    dims = [int(sd[f"to_patch_embedding.{4 * i + 3}.layers.0.0.to_qkv.weight"].shape[1]) for i in range(n_layers - 1)]
    dims.append(int(sd[f"to_patch_embedding.{last}.weight"].shape[1]))
    chans = 3 if dims[0] % 3 == 0 and square_side(dims[0] // 3) else 1
    kernels = [square_side(dims[0] // chans)] + [square_side(b // a) if b % a == 0 else None
                                                 for a, b in itertools.pairwise(dims)]
    if tuple(kernels) != tuple(k for k, _ in T2T_DEFAULT):
        raise UnsupportedLayoutError(f"T2TViT with tokens-to-token kernels {kernels}: its strides are not stored in "
                                     "the weights (only vit-pytorch's default t2t_layers are read); build the model "
                                     "in Python and pass it to collapse_probe.probe")
    grid = square_side(int(sd["pos_embedding"].shape[1]) - 1)
    if grid is None:
        raise UnsupportedLayoutError(f"T2TViT pos_embedding {tuple(sd['pos_embedding'].shape)} is not a class token "
                                     "plus a square grid")
    stride = 1
    for _, s in T2T_DEFAULT:
        stride *= s
    sizes = [s for s in range(max(1, (grid - 1) * stride), (grid + 1) * stride + 1) if _unfold(s, T2T_DEFAULT) == grid]
    if not sizes:
        raise UnsupportedLayoutError(f"no image size maps to T2TViT's {grid}x{grid} grid through the default strides")
    size = grid * stride if grid * stride in sizes else sizes[0]
    t = _transformer(sd, "transformer.", num_heads)
    dim = int(sd[f"to_patch_embedding.{last}.weight"].shape[0])
    kw = {"image_size": size, "num_classes": int(sd["mlp_head.weight"].shape[0]), "dim": dim, "channels": chans,
          "t2t_layers": T2T_DEFAULT, **{k: t[k] for k in ("depth", "heads", "mlp_dim", "dim_head")}}
    assumed = (f"image size {size} px assumed: T2TViT does not store it, and {sizes[0]}-{sizes[-1]} px all give the "
               f"file's {grid}x{grid} grid through the default strides; tokens-to-token strides (4, 2, 2) assumed "
               "(vit-pytorch's default; the kernels 7, 3, 3 read from the weights match it)")
    return ArchSpec("vit-pytorch", "T2TViT", kw, t["heads"], t["heads_source"], (chans, size, size), [_POOL_NOTE],
                    adjustments=[assumed])


def _cross_vit(sd: SD, num_heads: int | None) -> ArchSpec:
    if num_heads is not None:
        raise BadArgumentError("--num-heads cannot describe a CrossViT: it has three head counts (small branch, large "
                               "branch, cross-attention)")
    enc = "multi_scale_encoder.layers.0."
    kw: dict[str, Any] = {"depth": layer_count(sd, r"multi_scale_encoder\.layers\.(\d+)\."),
                          "num_classes": int(sd["sm_mlp_head.1.weight"].shape[0])}
    sizes, chans = set(), set()
    for branch, idx in (("sm", "0"), ("lg", "1")):
        pos = sd[f"{branch}_image_embedder.pos_embedding"]
        c, p = _patch(int(sd[f"{branch}_image_embedder.to_patch_embedding.1.weight"].shape[0]))
        grid = square_side(int(pos.shape[1]) - 1)
        if grid is None:
            raise UnsupportedLayoutError(f"CrossViT {branch} pos_embedding {tuple(pos.shape)} is not a class token "
                                         "plus a square grid")
        sizes.add(grid * p)
        chans.add(c)
        inner = int(sd[f"{enc}{idx}.layers.0.0.to_q.weight"].shape[0])
        heads, _ = _heads(inner, None, None)
        kw.update({f"{branch}_dim": int(pos.shape[-1]), f"{branch}_patch_size": p,
                   f"{branch}_enc_depth": layer_count(sd, re.escape(f"{enc}{idx}.layers.") + r"(\d+)\."),
                   f"{branch}_enc_heads": heads, f"{branch}_enc_dim_head": inner // heads,
                   f"{branch}_enc_mlp_dim": int(sd[f"{enc}{idx}.layers.0.1.net.1.weight"].shape[0])})
    if len(sizes) != 1 or len(chans) != 1:
        raise UnsupportedLayoutError(f"CrossViT branches disagree on the image size ({sorted(sizes)} px) or channels")
    inner = int(sd[f"{enc}2.layers.0.0.fn.to_q.weight"].shape[0])
    heads, source = _heads(inner, None, None)
    size, c = sizes.pop(), chans.pop()
    kw.update(image_size=size, channels=c, cross_attn_depth=layer_count(sd, re.escape(f"{enc}2.layers.") + r"(\d+)\."),
              cross_attn_heads=heads, cross_attn_dim_head=inner // heads)
    probed = "sm" if kw["sm_enc_depth"] > kw["lg_enc_depth"] else "lg"  # as hooks.selection picks
    return ArchSpec("vit-pytorch", "CrossViT", kw, kw[f"{probed}_enc_heads"],
                    source.replace("(dim_head)", "(dim_head) for both branches and the cross-attention"),
                    (c, size, size))


def infer_vit_pytorch(sd: SD, num_heads: int | None = None) -> ArchSpec | None:
    """The vit-pytorch model ``sd`` was saved from, or None when its keys are no vit-pytorch layout we know (the
    library's 2020 / early-2021 ViT layouts: ``loading.vitpytorch_legacy``)."""
    legacy = infer_legacy_vit(sd, num_heads)
    if legacy is not None:
        return legacy
    if "to_patch_embedding.2.weight" in sd and "pos_embedding" in sd:
        return _vit(sd, num_heads)
    if "to_patch_embedding.2.weight" in sd and "linear_head.weight" in sd:
        return _simple_vit(sd, num_heads)
    if "pos_embedding" in sd and "cls_token" in sd and "to_patch_embedding.3.layers.0.0.to_qkv.weight" in sd:
        return _t2t(sd, num_heads)
    if "sm_image_embedder.pos_embedding" in sd and "lg_image_embedder.pos_embedding" in sd:
        return _cross_vit(sd, num_heads)
    return None


def build_vit_pytorch(spec: ArchSpec) -> nn.Module:
    """A randomly initialised vit-pytorch model of ``spec.name`` with ``spec.kwargs``."""
    if spec.name in ("ViT-2020", "ViT-2021"):
        return build_legacy_vit(spec)
    import vit_pytorch
    from vit_pytorch.cait import CaiT
    from vit_pytorch.cross_vit import CrossViT
    from vit_pytorch.deepvit import DeepViT
    from vit_pytorch.simple_vit import SimpleViT
    from vit_pytorch.t2t import T2TViT

    classes = {"ViT": vit_pytorch.ViT, "DeepViT": DeepViT, "CaiT": CaiT, "SimpleViT": SimpleViT, "T2TViT": T2TViT,
               "CrossViT": CrossViT}
    return classes[spec.name](**spec.kwargs)
