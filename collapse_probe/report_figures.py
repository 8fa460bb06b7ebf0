"""Minimal matplotlib figures for the audit report (functions take results, accept ax=None, return the axes).

    ax = similarity_heatmap(result.attention["probs"])          # L x L cross-layer similarity
    png = figure_png(ax.figure)                                   # bytes, for embedding

No pyplot state is touched (figures are ``matplotlib.figure.Figure`` objects), so nothing is ever shown.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .results import AttentionStats, ProbeResult


def _ax(ax: Axes | None, size: tuple[float, float] = (5.5, 4.0)) -> Axes:
    ax = ax if ax is not None else Figure(figsize=size, layout="constrained").subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are integers
    return ax


def similarity_heatmap(stats: AttentionStats, reduction: str = "mean", ax: Axes | None = None) -> Axes:
    """[L, L] cross-layer attention similarity (mean column cosine, or fraction above the threshold)."""
    ax = _ax(ax, (5.0, 4.2))
    m = stats.matrix(reduction)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="upper")
    ticks = range(len(stats.blocks))
    step = max(1, len(stats.blocks) // 12)
    ax.set_xticks(list(ticks)[::step], [str(b) for b in stats.blocks][::step])
    ax.set_yticks(list(ticks)[::step], [str(b) for b in stats.blocks][::step])
    ax.set_xlabel("block")
    ax.set_ylabel("block")
    ax.set_title(f"cross-layer similarity ({stats.kind}, {reduction})")
    ax.figure.colorbar(im, ax=ax, shrink=0.85)
    return ax


def block_curves(result: ProbeResult, threshold: float = 0.9, k: int = 1, reduction: str = "mean",
                 ax: Axes | None = None) -> Axes:
    """Per block: similarity with the previous k blocks (each map kind), cross-head similarity, threshold line."""
    ax = _ax(ax, (6.0, 3.6))
    for kind, st in result.attention.items():
        ax.plot(st.blocks, st.neighbor(k, reduction), marker="o", ms=3, label=f"{kind}: similarity with previous")
        ax.plot(st.blocks, st.cross_head, ls="--", marker=".", label=f"{kind}: cross-head similarity")
    if result.features is not None:
        f = result.features
        prev = [np.nan] + np.diag(f.similarity, -1).tolist()
        ax.plot(f.blocks, prev, ls=":", label="tokens: similarity with previous")
    ax.axhline(threshold, color="grey", lw=0.8, ls="-.", label=f"threshold {threshold}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("block")
    ax.set_ylabel("cosine similarity")
    ax.set_title("per-block collapse curves")
    ax.legend(fontsize=7, loc="lower right")
    return ax


def rank_plot(stats: AttentionStats, ax: Axes | None = None) -> Axes:
    """Effective rank and 99%-energy rank of the attention maps per block."""
    ax = _ax(ax, (6.0, 3.4))
    ax.plot(stats.blocks, stats.effective_rank, marker="o", ms=3, label="effective rank")
    ax.plot(stats.blocks, stats.energy_rank, marker="s", ms=3, label="rank (99% energy)")
    ax.set_xlabel("block")
    ax.set_ylabel("rank")
    ax.set_title(f"attention rank per block ({stats.kind})")
    ax.legend(fontsize=7)
    return ax


def cross_head_plot(stats: AttentionStats, ax: Axes | None = None) -> Axes:
    """Mean similarity between different heads of each block (1 = all heads attend alike)."""
    ax = _ax(ax, (6.0, 3.4))
    ax.bar(stats.blocks, stats.cross_head, color="tab:orange")
    ax.set_ylim(0, 1)
    ax.set_xlabel("block")
    ax.set_ylabel("mean cross-head cosine")
    ax.set_title(f"cross-head similarity ({stats.kind})")
    return ax


def overlay_curves(results: dict[str, ProbeResult], kind: str = "probs", k: int = 1, reduction: str = "mean",
                   threshold: float | None = None, ax: Axes | None = None) -> Axes:
    """Similarity with the previous block of several models, against relative depth (0 = first, 1 = last block)."""
    ax = _ax(ax, (6.5, 3.8))
    ax.xaxis.set_major_locator(MaxNLocator())  # relative depth is fractional
    for name, res in results.items():
        st = res.attention.get(kind)
        if st is None:
            continue
        depth = max(len(st.blocks) - 1, 1)
        ax.plot([b / depth for b in st.blocks], st.neighbor(k, reduction), marker="o", ms=3, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="grey", lw=0.8, ls="-.")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("relative depth")
    ax.set_ylabel(f"similarity with previous {k}")
    ax.set_title(f"cross-layer similarity ({kind})")
    ax.legend(fontsize=7)
    return ax


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
