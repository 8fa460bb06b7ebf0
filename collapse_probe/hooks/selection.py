"""Which of a model's attention modules are probed, when not all of them make one stack of equal-shaped maps.

    kept, notes = select(model, found)     # found: (raw path, module, plan) of every attention module, in order

Collapse compares each block's [B, H, N, N] map with the previous blocks', so every probed block must run on the same
tokens. Most ViTs have one such stack; these do not, and only their main stack is probed (the note says which blocks
and why the others were left out; it reaches ``ModelInfo.adjustments`` and every report):

  vit-pytorch T2TViT     the main ``transformer`` only; the tokens-to-token blocks inside ``to_patch_embedding`` each
                         run on their own token count (the image is re-tokenised at shrinking resolution)
  vit-pytorch CrossViT   the branch with more blocks (the large-patch one on a tie); the other branch runs on a
                         different token count, and the cross-attention layers have one class-token query
  HF ViTMAEForPreTraining  the encoder (``vit``); the pre-training decoder reconstructs masked patches

Models are recognised by class name and module, so neither library has to be importable.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from .adapters import Plan

Found = tuple[str, nn.Module, Plan]  # (raw module path, attention module, its plan)


def _is(m: nn.Module, module: str, name: str) -> bool:
    return type(m).__module__ == module and type(m).__name__ == name


def _under(path: str, prefix: str) -> bool:
    return path.startswith(prefix)


def _t2t(root: str, m: nn.Module, found: list[Found]) -> tuple[list[Found], str | None]:
    main = [f for f in found if _under(f[0], f"{root}transformer.")]
    left = [f for f in found if _under(f[0], f"{root}to_patch_embedding.")]
    if not left:
        return found, None
    tokens = int(m.pos_embedding.shape[1]) if hasattr(m, "pos_embedding") else None
    return [f for f in found if f not in left], (
        f"probed the main transformer's {len(main)} blocks ({root}transformer.layers"
        f"{f', {tokens} tokens' if tokens else ''}); left out the {len(left)} tokens-to-token block(s) in "
        f"{root}to_patch_embedding: each runs on its own token count (the image is re-tokenised at shrinking "
        "resolution), and collapse compares maps block to block")


_CROSS_BRANCH = re.compile(r"multi_scale_encoder\.layers\.\d+\.(\d)\.")


def _cross_vit(root: str, m: nn.Module, found: list[Found]) -> tuple[list[Found], str | None]:
    def part(path: str) -> str | None:
        hit = _CROSS_BRANCH.match(path[len(root):]) if _under(path, root) else None
        return {"0": "small", "1": "large", "2": "cross"}.get(hit.group(1)) if hit else None

    groups = {k: [f for f in found if part(f[0]) == k] for k in ("small", "large", "cross")}
    keep = "small" if len(groups["small"]) > len(groups["large"]) else "large"
    other = "large" if keep == "small" else "small"
    tokens = {"small": int(m.sm_image_embedder.pos_embedding.shape[1]),
              "large": int(m.lg_image_embedder.pos_embedding.shape[1])}
    index = "0" if keep == "small" else "1"
    kept = [f for f in found if part(f[0]) not in (other, "cross")]
    return kept, (f"probed the {keep}-patch branch's {len(groups[keep])} blocks ({tokens[keep]} tokens, "
                  f"{root}multi_scale_encoder.layers.*.{index}); left out the {other}-patch branch's "
                  f"{len(groups[other])} blocks ({tokens[other]} tokens: a different token count) and the "
                  f"{len(groups['cross'])} cross-attention layers (one class-token query: [B, H, 1, N] maps)")


def _mae_pretraining(root: str, _m: nn.Module, found: list[Found]) -> tuple[list[Found], str | None]:
    decoder = [f for f in found if _under(f[0], f"{root}decoder.")]
    if not decoder:
        return found, None
    return [f for f in found if f not in decoder], (
        f"probed the ViT-MAE encoder ({root}vit); left out the pre-training decoder's {len(decoder)} blocks, "
        "which reconstruct masked patches and are not part of the encoder")


RULES: tuple[tuple[str, str, Callable[[str, nn.Module, list[Found]], tuple[list[Found], str | None]]], ...] = (
    ("vit_pytorch.t2t", "T2TViT", _t2t),
    ("vit_pytorch.cross_vit", "CrossViT", _cross_vit),
    ("transformers.models.vit_mae.modeling_vit_mae", "ViTMAEForPreTraining", _mae_pretraining),
)


def select(model: nn.Module, found: list[Found]) -> tuple[list[Found], list[str]]:
    """(the attention modules to probe, one note per model whose stacks were narrowed down)."""
    notes: list[str] = []
    for path, m in model.named_modules():
        for module, name, rule in RULES:
            if _is(m, module, name):
                found, note = rule(f"{path}." if path else "", m, found)
                if note:
                    notes.append(note)
    return found, notes
