"""The one style shared by every collapse-probe figure, figure saving (PNG + PDF) and CSV writing, all atomic.

    from collapse_probe.plots.style import styled, axes_or_new, save_figure
    @styled
    def plot_x(data, ax=None):
        ax = axes_or_new(ax)
        ...
        return ax
    save_figure(ax.figure, "figures/x")          # -> figures/x.png and figures/x.pdf

Plot functions never call ``show()``; the caller saves or displays the figure.
"""
from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..outputs import write_file

DPI = 110  # small committed PNGs that stay legible
STYLE: dict[str, Any] = {
    "figure.dpi": DPI, "savefig.dpi": DPI, "savefig.bbox": "tight", "figure.constrained_layout.use": True,
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "lines.linewidth": 1.6,
    "lines.markersize": 4, "axes.spines.top": False, "axes.spines.right": False, "image.cmap": "viridis",
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays text
}
# ViT in blues, DeepViT in reds (darker = deeper), anything else from the default cycle
FAMILY_CMAPS = {"vit": "Blues", "deepvit": "Reds"}
K_STYLES = {1: "-", 2: "--", 3: ":"}

F = TypeVar("F", bound=Callable[..., Any])


def styled(fn: F) -> F:
    """Run a plot function under ``STYLE`` (rc settings apply to the figures and artists it creates)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with mpl.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def axes_or_new(ax: Axes | None, figsize: tuple[float, float] = (5.0, 3.4)) -> Axes:
    """``ax`` itself, or the axes of a new figure (created through pyplot-free ``Figure`` so no GUI is involved)."""
    if ax is not None:
        return ax
    return Figure(figsize=figsize).add_subplot()


def new_figure(figsize: tuple[float, float]) -> Figure:
    return Figure(figsize=figsize)


def family_of(architecture: str) -> str:
    """"deepvit" for deepvit_*, "vit" for vit_*, else the architecture name."""
    a = architecture.lower()
    return "deepvit" if a.startswith("deepvit") else "vit" if a.startswith("vit") else a


def family_color(family: str, position: float = 1.0) -> Any:
    """Colour for a model family; ``position`` in [0, 1] picks a shade (used to order depths)."""
    cmap = FAMILY_CMAPS.get(family)
    if cmap is None:
        return f"C{abs(hash(family)) % 10}"
    return mpl.colormaps[cmap](0.45 + 0.5 * float(np.clip(position, 0, 1)))


def threshold_line(ax: Axes, threshold: float, label: str | None = None) -> None:
    ax.axhline(threshold, color="0.35", ls="--", lw=0.9, label=label or f"threshold {threshold:g}", zorder=1)


def unit_ylim(ax: Axes) -> None:
    """y from 0 (or below, for negative data) to just above 1: similarities on a common scale."""
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]
    low = min([0.0] + [float(np.nanmin(y)) for y in ys if np.isfinite(y).any()])
    ax.set_ylim(low - 0.02, 1.02)


# Post-BatchNorm maps are centred per head and rescaled, so their cosines are not comparable with softmax cosines;
# every axis that shows them says so with this note.
MIXED_NOTE = "mixed: after Θ + BatchNorm, centred — not the same scale as softmax maps"
BASELINE_LABEL = "untrained twin"
BASELINE_STYLE: dict[str, Any] = {"color": "0.55", "ls": "--", "lw": 1.2, "marker": None}


def kind_name(result: Any, kind: str) -> str:
    """How a legend names map kind ``kind`` of ``result``: "probs, before Θ" for a Re-attention model's softmax maps
    (they are not the maps that multiply V), else the kind itself."""
    return "probs, before Θ" if kind == "probs" and result.applied_kind == "mixed" else kind


def note(ax: Axes, text: str, width: int | None = None) -> None:
    """A small grey note under ``ax`` (below the x label; constrained layout makes room for it), wrapped to about
    the axes' width, so that it never hides a curve. Kept in ``ax.texts``."""
    import textwrap

    if width is None:  # characters of 6.5 pt text that fit the axes' current width
        width = max(30, int(ax.get_position().width * ax.figure.get_figwidth() * 72 / 3.6))
    ax.annotate(textwrap.fill(text, width), xy=(0.5, 0.0), xycoords="axes fraction", xytext=(0, -30),
                textcoords="offset points", ha="center", va="top", fontsize=6.5, color="0.3", annotation_clip=False)


def block_axis(ax: Axes) -> None:
    """Integer ticks on a block-number x axis (no "block 2.5")."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def data_ylim(ax: Axes, pad: float = 0.08) -> None:
    """y fitted to the drawn data (with ``pad`` of its span either side): for curves that have no common scale."""
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]
    ys = [y[np.isfinite(y)] for y in ys if np.isfinite(y).any()]
    if not ys:
        return
    lo, hi = min(float(y.min()) for y in ys), max(float(y.max()) for y in ys)
    span = hi - lo or max(abs(hi), 1e-3)
    ax.set_ylim(lo - pad * span, hi + pad * span)


def offdiag_limits(m: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite off-diagonal entries of a square matrix: the diagonal of a similarity matrix is 1 by
    definition and would otherwise squeeze the informative entries into a sliver of the colour scale."""
    m = np.asarray(m, dtype=float)
    off = m[~np.eye(len(m), dtype=bool)] if len(m) > 1 else m.ravel()
    off = off[np.isfinite(off)]
    if not off.size:
        return 0.0, 1.0
    lo, hi = float(off.min()), float(off.max())
    return (lo, hi) if hi > lo else (lo - 0.5e-3, hi + 0.5e-3)


def save_figure(fig: Figure, path: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = DPI) -> list[Path]:
    """Write ``fig`` to ``path`` with each suffix in ``formats`` (replacing ``path``'s suffix); atomic per file."""
    path = Path(path)
    out = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        with mpl.rc_context(STYLE):
            write_file(target, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi))
        out.append(target)
    return out


def _cell(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(float(v)) else repr(float(v))
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Atomic CSV: full-precision floats (``repr``), NaN as an empty cell."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows([_cell(v) for v in row] for row in rows)

    write_file(path, write)
    return path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
