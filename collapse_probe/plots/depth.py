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

from ..metrics.bootstrap import wilson
from ..probing.result import ProbeResult
from .data import pick_kind
from .style import BASELINE_LABEL, MIXED_NOTE, axes_or_new, family_color, kind_name, note, styled

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
    premix: bool = False,
    ax: Axes | None = None,
) -> Axes:
    """Fig. 3(b): number (``what="count"``) or ratio (``"ratio"``) of similar blocks against depth.

    One line per family (in order; the legend names its map kind), x = depth, y = count or count / depth;
    ``premix``: also a dashed line of the softmax maps before Θ for families whose maps that multiply V are "mixed";
    ``baselines`` ({family: untrained twins}) as hollow grey markers; ``reference`` {depth: count} last as hollow
    squares (converted to a ratio when ``what="ratio"``; the paper's numbers belong on their own axes, see
    ``plot_paper_similar_blocks``).
    """
    if what not in ("count", "ratio"):
        raise ValueError(f"what must be 'count' or 'ratio', got {what!r}")
    ax = axes_or_new(ax)
    kinds = set()
    for fam, results in families.items():
        pts = similar_block_points(results, threshold, k, reduction, kind)
        used = pick_kind(results[0], kind) if results else kind
        kinds.add(used)
        color = (colors or {}).get(fam, family_color(fam))
        ax.plot([p[0] for p in pts], [p[1 if what == "count" else 2] for p in pts], marker="o", color=color,
                label=f"{fam} ({kind_name(results[0], used)})" if results else fam)
        if premix and used == "mixed" and all("probs" in r.attention for r in results):
            pts = similar_block_points(results, threshold, k, reduction, "probs")
            ax.plot([p[0] for p in pts], [p[1 if what == "count" else 2] for p in pts], marker="o", ms=3,
                    ls="--", color=color, alpha=0.7, label=f"{fam} (probs, before Θ)")
    for i, (fam, twins) in enumerate((baselines or {}).items()):
        pts = similar_block_points(twins, threshold, k, reduction, kind)
        ax.plot([p[0] for p in pts], [p[1 if what == "count" else 2] for p in pts], ls="none",
                marker=_TWIN_MARKERS[i % len(_TWIN_MARKERS)], mfc="none", color="0.5", ms=6,
                label=f"{fam}: {BASELINE_LABEL}")
    if reference:
        d = sorted(reference)
        y = [reference[v] if what == "count" else reference[v] / v for v in d]
        ax.plot(d, y, ls="none", marker="s", mfc="none", color="0.3", ms=6, label=reference_label)
    if "mixed" in kinds:
        note(ax, MIXED_NOTE)
    ax.set(xlabel="depth (blocks)", ylabel="similar blocks" if what == "count" else "similar blocks / depth")
    ax.set_title(f"{'Number' if what == 'count' else 'Ratio'} of similar blocks (sim > {threshold:g}, k={k}, "
                 f"reduction: {reduction})", fontsize=9)
    depths = sorted({r.depth for rs in families.values() for r in rs})
    if depths:
        ax.set_xticks(depths)
    _ylim(ax, what)
    ax.legend(loc="upper left")
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
                label=f"paper {fam} (ImageNet)")
    ax.set(xlabel="depth (blocks)", ylabel="similar blocks" if what == "count" else "similar blocks / depth")
    ax.set_title("Paper: ImageNet, 197 tokens (reduction unpublished)")
    ax.set_xticks(sorted(set(vit) | set(deepvit)))
    _ylim(ax, what)
    ax.legend(loc="upper left")
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
    ax = axes_or_new(ax)
    for fam, accs in families.items():
        d = sorted(accs)
        color = (colors or {}).get(fam, family_color(fam))
        ax.plot(d, [accs[v] for v in d], marker="o", color=color, label=fam)
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
    ax.legend(loc="best")
    return ax


@styled
def plot_threshold_sweep(sweeps: Mapping[str, Sequence[Mapping[str, Any]]], reduction: str = "mean",
                         colors: Mapping[str, Any] | None = None, ax: Axes | None = None) -> Axes:
    """Similar-block count against the block threshold, one line per model (``probing.verdict.sweep`` rows, keyed by
    label) and its untrained twin dashed grey where the rows carry one; ``reduction``: "mean" or "ratio"."""
    ax = axes_or_new(ax)
    for label, rows in sweeps.items():
        t = [r["threshold"] for r in rows]
        line, = ax.plot(t, [r[f"count_{reduction}"] for r in rows], marker="o", ms=3, label=label,
                        color=(colors or {}).get(label))
        twin = [r[f"twin_count_{reduction}"] for r in rows]
        if all(v is not None for v in twin):
            ax.plot(t, twin, ls="--", color="0.55", lw=1, label=f"{label} (untrained twin)")
    ax.set_xlabel("block threshold")
    ax.set_ylabel(f"similar blocks ({reduction} reduction)")
    ax.legend(loc="best", fontsize=7)
    return ax
