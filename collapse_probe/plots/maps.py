"""Fig. 8-style panels: attention maps of every block, and the learned Re-attention Theta of every block.

    axes = plot_attention_maps(mean_maps, title="vit_micro_d16: self-attention")   # one panel per block
    axes = plot_head_maps(mixed_maps, heads=[0])       # single heads of the first image (for centred "mixed" maps)
    axes = plot_theta(theta_weights)                   # one H x H heatmap per block
    axes = plot_theta_change(final_theta, init_theta)  # final, init and final - init per block

Map panels share one colour scale with one colour bar that states it (``scale="shared"``, the default; the rule of
``plots.kinds.map_scale``): softmax maps diverge around uniform attention 1/N (white), so a near-uniform map looks
pale and a sharp one dark, whichever block it is; maps after Θ + BatchNorm diverge around 0. ``scale="percentile"``
or ``"panel"`` give each panel its own range (printed in its title) for a closer look at small differences. The
class token's row and column are marked.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes

from .data import MeanMaps, ThetaWeights
from .kinds import map_scale
from .style import block_axis, new_figure, styled

SCALES = ("shared", "percentile", "panel")


def _grid(n: int, ncols: int, panel: float, extra_w: float = 0.0, title: bool = False) -> np.ndarray:
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    fig = new_figure((cols * panel + extra_w, rows * panel + (0.35 if title else 0.0)))
    return np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())


def prefix_token_count(n_tokens: int) -> int:
    """1 when ``n_tokens`` - 1 is a square number of patches (a class token in front), else 0: a guess for maps
    that come without their model's ``num_prefix_tokens``."""
    return 1 if n_tokens > 1 and math.isqrt(n_tokens - 1) ** 2 == n_tokens - 1 else 0


def panel_limits(m: np.ndarray, scale: str, everything: np.ndarray | None = None) -> tuple[float, float, bool]:
    """(vmin, vmax, signed) of one map panel. Signed data (negative entries) gets a symmetric scale around 0."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    data = np.asarray(everything if scale == "shared" and everything is not None else m, dtype=float)
    data = data[np.isfinite(data)]
    if not data.size:
        return 0.0, 1.0, False
    signed = bool(data.min() < 0)
    if scale == "percentile":
        if signed:
            v = float(np.percentile(np.abs(data), 99)) or float(np.abs(data).max()) or 1.0
            return -v, v, True
        lo, hi = float(np.percentile(data, 1)), float(np.percentile(data, 99))
    else:
        lo, hi = float(data.min()), float(data.max())
        if signed:
            v = max(abs(lo), abs(hi)) or 1.0
            return -v, v, True
    return (lo, hi, False) if hi > lo else (lo - 1e-6, hi + 1e-6, False)


def _range_text(lo: float, hi: float, signed: bool) -> str:
    return f"±{hi:.2g}" if signed else f"{lo:.3g}–{hi:.3g}"


def _draw_map(ax: Axes, m: np.ndarray, title: str, look: dict, prefix: int, dark_lines: bool) -> object:
    im = ax.imshow(m, interpolation="nearest", **look)
    if prefix:  # the class token's row (a query) and column (a key) set apart from the patch tokens
        ax.axhline(prefix - 0.5, color="k" if dark_lines else "w", lw=0.7)
        ax.axvline(prefix - 0.5, color="k" if dark_lines else "w", lw=0.7)
        ax.set_xticks([0], ["cls"] if prefix == 1 else ["pre"])
        ax.set_yticks([0], ["cls"] if prefix == 1 else ["pre"])
        ax.tick_params(labelsize=5, length=1.5, pad=1)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.grid(False)
    ax.set_title(title, fontsize=7, pad=2)
    return im


def _map_panels(panels: Sequence[tuple[str, np.ndarray]], ncols: int, panel: float, scale: str,
                prefix_tokens: int | None, title: str | None, kind: str, what: str,
                axes: Sequence[Axes] | None) -> np.ndarray:
    """Draw ``panels`` (name, [N, N] map); "shared": one ``map_scale`` and one colour bar under the grid, which
    states the scale; otherwise each panel's own ``panel_limits``, printed in its title."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    n = len(panels)
    shared = scale == "shared"
    grid = _grid(n, ncols, panel, title=bool(title)) if axes is None else np.asarray(axes).ravel()
    if shared and axes is None:  # room under the grid for the colour bar and its two-line label
        fig = grid[0].figure
        fig.set_figheight(fig.get_figheight() + 0.9)
    if len(grid) < n:
        raise ValueError(f"need {n} axes for {n} panels, got {len(grid)}")
    common = map_scale(np.stack([m for _, m in panels]), kind, what) if shared and n else None
    prefix = prefix_token_count(panels[0][1].shape[-1]) if prefix_tokens is None and n else (prefix_tokens or 0)
    im = None
    for i, ax in enumerate(grid):
        if i >= n:
            ax.set_visible(False)
            continue
        name, m = panels[i]
        if common is not None:
            im = _draw_map(ax, m, name, {"norm": common.norm, "cmap": common.cmap}, prefix, True)
        else:
            lo, hi, signed = panel_limits(m, scale)
            _draw_map(ax, m, f"{name}: {_range_text(lo, hi, signed)}",
                      {"vmin": lo, "vmax": hi, "cmap": "RdBu_r" if signed else "viridis"}, prefix, signed)
    if common is not None and im is not None:
        _colorbar(grid[0].figure, im, list(grid[:n]), common)
    if title and axes is None:
        grid[0].figure.suptitle(title)
    return grid[:n]


