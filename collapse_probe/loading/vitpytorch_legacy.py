"""vit-pytorch ViT files saved by the library's 2020 and early-2021 code: recognised from the keys, rebuilt with that
code's own forward and softmax scale.

    spec = infer_legacy_vit(state_dict, num_heads=None)   # ArchSpec ("vit-pytorch", "ViT-2020" | "ViT-2021"), or None
    model = build_legacy_vit(spec)                        # random init, the file's key names; load the weights after

Facts read from the history of lucidrains/vit-pytorch (``vit_pytorch/vit_pytorch.py``, later ``vit.py``):
  until 2021-02-19   the patch projection is ``patch_to_embedding`` (a Linear after a rearrange in ``forward``);
                     from then on ``to_patch_embedding`` = Sequential(Rearrange, Linear): key ``to_patch_embedding.1``
                     (the patch LayerNorms of today's ``to_patch_embedding.{1,2,3}`` came only in 2023)
  until 2021-03-29   blocks are Residual(PreNorm(Attention)) and Residual(PreNorm(FeedForward)): keys
                     ``transformer.layers.N.0.fn.fn.to_qkv``, ``.0.fn.norm``; from then on PreNorm with the residual
                     added in ``Transformer.forward``: ``transformer.layers.N.0.fn.to_qkv``, ``.0.norm``
  until 2020-12-17   q, k, v are ``dim`` wide; afterwards ``heads x dim_head`` (dim_head 64 by default), so the
                     attention width may differ from the model width
  until 2021-01-21   the softmax scale is ``dim ** -0.5`` of the MODEL width; afterwards ``dim_head ** -0.5``
  until 2020-12-07   ``mlp_head`` = LayerNorm, Linear(dim, mlp_dim), GELU, Dropout, Linear(mlp_dim, classes) (keys
                     ``mlp_head.1``, ``mlp_head.4``); afterwards LayerNorm, Linear(dim, classes)
  always             a class token and a learned ``pos_embedding`` [1, patches + 1, dim]; no final LayerNorm after
                     the blocks; the FeedForward is Linear, GELU, Dropout, Linear, Dropout (keys ``net.0``, ``net.3``)

What the keys cannot show, and what is assumed (said in ``ArchSpec.notes`` / ``adjustments``): the head count
(``loading.vitpytorch``'s head-size-64 rule, a guess; ``--num-heads`` overrides), 'cls' pooling (mean pooling was an
option from 2020-12-23), square patches, and, for ``patch_to_embedding`` files, the scale ``dim ** -0.5``: files saved
between 2021-01-21 and 2021-02-19 used ``dim_head ** -0.5`` and give other maps (said in the adjustments).

The attention modules are vit-pytorch's own ``vit_pytorch.vit.Attention`` (same parameters; its input LayerNorm is
replaced by the old PreNorm's, which the file holds, and its scale set as above), so the vit-pytorch capture adapter
records their softmax output.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedLayoutError
from .heads import SD, ArchSpec, layer_count, square_side, vit_pytorch_heads

_POOL = "vit-pytorch pooling cannot be read from weights: 'cls' assumed (mean pooling was an option from 2020-12-23)"


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Patches(nn.Module):
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], channels innermost (einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)')."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        p = self.p
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)


class LegacyViT(nn.Module):
    """The vit-pytorch ViT of ``layout`` "2020" (``patch_to_embedding``) or "2021" (``to_patch_embedding.1``);
    ``residual``: Residual(PreNorm(...)) blocks (keys ``fn.fn``), else PreNorm with the residual outside."""

    def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int, heads: int,
                 dim_head: int, mlp_dim: int, channels: int = 3, layout: str = "2021", residual: bool = False,
                 scale: str = "dim_head", project_out: bool = True, head_hidden: int | None = None) -> None:
        from vit_pytorch.vit import Attention

        super().__init__()
        grid = image_size // patch_size
        self.image_size, self.patch_size, self.residual = image_size, patch_size, residual
        if layout == "2020":
            self.patches, self.patch_to_embedding = _Patches(patch_size), nn.Linear(channels * patch_size ** 2, dim)
        else:
            self.to_patch_embedding = nn.Sequential(_Patches(patch_size), nn.Linear(channels * patch_size ** 2, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        layers = []
        for _ in range(depth):
            attn = Attention(dim, heads=heads, dim_head=dim_head)
            attn.norm = nn.Identity()  # the old code normalised in PreNorm, whose LayerNorm the file holds
            attn.scale = dim ** -0.5 if scale == "dim" else dim_head ** -0.5
            if not project_out:
                attn.to_out = nn.Identity()
            pair = [_PreNorm(dim, attn), _PreNorm(dim, _FeedForward(dim, mlp_dim))]
            layers.append(nn.ModuleList([_Residual(m) for m in pair] if residual else pair))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(layers)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes)) if head_hidden is None else \
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, head_hidden), nn.GELU(), nn.Dropout(0.0),
                          nn.Linear(head_hidden, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "patch_to_embedding"):
            x = self.patch_to_embedding(self.patches(img))
        else:
            x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_embedding[:, :n + 1]
        for attn, ff in self.transformer.layers:
            x = attn(x) if self.residual else attn(x) + x
            x = ff(x) if self.residual else ff(x) + x
        return self.mlp_head(x[:, 0])


def is_legacy(sd: SD) -> bool:
    """Whether ``sd`` has the keys of a 2020 / early-2021 vit-pytorch ViT."""
    if any("reattn" in k for k in sd):  # an old DeepViT: not this ViT (its Re-attention would be left out)
        return False
    return "pos_embedding" in sd and "cls_token" in sd and (
        "patch_to_embedding.weight" in sd or ("to_patch_embedding.1.weight" in sd and (
            "transformer.layers.0.0.fn.to_qkv.weight" in sd or "transformer.layers.0.0.fn.fn.to_qkv.weight" in sd)))


def infer_legacy_vit(sd: SD, num_heads: int | None = None) -> ArchSpec | None:
    """The old vit-pytorch ViT ``sd`` was saved from (shapes and layout read from the keys), or None."""
    if not is_legacy(sd):
        return None
    layout = "2020" if "patch_to_embedding.weight" in sd else "2021"
    residual = "transformer.layers.0.0.fn.fn.to_qkv.weight" in sd
    a, f = ("transformer.layers.0.0.fn.fn.", "transformer.layers.0.1.fn.fn.") if residual else \
        ("transformer.layers.0.0.fn.", "transformer.layers.0.1.fn.")
    try:
        dim, patch_dim = (int(s) for s in sd["patch_to_embedding.weight" if layout == "2020" else
                                             "to_patch_embedding.1.weight"].shape)
        inner = int(sd[f"{a}to_qkv.weight"].shape[0]) // 3
        mlp = int(sd[f"{f}net.0.weight"].shape[0])
        classes = int(sd["mlp_head.4.weight" if "mlp_head.4.weight" in sd else "mlp_head.1.weight"].shape[0])
    except KeyError as e:
        raise UnsupportedLayoutError(f"partly recognised vit-pytorch {layout} layout, but key {e} is missing; pass "
                                     "your model's code with --model-code FILE.py --model NAME") from None
    chans = 3 if patch_dim % 3 == 0 and square_side(patch_dim // 3) else 1
    p, grid = square_side(patch_dim // chans), square_side(int(sd["pos_embedding"].shape[1]) - 1)
    if p is None or grid is None:
        raise UnsupportedLayoutError(f"vit-pytorch {layout} layout with a patch of {patch_dim} values or "
                                     f"pos_embedding {tuple(sd['pos_embedding'].shape)}: not square patches on a "
                                     "square grid; pass your model's code with --model-code FILE.py --model NAME")
    heads, source = vit_pytorch_heads(inner, None, num_heads)
    scale = "dim" if layout == "2020" else "dim_head"
    kw: dict[str, Any] = {"image_size": grid * p, "patch_size": p, "num_classes": classes, "dim": dim,
                          "depth": layer_count(sd, r"transformer\.layers\.(\d+)\."), "heads": heads,
                          "dim_head": inner // heads, "mlp_dim": mlp, "channels": chans, "layout": layout,
                          "residual": residual, "scale": scale, "project_out": f"{a}to_out.0.weight" in sd,
                          "head_hidden": int(sd["mlp_head.1.weight"].shape[0]) if "mlp_head.4.weight" in sd else None}
    when = "2020 to 2021-02-19" if layout == "2020" else "2021-02-19 to 2021-03-29" if residual else \
        "2021-03-29 to 2023"
    patch = "patch_to_embedding" if layout == "2020" else "to_patch_embedding.1"
    notes = [f"vit-pytorch ViT of the library's {when} code ({patch}, "
             f"{'Residual(PreNorm(...))' if residual else 'PreNorm'} blocks, no patch or final LayerNorm)", _POOL]
    adjustments = []
    if scale == "dim":
        adjustments.append(f"softmax scale dim ** -0.5 of the model width ({dim}), as vit-pytorch's code until "
                           "2021-01-21; files saved from then until 2021-02-19 used dim_head ** -0.5 and have other "
                           "maps")
    return ArchSpec("vit-pytorch", f"ViT-{layout}", kw, heads, source, (chans, grid * p, grid * p), notes,
                    adjustments)


def build_legacy_vit(spec: ArchSpec) -> nn.Module:
    return LegacyViT(**spec.kwargs)

