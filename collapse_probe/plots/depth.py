"""Depth scaling: Fig. 3(b) similar blocks vs depth and Fig. 1 top-1 accuracy vs depth, one line per model family.

    ax = plot_similar_blocks({"vit": [r16, r24, r32], "deepvit": [d16, d24, d32]}, what="count")
    ax = plot_accuracy_vs_depth({"vit": {16: 78.9, 24: 79.4}, "deepvit": {16: 79.1, 24: 80.1}})
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes

from ..probing.result import ProbeResult
from .data import pick_kind
from .style import axes_or_new, family_color, styled

PAPER_SIMILAR_BLOCKS = {16: 5, 24: 11, 32: 15}  # ViT-16B/24B/32B, DeepViT: 0 at every depth (repository table)


def similar_block_points(results: Sequence[ProbeResult], threshold: float = 0.9, k: int = 1,
                         reduction: str = "mean", kind: str = "auto") -> list[tuple[int, int, float]]:
    """(depth, number of similar blocks, ratio) per result, sorted by depth."""
    pts = []
    for r in results:
        s = r.summary(pick_kind(r, kind), threshold, k, reduction)  # type: ignore[arg-type]
        pts.append((r.depth, s["count"], s["ratio"]))
    return sorted(pts)


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
    ax: Axes | None = None,
) -> Axes:
    """Fig. 3(b): number (``what="count"``) or ratio (``"ratio"``) of similar blocks against depth.

    One line per family (in order), x = depth, y = count or count / depth; ``reference`` {depth: count} is drawn
    last as hollow markers (converted to a ratio when ``what="ratio"``).
    """
    if what not in ("count", "ratio"):
        raise ValueError(f"what must be 'count' or 'ratio', got {what!r}")
    ax = axes_or_new(ax)
    for fam, results in families.items():
        pts = similar_block_points(results, threshold, k, reduction, kind)
        x = [p[0] for p in pts]
        y = [p[1] if what == "count" else p[2] for p in pts]
        ax.plot(x, y, marker="o", color=(colors or {}).get(fam, family_color(fam)), label=fam)
    if reference:
        d = sorted(reference)
        y = [reference[v] if what == "count" else reference[v] / v for v in d]
        ax.plot(d, y, ls="none", marker="s", mfc="none", color="0.3", ms=6, label=reference_label)
    ax.set(xlabel="depth (blocks)", ylabel="similar blocks" if what == "count" else "similar blocks / depth")
    ax.set_title(f"{'Number' if what == 'count' else 'Ratio'} of similar blocks (sim > {threshold:g}, k={k})")
    if what == "ratio":
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.set_ylim(bottom=-0.5)
    ax.legend(loc="upper left")
    return ax


@styled
def plot_accuracy_vs_depth(families: Mapping[str, Mapping[int, float]], colors: Mapping[str, Any] | None = None,
                           ax: Axes | None = None) -> Axes:
    """Fig. 1: top-1 accuracy (%) against depth, one line per family ({family: {depth: top1}}), in order."""
    ax = axes_or_new(ax)
    for fam, accs in families.items():
        d = sorted(accs)
        ax.plot(d, [accs[v] for v in d], marker="o", color=(colors or {}).get(fam, family_color(fam)), label=fam)
    ax.set(xlabel="depth (blocks)", ylabel="top-1 accuracy (%)")
    ax.set_title("Accuracy vs depth")
    depths = sorted({d for accs in families.values() for d in accs})
    if depths:
        ax.set_xticks(depths)
    ax.legend(loc="best")
    return ax