def _colorbar(fig: object, im: object, axes: list[Axes], scale: object) -> None:
    """One horizontal colour bar under ``axes``, its label (the scale, wrapped to the figure's width) below it."""
    import textwrap

    bar = fig.colorbar(im, ax=axes, location="bottom", shrink=0.7, aspect=40, pad=0.02, extend=scale.extend)
    if scale.ticks is not None:
        bar.set_ticks(scale.ticks, labels=scale.tick_labels)
    width = max(40, int(fig.get_figwidth() * 0.7 * 72 / 4.4))  # characters of 8 pt text across the bar
    bar.set_label(textwrap.fill(scale.label, width), fontsize=8)
    bar.ax.tick_params(labelsize=7)


@styled
def plot_attention_maps(maps: MeanMaps, title: str | None = None, ncols: int = 8, panel: float = 1.45,
                        scale: str = "shared", prefix_tokens: int | None = None,
                        axes: Sequence[Axes] | None = None) -> np.ndarray:
    """One panel per block: the head- and batch-averaged map [N, N] (rows = queries, columns = keys).

    ``scale``: "shared" (default: one scale for all blocks from ``plots.kinds.map_scale`` for ``maps.kind``, with
    one colour bar that states it), "percentile" (each panel its own 1st-99th percentile, range in the title) or
    "panel" (each its own min..max). ``prefix_tokens``: class-token rows/columns to mark (None: guessed from N).
    Extra axes of a given grid are hidden. Returns the axes used, one per block.
    """
    panels = [(f"block {b + 1}", maps.maps[i]) for i, b in enumerate(maps.blocks)]
    return _map_panels(panels, ncols, panel, scale, prefix_tokens, title, maps.kind, "all blocks", axes)


@styled
def plot_head_maps(maps: MeanMaps, heads: Sequence[int] | None = None, title: str | None = None,
                   ncols: int | None = None, panel: float = 1.45, scale: str = "shared",
                   prefix_tokens: int | None = None, axes: Sequence[Axes] | None = None) -> np.ndarray:
    """Single-head maps of the first image (``maps.first_image`` [L, H, N, N]): for each block (in order), one panel
    per head in ``heads`` (default: all). With several heads each row holds the heads of one block; with one head
    the blocks run across rows of 8. Returns the axes, in (block, head) order."""
    if maps.first_image is None:
        raise ValueError("these maps carry no per-head maps of a single image (MeanMaps.first_image is None)")
    h = maps.first_image.shape[1]
    heads = list(range(h)) if heads is None else list(heads)
    if not heads or any(not 0 <= x < h for x in heads):
        raise ValueError(f"heads must be in 0..{h - 1}, got {heads}")
    panels = [(f"block {b + 1}" + (f" h{x}" if len(heads) > 1 else ""), maps.first_image[i, x])
              for i, b in enumerate(maps.blocks) for x in heads]
    cols = ncols or (len(heads) if len(heads) > 1 else 8)
    what = "all blocks and heads" if len(heads) > 1 else "all blocks"
    return _map_panels(panels, cols, panel, scale, prefix_tokens, title, maps.kind, what, axes)


