"""Cross-block attention similarity: Fig. 3(a) neighbour curves, the L x L heatmap, Fig. 3(c) cross-head similarity.

    ax = plot_neighbor_similarity({"vit_micro_d32": result}, ks=(1, 2, 3), threshold=0.9)
    save_figure(ax.figure, "figures/fig3a")

The x axis is the 1-based block number, as in the paper ("similarity above 0.9 after block 17").
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes

from ..probing.result import ProbeResult
from .data import pick_kind
from .style import K_STYLES, axes_or_new, styled, threshold_line, unit_ylim


def _colors(labels: Sequence[str], colors: Mapping[str, Any] | None) -> dict[str, Any]:
    return {lab: (colors or {}).get(lab, f"C{i % 10}") for i, lab in enumerate(labels)}


@styled
def plot_neighbor_similarity(
    results: Mapping[str, ProbeResult],
    ks: Sequence[int] = (1, 2, 3),
    threshold: float | None = 0.9,
    kind: str = "auto",
    reduction: str = "mean",
    colors: Mapping[str, Any] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Fig. 3(a): each block's similarity with its k previous blocks (one curve per model and k), threshold line.

    Line order: for each model (in ``results`` order), one line per k; y = ``AttentionStats.neighbor(k)``.
    """
    ax = axes_or_new(ax)
    cols = _colors(list(results), colors)
    for label, res in results.items():
        used = pick_kind(res, kind)
        st = res.attention[used]
        x = np.asarray(st.blocks) + 1
        for k in ks:
            name = (f"{label} ({used})" if len(results) > 1 else label) + ("" if len(ks) == 1 else f", k={k}")
            ax.plot(x, st.neighbor(k, reduction), ls=K_STYLES.get(k, "-."), color=cols[label], marker="o",
                    ms=2.5, label=name)
    if threshold is not None:
        threshold_line(ax, threshold)
    unit_ylim(ax)
    prev = "previous block" if tuple(ks) == (1,) else "previous k blocks"
    ax.set(xlabel="block", ylabel=f"similarity with {prev} ({reduction})")
    ax.set_title("Attention similarity with neighbouring blocks")
    ax.legend(loc="best")
    return ax


@styled
def plot_similarity_heatmap(result: ProbeResult, kind: str = "auto", reduction: str = "mean",
                            title: str | None = None, ax: Axes | None = None) -> Axes:
    """The L x L cross-block attention similarity matrix (``AttentionStats.matrix``), blocks numbered from 1."""
    ax = axes_or_new(ax, (4.2, 3.6))
    k = pick_kind(result, kind)
    st = result.attention[k]
    m = st.matrix(reduction)
    n = len(st.blocks)
    low = min(0.0, float(np.nanmin(m))) if np.isfinite(m).any() else 0.0
    im = ax.imshow(m, vmin=low, vmax=1, cmap="viridis", origin="upper", interpolation="nearest",
                   extent=(0.5, n + 0.5, n + 0.5, 0.5))
    _block_ticks(ax, st.blocks)
    ax.grid(False)
    ax.set(xlabel="block", ylabel="block")
    ax.set_title(title or f"Attention similarity ({k}, {reduction})")
    ax.figure.colorbar(im, ax=ax, shrink=0.85, label="similarity")
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
                    colors: Mapping[str, Any] | None = None, ax: Axes | None = None) -> Axes:
    """Fig. 3(c): mean similarity between different heads of each block (``AttentionStats.cross_head``)."""
    ax = axes_or_new(ax)
    cols = _colors(list(results), colors)
    for label, res in results.items():
        st = res.attention[pick_kind(res, kind)]
        ax.plot(np.asarray(st.blocks) + 1, st.cross_head, color=cols[label], marker="o", ms=2.5, label=label)
    if reference is not None:
        threshold_line(ax, reference, label=f"paper: below {reference:g}")
    unit_ylim(ax)
    ax.set(xlabel="block", ylabel="cross-head similarity")
    ax.set_title("Similarity between heads of one block")
    ax.legend(loc="best")
    return ax
