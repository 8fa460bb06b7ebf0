"""Cross-block attention similarity: Fig. 3(a) neighbour curves, the L x L heatmap, Fig. 3(c) cross-head similarity.

    ax = plot_neighbor_similarity({"vit_micro_d32": result}, ks=(1, 2, 3), threshold=0.9)
    axes = plot_neighbor_similarity_by_kind({"vit": vit, "deepvit": deepvit}, ks=(1,))   # softmax | after Θ + BN
    save_figure(ax.figure, "figures/fig3a")

The x axis is the 1-based block number, as in the paper ("similarity above 0.9 after block 17"). Curves of DeepViT's
"mixed" maps (after Θ and BatchNorm: centred, can be negative) are not on the scale of softmax ("probs") curves: every
legend names the kind, an axis holding mixed curves carries ``style.MIXED_NOTE``, and the threshold line (set for
softmax maps) is drawn only on axes that hold softmax curves.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes

from ..probing.result import ProbeResult
from .data import pick_kind
from .style import (
    BASELINE_LABEL,
    BASELINE_STYLE,
    K_STYLES,
    MIXED_NOTE,
    axes_or_new,
    block_axis,
    data_ylim,
    kind_name,
    new_figure,
    note,
    offdiag_limits,
    styled,
    threshold_line,
    unit_ylim,
)

PANEL_TITLES = {"probs": "softmax maps (probs)", "mixed": "after Θ + BatchNorm (mixed): the maps that multiply V"}


def _colors(labels: Sequence[str], colors: Mapping[str, Any] | None) -> dict[str, Any]:
    return {lab: (colors or {}).get(lab, f"C{i % 10}") for i, lab in enumerate(labels)}


def _kind_of(res: ProbeResult, kind: str) -> str:
    """``kind`` for "auto", else ``kind`` when ``res`` has it, else the maps that multiply V (a baseline may lack
    it)."""
    return pick_kind(res, kind if kind == "auto" or kind in res.attention else "auto")


def _baseline_label(label: str, many: bool) -> str:
    return f"{label}: {BASELINE_LABEL}" if many else BASELINE_LABEL


def _finish_kinds(ax: Axes, kinds: set[str], threshold: float | None, threshold_label: str | None = None) -> None:
    """The one rule for axes that may hold both kinds: threshold only with softmax curves, a note with mixed ones,
    the unit scale only when a softmax curve sets it (mixed-only axes are fitted to their data)."""
    if threshold is not None and "probs" in kinds:
        threshold_line(ax, threshold, threshold_label)
    if "mixed" in kinds:
        note(ax, MIXED_NOTE + ("" if "probs" in kinds or threshold is None else
                               f"; the {threshold:g} threshold is set for softmax maps and not drawn"))
    if "probs" in kinds or not kinds:
        unit_ylim(ax)
    else:
        data_ylim(ax)


@styled
def plot_neighbor_similarity(
    results: Mapping[str, ProbeResult],
    ks: Sequence[int] = (1, 2, 3),
    threshold: float | None = 0.9,
    kind: str = "auto",
    reduction: str = "mean",
    colors: Mapping[str, Any] | None = None,
    baselines: Mapping[str, ProbeResult] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Fig. 3(a): each block's similarity with its k previous blocks (one curve per model and k), threshold line.

    Line order: for each model (in ``results`` order), one line per k; then each ``baselines`` entry ({label of the
    trained model: its untrained twin}, first k only, grey dashed); then the threshold line, drawn only when a
    softmax curve is on the axes. Legend entries name each curve's map kind.
    """
    ax = axes_or_new(ax)
    cols = _colors(list(results), colors)
    kinds: set[str] = set()
    for label, res in results.items():
        used = pick_kind(res, kind)
        kinds.add(used)
        st = res.attention[used]
        x = np.asarray(st.blocks) + 1
        for k in ks:
            name = f"{label} ({kind_name(res, used)})" + ("" if len(ks) == 1 else f", k={k}")
            ax.plot(x, st.neighbor(k, reduction), ls=K_STYLES.get(k, "-."), color=cols[label], marker="o",
                    ms=2.5, label=name)
    for label, base in (baselines or {}).items():
        st = base.attention[_kind_of(base, kind if kind != "auto" else pick_kind(results[label]))]
        kinds.add(st.kind)
        ax.plot(np.asarray(st.blocks) + 1, st.neighbor(ks[0], reduction), **BASELINE_STYLE,
                label=_baseline_label(label, len(results) > 1) + ("" if len(ks) == 1 else f", k={ks[0]}"))
    _finish_kinds(ax, kinds, threshold)
    prev = "previous block" if tuple(ks) == (1,) else "previous k blocks"
    ax.set(xlabel="block", ylabel=f"similarity with {prev} ({reduction})")
    block_axis(ax)
    ax.set_title("Attention similarity with neighbouring blocks")
    ax.legend(loc="best")
    return ax


