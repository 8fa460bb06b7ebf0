"""Fig. 8-style panels: mean attention map of every block, and the learned Re-attention Theta of every block.

    axes = plot_attention_maps(mean_maps, title="vit_micro_d16: self-attention")   # one panel per block
    axes = plot_theta(theta_weights)                                                # one H x H heatmap per block
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes

from .data import MeanMaps, ThetaWeights
from .style import new_figure, styled


def _grid(n: int, ncols: int, panel: float, extra_w: float = 0.0, title: bool = False) -> np.ndarray:
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    fig = new_figure((cols * panel + extra_w, rows * panel + (0.35 if title else 0.0)))
    return np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())


@styled
def plot_attention_maps(maps: MeanMaps, title: str | None = None, ncols: int = 8, panel: float = 1.45,
                        shared_scale: bool = True, axes: Sequence[Axes] | None = None) -> np.ndarray:
    """One panel per block: the head- and batch-averaged map [N, N] (rows = queries, columns = keys).

    ``shared_scale``: one colour scale (min..max over all blocks, with a colour bar), so that near-identical maps
    look identical; False scales each panel to its own range (shows patterns, exaggerates small differences).
    Extra axes of a given grid are hidden. Returns the axes used, one per block.
    """
    n = len(maps.blocks)
    grid = _grid(n, ncols, panel, extra_w=0.8 if shared_scale else 0.0, title=bool(title)) if axes is None \
        else np.asarray(axes).ravel()
    if len(grid) < n:
        raise ValueError(f"need {n} axes for {n} blocks, got {len(grid)}")
    lims = {"vmin": float(np.nanmin(maps.maps)), "vmax": float(np.nanmax(maps.maps))} if shared_scale else {}
    im = None
    for i, ax in enumerate(grid):
        if i >= n:
            ax.set_visible(False)
            continue
        im = ax.imshow(maps.maps[i], cmap="viridis", interpolation="nearest", **lims)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        ax.set_title(f"block {maps.blocks[i] + 1}", fontsize=8, pad=2)
    if shared_scale and im is not None:
        grid[0].figure.colorbar(im, ax=list(grid[:n]), shrink=0.8, label="mean attention")
    if title and axes is None:
        grid[0].figure.suptitle(title)
    return grid[:n]


@styled
def plot_theta(theta: ThetaWeights, title: str | None = None, ncols: int = 8, panel: float = 1.45,
               axes: Sequence[Axes] | None = None) -> np.ndarray:
    """One H x H heatmap per Re-attention block (row = output head, column = input head); one symmetric colour
    scale for all blocks (diverging, 0 = white) with a shared colour bar."""
    n = len(theta.blocks)
    grid = _grid(n, ncols, panel, extra_w=0.8, title=bool(title)) if axes is None else np.asarray(axes).ravel()
    if len(grid) < n:
        raise ValueError(f"need {n} axes for {n} blocks, got {len(grid)}")
    vmax = float(np.nanmax(np.abs(theta.weight))) or 1.0
    im = None
    h = theta.weight.shape[1]
    for i, ax in enumerate(grid):
        if i >= n:
            ax.set_visible(False)
            continue
        im = ax.imshow(theta.weight[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ticks = list(range(h)) if h <= 6 else list(range(0, h, max(1, h // 4)))
        ax.set_xticks(ticks, [str(t) for t in ticks] if i >= n - min(n, ncols) else [])
        ax.set_yticks(ticks, [str(t) for t in ticks] if i % ncols == 0 else [])
        ax.tick_params(labelsize=6, length=2)
        ax.grid(False)
        ax.set_title(f"block {theta.blocks[i] + 1}", fontsize=8, pad=2)
    fig = grid[0].figure
    if im is not None:
        fig.colorbar(im, ax=list(grid[:n]), shrink=0.8, label="Θ weight")
        grid[0].set_ylabel("output head", fontsize=7)
        grid[(n - 1) // ncols * ncols].set_xlabel("input head", fontsize=7)  # bottom-left panel
    if title and axes is None:
        fig.suptitle(title)
    return grid[:n]
