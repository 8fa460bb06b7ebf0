"""Depth scaling: Fig. 3(b) similar blocks vs depth and Fig. 1 top-1 accuracy vs depth, one line per model family.

    ax = plot_similar_blocks({"vit": [r16, r24, r32], "deepvit": [d16, d24, d32]}, what="count")
    ax = plot_paper_similar_blocks("count")        # the paper's ImageNet counts, on their own axes
    ax = plot_accuracy_vs_depth({"vit": {16: 78.9, 24: 79.4}, "deepvit": {16: 79.1, 24: 80.1}},
                                intervals={"vit": {16: (77.0, 80.6), 24: (77.6, 81.1)}}, seeds={"vit": {16: 1, 24: 3}})
    lo, hi = wilson_interval(332, 360)             # 95% interval of a proportion, as fractions
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from ..metrics.bootstrap import wilson
from ..probing.result import ProbeResult
from .data import pick_kind
from .kinds import one_kind
from .style import (
    BASELINE_LABEL,
    MIXED_NOTE,
    axes_or_new,
    family_color,
    kind_name,
    legend_right,
    note,
    styled,
    twin_style,
)

# The paper's repository table (ImageNet, 197 tokens): ViT-16B/24B/32B, and DeepViT with 0 at every depth. The paper
# does not say how it reduced the per-(head, token) cosines to one number per block.
PAPER_SIMILAR_BLOCKS = {16: 5, 24: 11, 32: 15}
PAPER_SIMILAR_BLOCKS_DEEPVIT = {16: 0, 24: 0, 32: 0}
_TWIN_MARKERS = ("o", "^", "s", "D", "v")


wilson_interval = wilson  # the one Wilson interval (metrics.bootstrap), under the name the figures have used


def similar_block_points(results: Sequence[ProbeResult], threshold: float = 0.9, k: int = 1,
                         reduction: str = "mean", kind: str = "auto") -> list[tuple[int, int, float]]:
    """(depth, number of similar blocks, ratio) per result, sorted by depth."""
    pts = []
    for r in results:
        s = r.summary(pick_kind(r, kind), threshold, k, reduction)  # type: ignore[arg-type]
        pts.append((r.depth, s["count"], s["ratio"]))
    return sorted(pts)


def _ylim(ax: Axes, what: str) -> None:
    if what == "ratio":
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.set_ylim(bottom=-0.5)


def _one_depth(label: str, depths: Sequence[int]) -> str:
    """A legend label that says when a "vs depth" line is a single point."""
    return f"{label}, one depth only" if len(set(depths)) == 1 else label


def _family_kind(results: Sequence[ProbeResult], kind: str) -> str | None:
    """The kind a family shows: its maps that multiply V for "auto", else ``kind`` where every result has it."""
    if not results:
        return None
    if kind == "auto":
        return pick_kind(results[0], kind)
    return kind if all(kind in r.attention for r in results) else None


@styled
def plot_similar_blocks(
    families: Mapping[str, Sequence[ProbeResult]],
    what: str = "count",
    threshold: float = 0.9,
    k: int = 1,
    reduction: str = "mean",
    kind: str = "auto",
    reference: Mapping[int, float] | None = None,
    reference_label: str = "paper ViT (ImageNet)",
    colors: Mapping[str, Any] | None = None,
    baselines: Mapping[str, Sequence[ProbeResult]] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Fig. 3(b): number (``what="count"``) or ratio (``"ratio"``) of similar blocks against depth.

    One map kind per axes (``plots.kinds``): ``kind="auto"`` takes each family's maps that multiply V and raises
    ValueError when they differ ("probs" for ViT, "mixed" for DeepViT: draw ``kind="probs"`` and ``kind="mixed"`` on
    two axes); with a named kind, families without it are left out. One line per family (in order; the legend names
    its map kind, and says "one depth only" for a single point), x = depth, y = count or count / depth;
    ``baselines`` ({family: untrained twins}) as hollow grey markers; ``reference`` {depth: count} last as hollow
    squares (converted to a ratio when ``what="ratio"``; the paper's numbers belong on their own axes, see
    ``plot_paper_similar_blocks``). A mixed panel notes that its blocks were counted with the softmax cut.
    """
    if what not in ("count", "ratio"):
        raise ValueError(f"what must be 'count' or 'ratio', got {what!r}")
    used = {fam: _family_kind(rs, kind) for fam, rs in families.items()}
    used = {fam: u for fam, u in used.items() if u is not None}
    shown = one_kind(used.values(), "plot_similar_blocks", "one axes per kind (kind='probs', kind='mixed')")
    ax = axes_or_new(ax, (6.6, 3.4))
    y = 1 if what == "count" else 2
    for fam, u in used.items():
        results = families[fam]
        pts = similar_block_points(results, threshold, k, reduction, u)
        color = (colors or {}).get(fam, family_color(fam))
        ax.plot([p[0] for p in pts], [p[y] for p in pts], marker="o", color=color, gid=u,
                label=_one_depth(f"{fam} ({kind_name(results[0], u)})", [p[0] for p in pts]))
    for i, (fam, twins) in enumerate((baselines or {}).items()):
        tk = _family_kind(twins, used.get(fam, kind))
        if fam not in used or tk is None:
            continue
        pts = similar_block_points(twins, threshold, k, reduction, tk)
        ax.plot([p[0] for p in pts], [p[y] for p in pts], ls="none", marker=_TWIN_MARKERS[i % len(_TWIN_MARKERS)],
                mfc="none", color="0.5", ms=6, gid=tk, label=f"{fam}: {BASELINE_LABEL}")
    if reference:
        d = sorted(reference)
        ax.plot(d, [reference[v] if what == "count" else reference[v] / v for v in d], ls="none", marker="s",
                mfc="none", color="0.3", ms=6, label=reference_label)
    if shown == "mixed":
        note(ax, f"{MIXED_NOTE}; blocks counted with the same cut {threshold:g}, which is set for softmax maps")
    ax.set(xlabel="depth (blocks)", ylabel="similar blocks" if what == "count" else "similar blocks / depth")
    ax.set_title(f"{'Number' if what == 'count' else 'Ratio'} of similar blocks (sim > {threshold:g}, k={k}, "
                 f"reduction: {reduction})", fontsize=9)
    depths = sorted({r.depth for fam in used for r in families[fam]})
    if depths:
        ax.set_xticks(depths)
    _ylim(ax, what)
    legend_right(ax)
    return ax


