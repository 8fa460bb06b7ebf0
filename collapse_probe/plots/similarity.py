"""Cross-block attention similarity: Fig. 3(a) neighbour curves, the L x L heatmap, Fig. 3(c) cross-head similarity.

    ax = plot_neighbor_similarity({"vit_micro_d32": result}, ks=(1, 2, 3), threshold=0.9)
    axes = plot_neighbor_similarity_by_kind({"vit": vit, "deepvit": deepvit}, ks=(1,))   # softmax | after Θ + BN
    save_figure(ax.figure, "figures/fig3a")

The x axis is the 1-based block number, as in the paper ("similarity above 0.9 after block 17"). Curves of DeepViT's
"mixed" maps (after Θ and BatchNorm: centred, can be negative) are not on the scale of softmax ("probs") curves, so
they follow ``plots.kinds``: one kind per axes (the ``*_by_kind`` functions draw one panel per kind), every legend
names the kind, a mixed panel carries ``style.MIXED_NOTE`` and no threshold line (set for softmax maps). Legends sit
right of the axes, off the data.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes

from ..probing.result import ProbeResult
from .data import pick_kind
from .kinds import PANEL_TITLES, finish_kind, kind_panels, one_kind, present
from .style import (
    BASELINE_LABEL,
    K_STYLES,
    axes_or_new,
    block_axis,
    kind_name,
    legend_right,
    matrix_block_ticks,
    offdiag_limits,
    styled,
    twin_style,
)


def _colors(labels: Sequence[str], colors: Mapping[str, Any] | None) -> dict[str, Any]:
    return {lab: (colors or {}).get(lab, f"C{i % 10}") for i, lab in enumerate(labels)}


def _kind_of(res: ProbeResult, kind: str) -> str:
    """``kind`` for "auto", else ``kind`` when ``res`` has it, else the maps that multiply V (a baseline may lack
    it)."""
    return pick_kind(res, kind if kind == "auto" or kind in res.attention else "auto")


def _baseline_label(label: str, many: bool) -> str:
    return f"{label}: {BASELINE_LABEL}" if many else BASELINE_LABEL


def _depth(results: Mapping[str, ProbeResult]) -> int:
    return max((max(st.blocks) + 1 for r in results.values() for st in r.attention.values() if st.blocks), default=1)


def _split(results: Mapping[str, ProbeResult], baselines: Mapping[str, ProbeResult] | None, kind: str
           ) -> tuple[dict[str, str], dict[str, str]]:
    """(the kind each result shows, the kind each baseline shows: its trained model's, where it has it)."""
    used = {label: pick_kind(res, kind) for label, res in results.items()}
    base = {label: _kind_of(b, used.get(label, kind)) for label, b in (baselines or {}).items()}
    return used, base


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

    All curves are of one map kind (``plots.kinds``): ValueError when ``kind`` picks softmax maps for one result and
    post-Re-attention maps for another (``plot_neighbor_similarity_by_kind`` draws one panel per kind). Line order:
    for each model (in ``results`` order), one line per k; then each ``baselines`` entry ({label of the trained
    model: its untrained twin}, first k only, grey dashed); then the threshold line, on softmax axes only. Legend
    entries name each curve's map kind; the legend sits right of the axes.
    """
    used, base_kinds = _split(results, baselines, kind)
    shown = one_kind([*used.values(), *base_kinds.values()], "plot_neighbor_similarity",
                     "plot_neighbor_similarity_by_kind")
    ax = axes_or_new(ax, (7.4, 3.4))
    cols = _colors(list(results), colors)
    for label, res in results.items():
        st = res.attention[used[label]]
        x = np.asarray(st.blocks) + 1
        for k in ks:
            name = f"{label} ({kind_name(res, st.kind)})" + ("" if len(ks) == 1 else f", k={k}")
            ax.plot(x, st.neighbor(k, reduction), ls=K_STYLES.get(k, "-."), color=cols[label], marker="o",
                    ms=2.5, label=name, gid=st.kind)
    many = len(base_kinds) > 1
    for i, (label, b) in enumerate((baselines or {}).items()):
        st = b.attention[base_kinds[label]]
        ax.plot(np.asarray(st.blocks) + 1, st.neighbor(ks[0], reduction), **twin_style(i, many), gid=st.kind,
                label=_baseline_label(label, len(results) > 1) + ("" if len(ks) == 1 else f", k={ks[0]}"))
    finish_kind(ax, shown, threshold)
    prev = "previous block" if tuple(ks) == (1,) else "previous k blocks"
    ax.set(xlabel="block", ylabel=f"similarity with {prev} ({reduction})")
    block_axis(ax, _depth(results))
    ax.set_title("Attention similarity with neighbouring blocks")
    legend_right(ax)
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
) -> list[Axes]:
    """Fig. 3(a) / Fig. 8's comparison split by map kind: one panel per kind that any result has, softmax ("probs")
    first, then "mixed" (after Θ + BatchNorm), each on its own y scale, stacked on one block axis. A Re-attention
    model appears in both (its softmax maps before Θ in the first). The threshold line is drawn on the softmax panel
    only. Returns the axes."""
    kinds = present(results.values())
    axes = kind_panels(kinds, axes)
    cols = _colors(list(results), colors)
    for ax, k in zip(axes, kinds):
        sub = {lab: r for lab, r in results.items() if k in r.attention}
        base = {lab: b for lab, b in (baselines or {}).items() if lab in sub and k in b.attention}
        plot_neighbor_similarity(sub, ks, threshold, k, reduction, cols, base, ax=ax)
        ax.set_title(PANEL_TITLES.get(k, k))
    _outer_xlabels(axes)
    return axes


def _outer_xlabels(axes: Sequence[Axes]) -> None:
    """A column of panels on one block axis: the x label on the bottom panel only."""
    for ax in axes[:-1]:
        if ax.get_shared_x_axes().joined(ax, axes[-1]):
            ax.set_xlabel("")


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
    matrix_block_ticks(ax, st.blocks)
    ax.grid(False)
    ax.set(xlabel="block", ylabel="block")
    ax.set_title(title or f"Attention similarity ({k}, {reduction})")
    bar = ax.figure.colorbar(im, ax=ax, shrink=0.85)
    bar.set_label(f"similarity (off-diagonal {lo:.3g}…{hi:.3g})", fontsize=8)
    return ax


@styled
def plot_cross_head(results: Mapping[str, ProbeResult], kind: str = "auto", reference: float | None = 0.3,
                    colors: Mapping[str, Any] | None = None, baselines: Mapping[str, ProbeResult] | None = None,
                    ax: Axes | None = None) -> Axes:
    """Fig. 3(c): mean similarity between different heads of each block (``AttentionStats.cross_head``).

    One map kind per axes (``plots.kinds``; ``plot_cross_head_by_kind`` for both): legend entries name it (so does the
    title, for one model); ``baselines`` ({label: untrained twin}) are grey dashed; the paper's ``reference`` (stated
    for softmax maps) is drawn on softmax axes only."""
    used, base_kinds = _split(results, baselines, kind)
    shown = one_kind([*used.values(), *base_kinds.values()], "plot_cross_head", "plot_cross_head_by_kind")
    ax = axes_or_new(ax, (7.0, 3.4))
    cols = _colors(list(results), colors)
    for label, res in results.items():
        st = res.attention[used[label]]
        ax.plot(np.asarray(st.blocks) + 1, st.cross_head, color=cols[label], marker="o", ms=2.5, gid=st.kind,
                label=f"{label} ({kind_name(res, st.kind)})")
    many = len(base_kinds) > 1
    for i, (label, b) in enumerate((baselines or {}).items()):
        st = b.attention[base_kinds[label]]
        ax.plot(np.asarray(st.blocks) + 1, st.cross_head, **twin_style(i, many), gid=st.kind,
                label=_baseline_label(label, len(results) > 1))
    finish_kind(ax, shown, reference, None if reference is None else f"paper: below {reference:g} (softmax maps)")
    ax.set(xlabel="block", ylabel="cross-head similarity")
    block_axis(ax, _depth(results))
    # one model: its kind goes in the title as well (legend labels are wrapped, so a long model name stays legible)
    only = next(iter(results.values())) if len(results) == 1 else None
    ax.set_title("Similarity between heads of one block" + (
        f" ({kind_name(only, shown)})" if only is not None else ""))
    legend_right(ax)
    return ax


@styled
def plot_cross_head_by_kind(results: Mapping[str, ProbeResult], reference: float | None = 0.3,
                            colors: Mapping[str, Any] | None = None,
                            baselines: Mapping[str, ProbeResult] | None = None,
                            axes: Sequence[Axes] | None = None) -> list[Axes]:
    """Fig. 3(c) split by map kind, as ``plot_neighbor_similarity_by_kind``: softmax maps (ViT, and Re-attention
    models before Θ) with the paper's ``reference`` on the first panel, maps after Θ + BatchNorm on the second."""
    kinds = present(results.values())
    new = axes is None
    axes = kind_panels(kinds, axes)
    cols = _colors(list(results), colors)
    for ax, k in zip(axes, kinds):
        sub = {lab: r for lab, r in results.items() if k in r.attention}
        base = {lab: b for lab, b in (baselines or {}).items() if lab in sub and k in b.attention}
        plot_cross_head(sub, k, reference, cols, base, ax=ax)
        ax.set_title(PANEL_TITLES.get(k, k))
    _outer_xlabels(axes)
    if new:
        axes[0].figure.suptitle("Similarity between heads of one block")
    return axes
