"""Fig. 4: token features stop changing in deep blocks, and this tracks attention similarity.

    axes = plot_feature_figure(result)            # 3 panels: similarity with the last block, L x L, attention curve
    r = feature_attention_correlation(result)     # Pearson r printed in the third panel's title
    rp = feature_attention_partial_correlation(result)   # the same, with the block index partialled out

Both curves tend to change monotonically with depth, so their raw Pearson r is high for any two such curves; the
partial r given the block index (Pearson r of the residuals of both after a straight-line fit on the block index)
says whether they also move together beyond that shared trend.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes

from ..probing.result import ProbeResult
from .data import pick_kind
from .kinds import finish_kind
from .style import (
    BASELINE_LABEL,
    BASELINE_STYLE,
    axes_or_new,
    block_axis,
    legend_below,
    legend_right,
    matrix_block_ticks,
    new_figure,
    offdiag_limits,
    styled,
    unit_ylim,
)


def _features(result: ProbeResult):
    if result.features is None:
        raise ValueError("result has no block-output features; probe with kinds including 'out'")
    return result.features


def feature_vs_last(result: ProbeResult) -> np.ndarray:
    """[L]: mean token-feature cosine of each block's output with the final block's output."""
    return np.asarray(_features(result).similarity[:, -1], dtype=float)


def _curve_pairs(result: ProbeResult, kind: str, reduction: str) -> np.ndarray:
    """[P, 3]: (block index, feature similarity with the last block, attention similarity with the previous block)
    for every block that has both (finite attention value)."""
    f = feature_vs_last(result)
    st = result.attention[pick_kind(result, kind)]
    a = st.neighbor(1, reduction)
    fpos = {b: i for i, b in enumerate(_features(result).blocks)}
    rows = [(b, f[fpos[b]], a[i]) for i, b in enumerate(st.blocks) if b in fpos and np.isfinite(a[i])]
    return np.asarray(rows, dtype=float).reshape(-1, 3)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) < 1e-12 * max(1.0, np.abs(x).max()) or np.std(y) < 1e-12 * max(1.0, np.abs(y).max()):
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def feature_attention_correlation(result: ProbeResult, kind: str = "auto", reduction: str = "mean") -> float:
    """Pearson r over blocks between feature similarity with the last block and attention similarity with the
    previous block (NaN when fewer than 3 blocks have both, or a curve is constant)."""
    pairs = _curve_pairs(result, kind, reduction)
    return _pearson(pairs[:, 1], pairs[:, 2])


def feature_attention_partial_correlation(result: ProbeResult, kind: str = "auto", reduction: str = "mean") -> float:
    """Partial correlation of the same two curves given the block index: Pearson r of their residuals after a
    least-squares line on the block index each (NaN with fewer than 4 blocks, or when a residual is constant)."""
    pairs = _curve_pairs(result, kind, reduction)
    if len(pairs) < 4:  # 3 points leave one degree of freedom: the residual correlation would be +-1 by construction
        return math.nan
    design = np.column_stack([np.ones(len(pairs)), pairs[:, 0]])
    resid = pairs[:, 1:] - design @ np.linalg.lstsq(design, pairs[:, 1:], rcond=None)[0]
    return _pearson(resid[:, 0], resid[:, 1])


@styled
def plot_feature_vs_last(result: ProbeResult, label: str | None = None, baseline: ProbeResult | None = None,
                         ax: Axes | None = None) -> Axes:
    """Fig. 4 (left): similarity of each block's token features with the final block's (x = 1-based block), labelled
    ``label`` (default "token features, trained"); ``baseline`` (an untrained twin) as a grey dashed line."""
    ax = axes_or_new(ax, (6.4, 3.4))
    f = _features(result)
    ax.plot(np.asarray(f.blocks) + 1, feature_vs_last(result), marker="o", ms=2.5, color="C2",
            label=label or "token features, trained")
    if baseline is not None and baseline.features is not None:
        ax.plot(np.asarray(baseline.features.blocks) + 1, feature_vs_last(baseline), **BASELINE_STYLE,
                label=BASELINE_LABEL)
    unit_ylim(ax)
    ax.set(xlabel="block", ylabel="token-feature similarity with last block")
    block_axis(ax, max(f.blocks) + 1)
    ax.set_title("Feature similarity with the final block")
    legend_right(ax)
    return ax


@styled
def plot_feature_heatmap(result: ProbeResult, ax: Axes | None = None) -> Axes:
    """Fig. 4 (middle): L x L mean token-feature cosine between block outputs; colours span the off-diagonal range
    (printed in the colour bar's label), the diagonal (1) is clipped to the top colour."""
    ax = axes_or_new(ax, (4.2, 3.6))
    f = _features(result)
    n = len(f.blocks)
    m = np.asarray(f.similarity, dtype=float)
    lo, hi = offdiag_limits(m)
    im = ax.imshow(m, vmin=lo, vmax=hi, origin="upper", interpolation="nearest",
                   extent=(0.5, n + 0.5, n + 0.5, 0.5))
    matrix_block_ticks(ax, f.blocks)
    ax.grid(False)
    ax.set(xlabel="block", ylabel="block", title="Token-feature similarity")
    bar = ax.figure.colorbar(im, ax=ax, shrink=0.95)
    bar.set_label(f"similarity (off-diagonal {lo:.3g}…{hi:.3g})", fontsize=8)
    return ax


def correlation_text(r: float, partial: float) -> str:
    """"r = 0.86, partial r | block = 0.12" (NaN as "undefined")."""
    def fmt(v: float) -> str:
        return f"{v:.2f}" if np.isfinite(v) else "undefined"
    return f"r = {fmt(r)}, partial r | block = {fmt(partial)}"


@styled
def plot_attention_vs_features(result: ProbeResult, kind: str = "auto", reduction: str = "mean",
                               threshold: float | None = 0.9, baseline: ProbeResult | None = None,
                               ax: Axes | None = None) -> Axes:
    """Fig. 4 (right): attention similarity with the previous block; the title gives its Pearson r with the
    feature-similarity-with-last-block curve and the partial r given the block index. The threshold is drawn for
    softmax maps only; "mixed" maps get ``MIXED_NOTE`` and a y scale fitted to the data. ``baseline``: grey dashed."""
    ax = axes_or_new(ax, (6.4, 3.4))
    k = pick_kind(result, kind)
    st = result.attention[k]
    ax.plot(np.asarray(st.blocks) + 1, st.neighbor(1, reduction), marker="o", ms=2.5, color="C0", gid=k,
            label=f"attention ({k}) vs previous block")
    if baseline is not None:
        bst = baseline.attention[k if k in baseline.attention else baseline.applied_kind]
        ax.plot(np.asarray(bst.blocks) + 1, bst.neighbor(1, reduction), **BASELINE_STYLE, gid=bst.kind,
                label=BASELINE_LABEL)
    finish_kind(ax, k, threshold)
    r = feature_attention_correlation(result, k, reduction)
    rp = feature_attention_partial_correlation(result, k, reduction)
    ax.set(xlabel="block", ylabel="attention similarity")
    block_axis(ax, max(st.blocks) + 1)
    ax.set_title(f"Attention similarity with features: {correlation_text(r, rp)}", fontsize=8.5)
    legend_right(ax)
    return ax


@styled
def plot_feature_figure(result: ProbeResult, kind: str = "auto", reduction: str = "mean", title: str | None = None,
                        baseline: ProbeResult | None = None, axes: Sequence[Axes] | None = None) -> np.ndarray:
    """All of Fig. 4 on three axes (new 1 x 3 figure when ``axes`` is None); returns the axes. ``baseline`` (an
    untrained twin) is drawn grey dashed on the two curve panels; one legend under the figure names every curve."""
    if axes is None:
        fig = new_figure((13.5, 4.0))
        axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 0.9, 1]})
        if title:
            fig.suptitle(title)
    plot_feature_vs_last(result, baseline=baseline, ax=axes[0])
    plot_feature_heatmap(result, ax=axes[1])
    plot_attention_vs_features(result, kind, reduction, baseline=baseline, ax=axes[2])
    legend_below(axes[0].figure, axes, ncol=4)
    return np.asarray(axes)