def _theta_ticks(ax: Axes, h: int, xlabels: bool, ylabels: bool) -> None:
    ticks = list(range(h)) if h <= 6 else list(range(0, h, max(1, h // 4)))
    ax.set_xticks(ticks, [str(t) for t in ticks] if xlabels else [])
    ax.set_yticks(ticks, [str(t) for t in ticks] if ylabels else [])
    ax.tick_params(labelsize=6, length=2)
    ax.grid(False)


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
        _theta_ticks(ax, h, i >= n - min(n, ncols), i % ncols == 0)
        ax.set_title(f"block {theta.blocks[i] + 1}", fontsize=8, pad=2)
    fig = grid[0].figure
    if im is not None:
        fig.colorbar(im, ax=list(grid[:n]), shrink=0.8, label="Θ weight")
        grid[0].set_ylabel("output head", fontsize=7)
        grid[(n - 1) // ncols * ncols].set_xlabel("input head", fontsize=7)  # bottom-left panel
    if title and axes is None:
        fig.suptitle(title)
    return grid[:n]


@styled
def plot_theta_change(final: ThetaWeights, init: ThetaWeights, title: str | None = None, ncols: int = 8,
                      panel: float = 1.0) -> np.ndarray:
    """Θ after training against Θ at initialisation: a curve of ||Θ - Θ0|| / ||Θ0|| per block on top, then for
    each block three H x H heatmaps stacked (final, init, final - init). Final and init share one symmetric scale;
    the change has its own (printed in its colour bar), so that a small change stays visible.

    Returns an object array: [0] the relative-change axes, then per block its (final, init, change) axes."""
    rel = final.relative_change(init)
    n = len(final.blocks)
    cols = min(n, ncols)
    groups = math.ceil(n / cols)
    fig = new_figure((cols * panel + 1.2, 2.0 + groups * 3 * panel + (0.35 if title else 0.0)))
    # one extra narrow column holds the two colour bars, beside the first group's rows they describe
    gs = fig.add_gridspec(1 + 3 * groups, cols + 1, height_ratios=[2.0 / panel] + [1.0] * (3 * groups),
                          width_ratios=[1.0] * cols + [0.12])
    top = fig.add_subplot(gs[0, :cols])
    top.plot(np.asarray(final.blocks) + 1, rel, marker="o", ms=3, color="C3")
    top.set(xlabel="block", ylabel="‖Θ − Θ₀‖ / ‖Θ₀‖", ylim=(0, max(0.05, float(np.nanmax(rel)) * 1.15)))
    block_axis(top, max(final.blocks) + 1, first=min(final.blocks) + 1)
    top.set_title("Relative change of Θ from its initialisation", fontsize=9)
    both = np.concatenate([final.weight, init.weight])
    vmax = float(np.nanmax(np.abs(both))) or 1.0
    delta = final.weight - init.weight
    dmax = float(np.nanmax(np.abs(delta))) or 1.0
    out: list[Axes] = [top]
    im_weight = im_delta = None
    h = final.weight.shape[1]
    rows = ("final", "init", "final − init")
    for i in range(n):
        g, c = divmod(i, cols)
        for r, (mat, lim) in enumerate(((final.weight[i], vmax), (init.weight[i], vmax), (delta[i], dmax))):
            ax = fig.add_subplot(gs[1 + 3 * g + r, c])
            im = ax.imshow(mat, cmap="RdBu_r" if r < 2 else "PuOr_r", vmin=-lim, vmax=lim, interpolation="nearest")
            if r < 2:
                im_weight = im
            else:
                im_delta = im
            _theta_ticks(ax, h, False, False)
            if r == 0:
                ax.set_title(f"block {final.blocks[i] + 1}: Δ {100 * rel[i]:.2g}%", fontsize=6.5, pad=2)
            if c == 0:
                ax.set_ylabel(rows[r], fontsize=7)
            out.append(ax)
    if im_weight is not None and im_delta is not None:
        fig.colorbar(im_weight, cax=fig.add_subplot(gs[1:3, cols]), label=f"Θ weight (±{vmax:.2g})")
        fig.colorbar(im_delta, cax=fig.add_subplot(gs[3, cols]), label=f"change (±{dmax:.2g})")
    if title:
        fig.suptitle(title)
    return np.asarray(out, dtype=object)