@styled
def plot_paper_similar_blocks(what: str = "count", vit: Mapping[int, float] = PAPER_SIMILAR_BLOCKS,
                              deepvit: Mapping[int, float] = PAPER_SIMILAR_BLOCKS_DEEPVIT,
                              ax: Axes | None = None) -> Axes:
    """The paper's similar-block counts (ImageNet, repository table) on axes of their own, as hollow markers:
    other data, other models and an unpublished reduction, so not to be read on the axes of our measurements."""
    if what not in ("count", "ratio"):
        raise ValueError(f"what must be 'count' or 'ratio', got {what!r}")
    ax = axes_or_new(ax)
    for fam, table, marker in (("ViT", vit, "s"), ("DeepViT", deepvit, "D")):
        d = sorted(table)
        y = [table[v] if what == "count" else table[v] / v for v in d]
        ax.plot(d, y, ls=":", marker=marker, mfc="none", color=family_color(fam.lower()), ms=6,
                label=f"paper {fam}")
    ax.set(xlabel="depth (blocks)", ylabel="similar blocks" if what == "count" else "similar blocks / depth")
    ax.set_title("Paper: ImageNet, 197 tokens (reduction unpublished)")
    ax.set_xticks(sorted(set(vit) | set(deepvit)))
    _ylim(ax, what)
    legend_right(ax)
    return ax


