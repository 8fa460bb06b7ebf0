"""What the callbacks send to loggers: the similarity heatmap as an RGB image, and the loggers that take images.

    img = heatmap_image(measurement.similarity)          # [H, W, 3] uint8, one 8x8-pixel cell per pair of blocks
    sent = add_image(logger.experiment, "collapse/similarity", img, step)   # TensorBoard SummaryWriter: True

The heatmap is drawn straight through a matplotlib colormap (no figure, no pyplot): cheap enough to log at every
measurement. Colour scale fixed at [0, 1] (viridis, values clipped; NaN grey) so images of different steps compare.
"""
from __future__ import annotations

from typing import Any

import numpy as np

CELL = 8  # pixels per block pair: a 12-block heatmap is 96 x 96 px, visible without zooming
NAN_GREY = (128, 128, 128)


def heatmap_image(similarity: np.ndarray, cell: int = CELL) -> np.ndarray:
    """[L, L] similarity -> [L * cell, L * cell, 3] uint8 RGB image, block 1 top left (row = block, column = block)."""
    from matplotlib import colormaps

    s = np.asarray(similarity, dtype=float)
    rgb = (colormaps["viridis"](np.clip(np.nan_to_num(s, nan=0.0), 0.0, 1.0))[..., :3] * 255).round().astype(np.uint8)
    rgb[~np.isfinite(s)] = NAN_GREY
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)


def add_image(target: Any, tag: str, image: np.ndarray, step: int) -> bool:
    """Send ``image`` [H, W, 3] to ``target`` if it takes images: a TensorBoard ``SummaryWriter`` (``add_image``), or a
    Lightning logger with ``log_image`` (W&B, Neptune). Returns whether it was sent."""
    if callable(getattr(target, "add_image", None)):
        target.add_image(tag, image, step, dataformats="HWC")
        return True
    if callable(getattr(target, "log_image", None)):
        target.log_image(key=tag, images=[image], step=step)
        return True
    return False
