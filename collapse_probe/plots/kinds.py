"""The one rule for figures of the two map kinds: softmax maps ("probs") and maps after Re-attention ("mixed").

    from collapse_probe.plots.kinds import kind_panels, finish_kind, map_scale, one_kind
    axes = kind_panels(["probs", "mixed"])               # one panel per kind, softmax first, stacked on one x axis
    for ax, kind in zip(axes, ["probs", "mixed"]):
        ax.plot(x, y, gid=kind, label=f"vit ({kind})")   # every curve says its kind (gid and label)
        finish_kind(ax, kind, threshold=0.9)             # probs: 0.9 line, unit y; mixed: no line, a note, fitted y
    scale = map_scale(maps, "probs")                      # one colour scale + colour-bar label for a grid of maps

Why: a softmax map is row-stochastic (entries >= 0, rows sum to 1, uniform = 1/N), and the paper's thresholds (0.9
block similarity, 0.3 cross-head similarity) are stated for cosines of such maps. A Re-attention map after Θ and
BatchNorm is centred per head and rescaled: signed, not row-stochastic, its cosine behaves like a correlation. So

1. the two kinds never share an axis: one panel per kind (a Re-attention model's softmax maps, before Θ, go on the
   softmax panel beside ViT's); ``one_kind`` refuses an axis that would get both;
2. thresholds are drawn on softmax panels only; a mixed panel says so in a note and is scaled to its data;
3. a grid of maps has one colour scale for all panels and one colour bar saying the scale: softmax maps diverge
   around uniform attention (1/N, white) from 0 to their largest entry (at least 2/N, so near-uniform maps stay
   pale); mixed maps diverge around 0, symmetric to the 99th percentile of |value|.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm

from .style import MIXED_NOTE, data_ylim, new_figure, note, threshold_line, unit_ylim

KINDS = ("probs", "mixed")
PANEL_TITLES = {"probs": "softmax maps (probs)", "mixed": "after Θ + BatchNorm (mixed): the maps that multiply V"}


def ordered(kinds: Iterable[str]) -> list[str]:
    """``kinds`` once each, softmax first, then mixed, then any other in the given order."""
    kinds = list(dict.fromkeys(kinds))
    return [k for k in KINDS if k in kinds] + [k for k in kinds if k not in KINDS]


def present(results: Iterable[Any]) -> list[str]:
    """The map kinds any of ``results`` (``ProbeResult``) has, ``ordered``."""
    return ordered(k for r in results for k in r.attention)


def one_kind(kinds: Iterable[str], what: str, instead: str) -> str:
    """The single kind of ``kinds``; ValueError naming ``instead`` (the per-kind function) when there are several."""
    found = ordered(kinds)
    if len(found) > 1:
        raise ValueError(f"{what} would put maps of kinds {found} on one axis; softmax and post-Re-attention maps are "
                         f"not on one scale: use {instead}, or pass kind=")
    return found[0] if found else "probs"


def kind_panels(kinds: Sequence[str], axes: Sequence[Axes] | None = None, width: float = 7.6,
                height: float = 2.9) -> list[Axes]:
    """One axes per kind of ``kinds`` (given ``axes``, or a new column of panels sharing the block axis, softmax on
    top, room on the right for each panel's legend)."""
    if axes is None:
        fig = new_figure((width, height * len(kinds) + 0.4))
        axes = list(fig.subplots(len(kinds), 1, squeeze=False, sharex=True).ravel())
    axes = list(np.asarray(axes, dtype=object).ravel())
    if len(axes) < len(kinds):
        raise ValueError(f"need {len(kinds)} axes (one per map kind {list(kinds)}), got {len(axes)}")
    return axes[: len(kinds)]


def finish_kind(ax: Axes, kind: str, threshold: float | None = None, threshold_label: str | None = None,
                unit: bool = True) -> None:
    """The rule for one kind's panel: softmax panels get the threshold line and (``unit``) the similarity scale
    [0, 1]; mixed panels get no threshold line, ``MIXED_NOTE`` saying why, and a y scale fitted to their data."""
    if kind == "mixed":
        why = "" if threshold is None else f"; the {threshold:g} line is set for softmax maps and not drawn"
        note(ax, MIXED_NOTE + why)
        data_ylim(ax)
        return
    if threshold is not None:
        threshold_line(ax, threshold, threshold_label)
    if unit:
        unit_ylim(ax)


@dataclass
class MapScale:
    """One colour scale for a grid of maps: ``norm`` and ``cmap`` for ``imshow``, the colour bar's ``label``
    (which states the scale), its ``ticks`` / ``tick_labels`` and ``extend`` (values beyond the scale)."""

    norm: Normalize
    cmap: str
    label: str
    ticks: list[float] | None = None
    tick_labels: list[str] | None = None
    extend: str = "neither"


def map_scale(maps: np.ndarray, kind: str, what: str = "all panels") -> MapScale:
    """The shared scale for ``maps`` [..., N, N] of ``kind`` (unknown kinds: softmax-like unless any entry is
    negative). ``what`` names what shares it in the label ("all blocks", "all blocks and heads")."""
    m = np.asarray(maps, dtype=float)
    vals = m[np.isfinite(m)]
    n = m.shape[-1] if m.ndim else 1
    signed = kind == "mixed" or (kind != "probs" and vals.size and vals.min() < 0)
    if signed:
        v = float(np.percentile(np.abs(vals), 99)) if vals.size else 1.0
        v = v or float(np.abs(vals).max(initial=0.0)) or 1.0
        clipped = bool(vals.size and np.abs(vals).max() > v)
        return MapScale(Normalize(-v, v), "RdBu_r",
                        f"value after Θ + BatchNorm (centred, signed), one scale for {what}: white = 0, "
                        f"±{v:.3g} = 99th percentile of |value|" + (" (beyond: the end colours)" if clipped else ""),
                        extend="both" if clipped else "neither")
    uniform = 1.0 / n
    top = max(float(vals.max()) if vals.size else 0.0, 2 * uniform)
    return MapScale(TwoSlopeNorm(uniform, 0.0, top), "RdBu_r",
                    f"attention weight, one scale for {what}: white = uniform 1/N = 1/{n} = {uniform:.3g}; "
                    f"blue below, red above, up to {top:.3g} (the largest entry, at least 2/N)",
                    ticks=[0.0, uniform, top], tick_labels=["0", "1/N", f"{top:.3g}"])
