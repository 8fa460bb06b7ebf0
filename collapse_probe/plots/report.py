"""The figures of the ``audit`` and ``compare`` reports, in the shared plot style (PNG bytes to embed in HTML).

    from collapse_probe.plots.report import plot_block_curves, figure_png
    png = figure_png(plot_block_curves(result, threshold=0.9).figure)

Like every plot function here they take results, accept ``ax=None`` and return the axes. Blocks are numbered from 1
(block 1 = module ``blocks.0``), as in the paper and every table and report. The untrained twin
(``result.baseline``), where measured, is drawn grey dashed beside each curve.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..probing.result import ProbeResult
from .data import pick_kind
from .style import DPI, STYLE, axes_or_new, styled, threshold_line, unit_ylim


@styled
def plot_block_curves(result: ProbeResult, threshold: float = 0.9, k: int = 1, reduction: str = "mean",
                      ax: Axes | None = None) -> Axes:
    """Per block: similarity with the previous k blocks and cross-head similarity (each map kind), and the token
    features' similarity with the previous block, against the threshold."""
    ax = axes_or_new(ax, (6.0, 3.6))
    twin = result.baseline
    for kind, st in result.attention.items():
        blocks = np.asarray(st.blocks) + 1
        ax.plot(blocks, st.neighbor(k, reduction), marker="o", ms=3, label=f"{kind}: similarity with previous {k}")
        ax.plot(blocks, st.cross_head, ls="--", marker=".", label=f"{kind}: cross-head similarity")
        if twin is not None and kind in twin.attention:
            ax.plot(blocks, twin.attention[kind].neighbor(k, reduction), ls="--", color="0.55", lw=1,
                    label=f"{kind}: untrained twin, similarity with previous {k}")
    if result.features is not None:
        f = result.features
        prev = [np.nan] + np.diag(np.asarray(f.similarity), -1).tolist()
        ax.plot(np.asarray(f.blocks) + 1, prev, ls=":", label="tokens: similarity with previous")
    threshold_line(ax, threshold)
    unit_ylim(ax)
    ax.set(xlabel="block (1-based)", ylabel="cosine similarity")
    ax.set_title("Per-block collapse curves")
    ax.legend(fontsize=7, loc="lower right")
    return ax


@styled
def plot_rank(result: ProbeResult, kind: str = "auto", ax: Axes | None = None) -> Axes:
    """Effective rank and 99%-energy rank of the attention maps per block."""
    ax = axes_or_new(ax, (6.0, 3.4))
    st = result.attention[pick_kind(result, kind)]
    blocks = np.asarray(st.blocks) + 1
    ax.plot(blocks, st.effective_rank, marker="o", ms=3, label="effective rank")
    ax.plot(blocks, st.energy_rank, marker="s", ms=3, label="rank (99% energy)")
    twin = result.baseline.attention.get(st.kind) if result.baseline is not None else None
    if twin is not None:
        ax.plot(blocks, twin.effective_rank, ls="--", color="0.55", lw=1, label="effective rank, untrained twin")
    ax.set(xlabel="block (1-based)", ylabel="rank")
    ax.set_title(f"Attention rank per block ({st.kind})")
    ax.legend()
    return ax


@styled
def plot_relative_depth(results: dict[str, ProbeResult], kind: str = "auto", k: int = 1, reduction: str = "mean",
                        threshold: float | None = None, ax: Axes | None = None) -> Axes:
    """Similarity with the previous k blocks of several models against relative depth (0 = first, 1 = last block);
    ``kind="auto"``: each model's maps that multiply V (``ProbeResult.applied_kind``), named in the legend."""
    ax = axes_or_new(ax, (6.5, 3.8))
    for name, res in results.items():
        st = res.attention.get(pick_kind(res, kind) if kind == "auto" or kind in res.attention else kind)
        if st is None:
            continue
        depth = max(len(st.blocks) - 1, 1)
        rel = [b / depth for b in st.blocks]
        ax.plot(rel, st.neighbor(k, reduction), marker="o", ms=3,
                label=f"{name} ({st.kind})" if kind == "auto" else name)
        twin = res.baseline.attention.get(st.kind) if res.baseline is not None else None
        if twin is not None:
            ax.plot(rel, twin.neighbor(k, reduction), ls="--", color="0.55", lw=1, label=f"{name}: untrained twin")
    if threshold is not None:
        threshold_line(ax, threshold)
    unit_ylim(ax)
    ax.set(xlabel="relative depth (0 = block 1, 1 = last block)", ylabel=f"similarity with previous {k}")
    ax.set_title(f"Cross-layer similarity ({'maps that multiply V' if kind == 'auto' else kind})")
    ax.legend()
    return ax


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (for embedding in a report)."""
    import matplotlib as mpl

    buf = io.BytesIO()
    with mpl.rc_context(STYLE):
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