@styled
def plot_accuracy_vs_depth(families: Mapping[str, Mapping[int, float]], colors: Mapping[str, Any] | None = None,
                           intervals: Mapping[str, Mapping[int, tuple[float, float]]] | None = None,
                           seeds: Mapping[str, Mapping[int, int]] | None = None,
                           per_seed: Mapping[str, Mapping[int, Sequence[float]]] | None = None,
                           ax: Axes | None = None) -> Axes:
    """Fig. 1: top-1 accuracy (%) against depth, one line per family ({family: {depth: top1}}), in order.

    ``intervals`` {family: {depth: (low, high)}} in % are drawn as vertical bars (one ``vlines`` collection per
    family, in order); ``seeds`` {family: {depth: count}} is printed next to each point ("1 seed", "3 seeds");
    ``per_seed`` values are drawn as small hollow dots where a point has more than one.
    """
    ax = axes_or_new(ax, (6.6, 3.4))
    for fam, accs in families.items():
        d = sorted(accs)
        color = (colors or {}).get(fam, family_color(fam))
        ax.plot(d, [accs[v] for v in d], marker="o", color=color, label=_one_depth(fam, d))
        ci = (intervals or {}).get(fam, {})
        have = [v for v in d if v in ci and np.isfinite(ci[v]).all()]
        if have:
            ax.vlines(have, [ci[v][0] for v in have], [ci[v][1] for v in have], color=color, lw=1.2, alpha=0.8)
        for v in d:
            vals = (per_seed or {}).get(fam, {}).get(v, ())
            if len(vals) > 1:
                ax.plot([v] * len(vals), vals, ls="none", marker="o", ms=2.5, mfc="none", color=color, alpha=0.7)
            n = (seeds or {}).get(fam, {}).get(v)
            if n is not None:
                ax.annotate(f"{n} seed{'s' if n != 1 else ''}", (v, accs[v]), xytext=(4, -9),
                            textcoords="offset points", fontsize=6.5, color=color)
    ax.set(xlabel="depth (blocks)", ylabel="top-1 accuracy (%)")
    ax.set_title("Accuracy vs depth" + (" (bars: Wilson 95% interval over validation images)" if intervals else ""))
    depths = sorted({d for accs in families.values() for d in accs})
    if depths:
        ax.set_xticks(depths)
    legend_right(ax)
    return ax


@styled
def plot_threshold_sweep(sweeps: Mapping[str, Sequence[Mapping[str, Any]]], reduction: str = "mean",
                         colors: Mapping[str, Any] | None = None, kind: str | None = None,
                         ax: Axes | None = None) -> Axes:
    """Similar-block count against the block threshold, one line per model (``probing.verdict.sweep`` rows of one
    map kind, keyed by label) and its untrained twin grey dashed where the rows carry one (each twin its own hollow
    marker when there are several); ``reduction``: "mean" or "ratio"; ``kind``: the map kind of the rows ("mixed"
    adds the note that the thresholds are set for softmax maps)."""
    ax = axes_or_new(ax, (6.6, 3.4))
    many = sum(all(r[f"twin_count_{reduction}"] is not None for r in rows) for rows in sweeps.values()) > 1
    i = 0
    for label, rows in sweeps.items():
        t = [r["threshold"] for r in rows]
        ax.plot(t, [r[f"count_{reduction}"] for r in rows], marker="o", ms=3, label=label,
                color=(colors or {}).get(label), gid=kind)
        twin = [r[f"twin_count_{reduction}"] for r in rows]
        if all(v is not None for v in twin):
            ax.plot(t, twin, **{**twin_style(i, many), "lw": 1}, label=f"{label}: {BASELINE_LABEL}", gid=kind)
            i += 1
    if kind == "mixed":
        note(ax, f"{MIXED_NOTE}; the thresholds are set for softmax maps")
    ax.set_xlabel("block threshold")
    ax.set_ylabel(f"similar blocks ({reduction} reduction)")
    top = max([1.0] + [float(np.nanmax(line.get_ydata())) for line in ax.lines if len(line.get_ydata())])
    ax.set_ylim(-0.5, top + 0.5)  # counts: from 0, even when every count is 0
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    legend_right(ax)
    return ax
