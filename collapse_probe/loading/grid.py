"""A named timm model whose default patch grid differs from the file's: built at the file's grid.

    extra, note = fit_grid("vit_small_patch14_reg4_dinov2", state_dict, make)   # make(**kw) -> the named model
    model = make(**extra)          # e.g. extra = {"img_size": 56}; note says what was chosen and why

A DINOv2 file saved at 56 px holds a 4x4 position embedding; ``vit_small_patch14_reg4_dinov2`` is built for 518 px
(37x37). Two ways fit: resample the file's embedding to 37x37 (``timm.layers.resample_abs_pos_embed``), or build the
model at the file's grid (``img_size=56``). Only the second gives the maps of the model as it was saved: resampling
interpolates new position vectors and probes 1369 patches the saved model never had. So the model is built at the
file's grid, the embedding is loaded as saved, and the note (``ModelInfo.adjustments``, shown in every report) says
so. Everything else the name fixes (e.g. EVA-02's rotary ``ref_feat_shape``) stays the name's.

The file's grid is read from ``pos_embed`` (patch tokens = length minus the prefix tokens the model puts in it: none
with ``no_embed_class``, else class + distillation + register tokens), else from BEiT's relative-position table
((2W - 1)^2 + 3 rows). Non-square grids are left to the shape comparison, which names the mismatch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .heads import SD, square_side

_TABLES = ("blocks.0.attn.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table")


def file_grid(model: nn.Module, sd: SD) -> tuple[int, int] | None:
    """The patch grid the file's position embedding (or relative-position table) was saved for, if readable."""
    expected = model.state_dict()
    pos, mine = sd.get("pos_embed"), expected.get("pos_embed")
    if pos is not None and mine is not None and pos.ndim == 3 and mine.ndim == 3 and pos.shape[-1] == mine.shape[-1]:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        side = square_side(int(pos.shape[1]) - prefix)
        return (side, side) if side else None
    for key in _TABLES:
        table, mine = sd.get(key), expected.get(key)
        if table is not None and mine is not None and table.ndim == 2 and table.shape[1] == mine.shape[1]:
            side = square_side(int(table.shape[0]) - 3)
            return ((side + 1) // 2,) * 2 if side and side % 2 else None
    return None


def fit_grid(name: str, sd: SD, make: Callable[..., nn.Module]) -> tuple[dict[str, Any], str | None]:
    """Extra arguments for ``make`` so the model is built at the file's patch grid (none when they agree), and a
    note on what was chosen; ``make(**kw)`` builds the named model (called here on the meta device only)."""
    with torch.device("meta"):
        meta = make()
    pe = getattr(meta, "patch_embed", None)
    default, patch = getattr(pe, "grid_size", None), getattr(pe, "patch_size", None)
    grid = file_grid(meta, sd) if default is not None and patch is not None else None
    if grid is None or tuple(grid) == tuple(default):
        return {}, None
    img = (grid[0] * patch[0], grid[1] * patch[1])
    size = img[0] if img[0] == img[1] else img
    note = (f"built at the file's {grid[0]}x{grid[1]} patch grid (img_size {size}): {name} defaults to "
            f"{default[0]}x{default[1]} ({default[0] * patch[0]} px); the position embedding is loaded as saved, not "
            "resampled, so the maps are the saved model's at its own size")
    return {"img_size": size}, note
