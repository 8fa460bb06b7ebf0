"""The figures of the ``audit`` and ``compare`` reports, in the shared plot style (PNG bytes to embed in HTML).

    from collapse_probe.plots.report import plot_block_curves, figure_png
    png = figure_png(plot_block_curves(result, threshold=0.9)[0].figure)   # one panel per map kind

Like every plot function here they take results, accept ``ax=None`` (``axes=None`` for one panel per map kind,
``plots.kinds``) and return the axes. Blocks are numbered from 1 (block 1 = module ``blocks.0``), as in the paper
and every table and report. The untrained twin (``result.baseline``), where measured, is drawn grey dashed beside
each curve; legends sit right of the axes.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..probing.result import ProbeResult
from .data import pick_kind
from .kinds import PANEL_TITLES, finish_kind, kind_panels, ordered, present
from .style import (
    BASELINE_LABEL,
    BASELINE_STYLE,
    DPI,
    STYLE,
    axes_or_new,
    block_axis,
    kind_name,
    legend_right,
    styled,
    twin_style,
    unit_ylim,
)


@styled
def plot_block_curves(result: ProbeResult, threshold: float = 0.9, k: int = 1, reduction: str = "mean",
                      axes: Sequence[Axes] | None = None) -> list[Axes]:
    """Per block, one panel per map kind (``plots.kinds``): similarity with the previous k blocks, cross-head
    similarity and the twin's similarity, with the threshold on the softmax panel only; then, where features were
    probed, a panel of the token features' similarity with the previous block (and the twin's). Returns the axes."""
    kinds = ordered(result.attention)
    panels = kinds + (["tokens"] if result.features is not None else [])
    axes = kind_panels(panels, axes, width=7.6, height=2.6)
    twin = result.baseline
    last = result.depth
    for ax, kind in zip(axes, kinds):
        st = result.attention[kind]
        blocks = np.asarray(st.blocks) + 1
        ax.plot(blocks, st.neighbor(k, reduction), marker="o", ms=3, gid=kind,
                label=f"{kind_name(result, kind)}: similarity with previous {k}")
        ax.plot(blocks, st.cross_head, ls="--", marker=".", gid=kind, label=f"{kind_name(result, kind)}: cross-head")
        if twin is not None and kind in twin.attention:
            ax.plot(np.asarray(twin.attention[kind].blocks) + 1, twin.attention[kind].neighbor(k, reduction),
                    **BASELINE_STYLE, gid=kind, label=f"{BASELINE_LABEL}: similarity with previous {k}")
        finish_kind(ax, kind, threshold)
        ax.set(ylabel="cosine similarity", title=PANEL_TITLES.get(kind, kind))
    if result.features is not None:
        ax = axes[-1]
        for res, style, label in ((result, {"color": "C2", "marker": "o", "ms": 3},
                                   "token features: similarity with previous"),
                                  (twin, BASELINE_STYLE, f"{BASELINE_LABEL}: token features")):
            if res is None or res.features is None:
                continue
            f = res.features
            prev = [np.nan] + np.diag(np.asarray(f.similarity), -1).tolist()
            ax.plot(np.asarray(f.blocks) + 1, prev, **style, gid="tokens", label=label)
        unit_ylim(ax)
        ax.set(ylabel="cosine similarity", title="block outputs (token features)")
    for ax in axes:
        block_axis(ax, last)
        ax.set_xlabel("")
        legend_right(ax)
    axes[-1].set_xlabel("block")
    return axes


@styled
def plot_rank(result: ProbeResult, kind: str = "auto", ax: Axes | None = None) -> Axes:
    """Effective rank and 99%-energy rank of the attention maps per block."""
    ax = axes_or_new(ax, (7.4, 3.4))
    st = result.attention[pick_kind(result, kind)]
    blocks = np.asarray(st.blocks) + 1
    ax.plot(blocks, st.effective_rank, marker="o", ms=3, label="effective rank", gid=st.kind)
    ax.plot(blocks, st.energy_rank, marker="s", ms=3, label="rank (99% energy)", gid=st.kind)
    twin = result.baseline.attention.get(st.kind) if result.baseline is not None else None
    if twin is not None:
        ax.plot(np.asarray(twin.blocks) + 1, twin.effective_rank, **BASELINE_STYLE, gid=st.kind,
                label=f"effective rank, {BASELINE_LABEL}")
    ax.set(xlabel="block", ylabel="rank")
    block_axis(ax, result.depth)
    ax.set_title(f"Attention rank per block ({kind_name(result, st.kind)})")
    legend_right(ax)
    return ax


@styled
def plot_relative_depth(results: dict[str, ProbeResult], kind: str = "auto", k: int = 1, reduction: str = "mean",
                        threshold: float | None = None, axes: Sequence[Axes] | None = None) -> list[Axes]:
    """Similarity with the previous k blocks of several models, one panel per map kind (``plots.kinds``: softmax
    maps of every model, a Re-attention model's before Θ, on the first; maps after Θ + BatchNorm on the second;
    ``kind`` other than "auto": that kind's panel only). x: the 1-based block when all models have one depth, else
    relative depth (0 = first, 1 = last block). ``threshold`` on the softmax panel only. Returns the axes."""
    kinds = present(results.values()) if kind == "auto" else [kind]
    axes = kind_panels(kinds, axes, width=7.6, height=2.9)
    depths = {r.depth for r in results.values()}
    relative = len(depths) > 1
    many = sum(r.baseline is not None for r in results.values()) > 1
    for ax, kd in zip(axes, kinds):
        for i, (name, res) in enumerate(results.items()):  # a model keeps its colour (and its twin its marker)
            st = res.attention.get(kd)
            if st is None:
                continue
            depth = max(res.depth - 1, 1)
            x = [b / depth for b in st.blocks] if relative else np.asarray(st.blocks) + 1
            ax.plot(x, st.neighbor(k, reduction), marker="o", ms=3, color=f"C{i % 10}", gid=kd,
                    label=f"{name} ({kind_name(res, kd)})")
            tw = res.baseline.attention.get(kd) if res.baseline is not None else None
            if tw is not None:
                ax.plot(x, tw.neighbor(k, reduction), **twin_style(i, many), gid=kd, label=f"{name}: {BASELINE_LABEL}")
        finish_kind(ax, kd, threshold)
        ax.set(ylabel=f"similarity with previous {k}", title=PANEL_TITLES.get(kd, kd))
        if not relative:
            block_axis(ax, max(depths))
        ax.set_xlabel("")
        legend_right(ax)
    axes[-1].set_xlabel("relative depth (0 = block 1, 1 = last block)" if relative else "block")
    return axes


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (for embedding in a report)."""
    import matplotlib as mpl

    buf = io.BytesIO()
    with mpl.rc_context(STYLE):
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