@styled
def plot_neighbor_similarity_by_kind(
    results: Mapping[str, ProbeResult],
    ks: Sequence[int] = (1, 2, 3),
    threshold: float | None = 0.9,
    reduction: str = "mean",
    colors: Mapping[str, Any] | None = None,
    baselines: Mapping[str, ProbeResult] | None = None,
    axes: Sequence[Axes] | None = None,
) -> np.ndarray:
    """Fig. 3(a) / Fig. 8's comparison split by map kind: one panel per kind that any result has, softmax ("probs")
    first, then "mixed" (after Θ + BatchNorm), each on its own y scale. A Re-attention model appears in both (its
    softmax maps before Θ in the first). The threshold line is drawn on the softmax panel only. Returns the axes."""
    present = [k for k in ("probs", "mixed") if any(k in r.attention for r in results.values())]
    if axes is None:
        fig = new_figure((5.0 * len(present), 3.4))
        axes = np.atleast_1d(fig.subplots(1, len(present), squeeze=False).ravel())
    axes = np.asarray(axes).ravel()
    if len(axes) < len(present):
        raise ValueError(f"need {len(present)} axes (one per map kind {present}), got {len(axes)}")
    cols = _colors(list(results), colors)
    for ax, k in zip(axes, present):
        sub = {lab: r for lab, r in results.items() if k in r.attention}
        base = {lab: b for lab, b in (baselines or {}).items() if lab in sub and k in b.attention}
        plot_neighbor_similarity(sub, ks, threshold, k, reduction, cols, base, ax=ax)
        ax.set_title(PANEL_TITLES.get(k, k))
    return axes[: len(present)]


@styled
def plot_similarity_heatmap(result: ProbeResult, kind: str = "auto", reduction: str = "mean",
                            title: str | None = None, ax: Axes | None = None) -> Axes:
    """The L x L cross-block attention similarity matrix (``AttentionStats.matrix``), blocks numbered from 1.

    The colour scale spans the off-diagonal entries (the diagonal is 1 by definition and is clipped to the top
    colour); the range is printed in the colour bar's label."""
    ax = axes_or_new(ax, (4.2, 3.6))
    k = pick_kind(result, kind)
    st = result.attention[k]
    m = st.matrix(reduction)
    n = len(st.blocks)
    lo, hi = offdiag_limits(m)
    im = ax.imshow(m, vmin=lo, vmax=hi, cmap="viridis", origin="upper", interpolation="nearest",
                   extent=(0.5, n + 0.5, n + 0.5, 0.5))
    _block_ticks(ax, st.blocks)
    ax.grid(False)
    ax.set(xlabel="block", ylabel="block")
    ax.set_title(title or f"Attention similarity ({k}, {reduction})")
    bar = ax.figure.colorbar(im, ax=ax, shrink=0.85)
    bar.set_label(f"similarity (off-diagonal {lo:.3g}…{hi:.3g})", fontsize=8)
    return ax


def _block_ticks(ax: Axes, blocks: Sequence[int]) -> None:
    """Ticks at positions 1..L labelled with the 1-based block numbers (at most ~8 labels)."""
    n = len(blocks)
    step = max(1, int(np.ceil(n / 8)))
    pos = list(range(1, n + 1, step))
    labels = [str(blocks[p - 1] + 1) for p in pos]
    ax.set_xticks(pos, labels)
    ax.set_yticks(pos, labels)


@styled
def plot_cross_head(results: Mapping[str, ProbeResult], kind: str = "auto", reference: float | None = 0.3,
                    colors: Mapping[str, Any] | None = None, baselines: Mapping[str, ProbeResult] | None = None,
                    ax: Axes | None = None) -> Axes:
    """Fig. 3(c): mean similarity between different heads of each block (``AttentionStats.cross_head``).

    Legend entries name the map kind (the title does, for one model); ``baselines`` ({label: untrained twin}) are grey
    dashed; the paper's
    ``reference`` (stated for softmax maps) is drawn only when a softmax curve is on the axes."""
    ax = axes_or_new(ax)
    cols = _colors(list(results), colors)
    kinds: set[str] = set()
    for label, res in results.items():
        st = res.attention[pick_kind(res, kind)]
        kinds.add(st.kind)
        ax.plot(np.asarray(st.blocks) + 1, st.cross_head, color=cols[label], marker="o", ms=2.5,
                label=f"{label} ({kind_name(res, st.kind)})" if len(results) > 1 else label)
    for label, base in (baselines or {}).items():
        st = base.attention[_kind_of(base, pick_kind(results[label], kind))]
        kinds.add(st.kind)
        ax.plot(np.asarray(st.blocks) + 1, st.cross_head, **BASELINE_STYLE,
                label=_baseline_label(label, len(results) > 1))
    if "mixed" in kinds:
        note(ax, MIXED_NOTE)
    if reference is not None and "probs" in kinds:
        threshold_line(ax, reference, label=f"paper: below {reference:g} (softmax maps)")
    unit_ylim(ax)  # cross-head cosines of either kind lie in [-1, 1]: one scale keeps the kinds' levels visible
    ax.set(xlabel="block", ylabel="cross-head similarity")
    block_axis(ax)
    # one model: its kind goes in the title (a long model name would push a legend label past the figure)
    only = next(iter(results.values())) if len(results) == 1 else None
    ax.set_title("Similarity between heads of one block" + (
        f" ({kind_name(only, pick_kind(only, kind))})" if only is not None else ""))
    ax.legend(loc="best")
    return ax
