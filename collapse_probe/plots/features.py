"""Fig. 4: token features stop changing in deep blocks, and this tracks attention similarity.

    axes = plot_feature_figure(result)            # 3 panels: similarity with the last block, L x L, attention curve
    r = feature_attention_correlation(result)     # Pearson r printed in the third panel's title
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes

from ..probing.result import ProbeResult
from .data import pick_kind
from .style import axes_or_new, new_figure, styled, threshold_line, unit_ylim


def _features(result: ProbeResult):
    if result.features is None:
        raise ValueError("result has no block-output features; probe with kinds including 'out'")
    return result.features


def feature_vs_last(result: ProbeResult) -> np.ndarray:
    """[L]: mean token-feature cosine of each block's output with the final block's output."""
    return np.asarray(_features(result).similarity[:, -1], dtype=float)


def feature_attention_correlation(result: ProbeResult, kind: str = "auto", reduction: str = "mean") -> float:
    """Pearson r over blocks between feature similarity with the last block and attention similarity with the
    previous block (NaN when fewer than 3 blocks have both, or a curve is constant)."""
    f = feature_vs_last(result)
    st = result.attention[pick_kind(result, kind)]
    a = st.neighbor(1, reduction)
    fpos = {b: i for i, b in enumerate(_features(result).blocks)}
    pairs = [(f[fpos[b]], a[i]) for i, b in enumerate(st.blocks) if b in fpos and np.isfinite(a[i])]
    if len(pairs) < 3:
        return math.nan
    x, y = np.array(pairs).T
    if np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


@styled
def plot_feature_vs_last(result: ProbeResult, label: str | None = None, ax: Axes | None = None) -> Axes:
    """Fig. 4 (left): similarity of each block's token features with the final block's (x = 1-based block)."""
    ax = axes_or_new(ax)
    f = _features(result)
    ax.plot(np.asarray(f.blocks) + 1, feature_vs_last(result), marker="o", ms=2.5, color="C2", label=label)
    unit_ylim(ax)
    ax.set(xlabel="block", ylabel="token-feature similarity with last block")
    ax.set_title("Feature similarity with the final block")
    if label:
        ax.legend(loc="lower right")
    return ax


@styled
def plot_feature_heatmap(result: ProbeResult, ax: Axes | None = None) -> Axes:
    """Fig. 4 (middle): L x L mean token-feature cosine between block outputs."""
    ax = axes_or_new(ax, (4.2, 3.6))
    f = _features(result)
    n = len(f.blocks)
    m = np.asarray(f.similarity, dtype=float)
    im = ax.imshow(m, vmin=min(0.0, float(np.nanmin(m))), vmax=1, origin="upper", interpolation="nearest",
                   extent=(0.5, n + 0.5, n + 0.5, 0.5))
    step = max(1, int(np.ceil(n / 8)))
    pos = list(range(1, n + 1, step))
    ax.set_xticks(pos, [str(f.blocks[p - 1] + 1) for p in pos])
    ax.set_yticks(pos, [str(f.blocks[p - 1] + 1) for p in pos])
    ax.grid(False)
    ax.set(xlabel="block", ylabel="block", title="Token-feature similarity")
    ax.figure.colorbar(im, ax=ax, shrink=0.85, label="similarity")
    return ax


@styled
def plot_attention_vs_features(result: ProbeResult, kind: str = "auto", reduction: str = "mean",
                               threshold: float | None = 0.9, ax: Axes | None = None) -> Axes:
    """Fig. 4 (right): attention similarity with the previous block; title gives its Pearson r with the
    feature-similarity-with-last-block curve (``feature_attention_correlation``)."""
    ax = axes_or_new(ax)
    k = pick_kind(result, kind)
    st = result.attention[k]
    ax.plot(np.asarray(st.blocks) + 1, st.neighbor(1, reduction), marker="o", ms=2.5, color="C0",
            label=f"attention ({k}) vs previous block")
    if threshold is not None:
        threshold_line(ax, threshold)
    unit_ylim(ax)
    r = feature_attention_correlation(result, k, reduction)
    ax.set(xlabel="block", ylabel="attention similarity")
    ax.set_title(f"Attention similarity (r with features = {r:.2f})" if np.isfinite(r) else
                 "Attention similarity (r undefined)")
    ax.legend(loc="best")
    return ax


@styled
def plot_feature_figure(result: ProbeResult, kind: str = "auto", reduction: str = "mean", title: str | None = None,
                        axes: Sequence[Axes] | None = None) -> np.ndarray:
    """All of Fig. 4 on three axes (new 1 x 3 figure when ``axes`` is None); returns the axes."""
    if axes is None:
        fig = new_figure((13.5, 3.6))
        axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 0.9, 1]})
        if title:
            fig.suptitle(title)
    plot_feature_vs_last(result, ax=axes[0])
    plot_feature_heatmap(result, ax=axes[1])
    plot_attention_vs_features(result, kind, reduction, ax=axes[2])
    return np.asarray(axes)
