"""The verdict's evidence drawn per block: the paper's cosine beside its uncorrelated floor, the centred and row-wise
similarities, entropy, rank-1 residual and token over-smoothing, each with the untrained twin grey dashed.

    axes = plot_measures_figure(result)            # result probed with baseline=True for the twin curves
    ax = plot_block_measure(result, "pearson_prev", ax=None)

Blocks are numbered from 1. Shaded bands are 95 % bootstrap intervals over images where the result kept per-image
values. Entropy is a property of the softmax maps, so for Re-attention models it is drawn for kind "probs".
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes

from ..probing.blocks import BlockView, Criterion
from ..probing.result import ProbeResult
from .data import pick_kind
from .style import axes_or_new, block_axis, legend_below, new_figure, styled

PANELS = (("sim_prev", "paper's cosine (Eq. 3) with previous; dotted: its floor"),
          ("pearson_prev", "centred similarity (Pearson) with previous"),
          ("row_cosine_prev", "row cosine with previous"),
          ("entropy", "entropy / log N (softmax maps)"),
          ("rank1_residual", "rank-1 residual (0: rows alike)"),
          ("token_uniformity", "token uniformity (block output)"))
FEATURE_KEYS = ("token_uniformity", "feature_residual")


def _series(result: ProbeResult, kind: str, key: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(block numbers, values, extras: low / high / twin / floor where they exist) of one measure."""
    if key in FEATURE_KEYS:
        f = result.features
        if f is None:
            return np.array([]), np.array([]), {}
        extra = {}
        tf = result.baseline.features if result.baseline is not None else None
        if tf is not None:
            extra["twin"] = np.asarray(getattr(tf, key, None) if key != "feature_residual" else tf.residual, float)
        vals = f.residual if key == "feature_residual" else getattr(f, key, None)
        vals = np.full(len(f.blocks), math.nan) if vals is None else vals
        return np.asarray(f.blocks) + 1, np.asarray(vals, float), extra
    if key == "entropy" and "probs" in result.attention:
        kind = "probs"
    view = BlockView.of(result, kind, Criterion.of(result))
    extra = {name: d[key] for name, d in (("low", view.low), ("high", view.high), ("twin", view.twin)) if key in d}
    if key == "sim_prev":
        extra["floor"] = view.values["floor_prev"]
    return np.asarray(view.blocks) + 1, view.values[key], extra


@styled
def plot_block_measure(result: ProbeResult, key: str, kind: str = "auto", title: str | None = None,
                       ax: Axes | None = None) -> Axes:
    """One per-block measure (a ``probing.blocks`` row key) of ``result`` and, grey dashed, of its twin."""
    ax = axes_or_new(ax)
    kind = pick_kind(result, kind)
    x, y, extra = _series(result, kind, key)
    ax.plot(x, y, marker="o", ms=2.5, label="trained")
    if "low" in extra and np.isfinite(extra["low"]).any():
        ax.fill_between(x, extra["low"], extra["high"], alpha=0.25, lw=0, label="trained: 95 % interval over images")
    if "floor" in extra and np.isfinite(extra["floor"]).any():
        ax.plot(x, extra["floor"], ls=":", lw=1, label="uncorrelated floor")
    if "twin" in extra:
        ax.plot(x, extra["twin"], ls="--", color="0.55", lw=1, label="untrained twin")
    ax.set_xlabel("block")
    block_axis(ax, int(np.nanmax(x)) if len(x) else 1)
    ax.ticklabel_format(axis="y", useOffset=False)  # near-1 entropies read as such, not as an offset
    ax.set_title(title or key, fontsize=8)
    return ax


@styled
def plot_measures_figure(result: ProbeResult, kind: str = "auto", title: str | None = None) -> np.ndarray:
    """2 x 3 panels of ``PANELS`` for the maps ``kind`` (default: those that multiply V); returns the axes."""
    fig = new_figure((10.0, 5.4))
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    for ax, (key, label) in zip(axes, PANELS):
        plot_block_measure(result, key, kind, title=label, ax=ax)
    legend_below(fig, axes, ncol=4)  # under the panels, off the data
    fig.suptitle(title or f"per-block measures ({pick_kind(result, kind)} maps)", fontsize=9)
    return axes
