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
    ax.axhline(threshold, color="0.35", ls="--", lw=0.9, label=label or f"threshold {threshold:g}", zorder=1,
               gid="threshold")


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
TWIN_MARKERS = ("o", "^", "s", "D", "v")


def twin_style(i: int, many: bool) -> dict[str, Any]:
    """``BASELINE_STYLE`` for the ``i``-th untrained twin on an axis; with ``many`` twins each gets its own hollow
    marker, so that grey dashed lines of different models stay apart."""
    if not many:
        return dict(BASELINE_STYLE)
    return {**BASELINE_STYLE, "marker": TWIN_MARKERS[i % len(TWIN_MARKERS)], "ms": 3.5, "mfc": "none"}


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


BLOCK_STEPS = (1, 2, 4, 5, 8, 10, 16, 20, 25, 50, 100, 200, 500)


def block_numbers(last: int, most: int = 9) -> list[int]:
    """Tick positions for blocks 1..``last`` (1-based): every block up to ``most`` blocks, else block 1 and the
    multiples of the smallest step in ``BLOCK_STEPS`` that keeps at most about ``most`` labels (1, 4, 8, ..., 32)."""
    last = max(1, int(last))
    step = next((s for s in BLOCK_STEPS if last / s <= most), BLOCK_STEPS[-1])
    return [1] + [t for t in range(step, last + 1, step) if t - 1 >= step / 2]


def block_axis(ax: Axes, last: int | None = None, axis: str = "x", first: int = 1) -> None:
    """1-based block ticks (``block_numbers``) on a block-number axis that spans blocks ``first``..``last`` (default
    last: the largest x of the drawn lines), with half a block of margin: no "block 0", no "block 2.5"."""
    if last is None:
        xs = [np.asarray(line.get_xdata(), dtype=float) for line in ax.lines if len(line.get_xdata())]
        last = int(max((np.nanmax(x) for x in xs if np.isfinite(x).any()), default=1))
    ticks = [t for t in block_numbers(last) if t >= first] or [first]
    if axis == "x":
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlim(first - 0.5, last + 0.5)
    else:
        ax.set_yticks(ticks, [str(t) for t in ticks])


def matrix_block_ticks(ax: Axes, blocks: Sequence[int]) -> None:
    """Both axes of an L x L block matrix drawn with ``extent=(0.5, L + 0.5, L + 0.5, 0.5)``: ticks at the positions
    ``block_numbers(L)``, labelled with those positions' 1-based block numbers (``blocks`` are 0-based indices)."""
    pos = block_numbers(len(blocks))
    labels = [str(blocks[p - 1] + 1) for p in pos]
    ax.set_xticks(pos, labels)
    ax.set_yticks(pos, labels)


def legend_right(ax: Axes, **kwargs: Any) -> Any:
    """The axes' legend outside the data area, to the right of the axes (constrained layout makes room for it);
    None when nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, [_wrap(t) for t in labels], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, **kwargs)


def legend_below(fig: Figure, axes: Iterable[Axes], ncol: int = 3, **kwargs: Any) -> Any:
    """One figure legend under all panels (``loc="outside lower center"``: constrained layout keeps it off the
    axes) with the labelled artists of ``axes``, each label once, in place of their own legends; None when nothing
    is labelled."""
    seen: dict[str, Any] = {}
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if not seen:
        return None
    return fig.legend(list(seen.values()), [_wrap(t) for t in seen], loc="outside lower center",
                      ncol=min(ncol, len(seen)), **kwargs)


def _wrap(label: str, width: int = 48) -> str:
    """A legend label broken at spaces into lines of about ``width`` characters (a long model name would otherwise
    push the legend, and with it the axes, out of the figure)."""
    import textwrap

    return textwrap.fill(label, width, break_long_words=False, break_on_hyphens=False)


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
