"""Figures of intervention reports: how much the outputs change when the blocks after block k are intervened on,
next to how similar block k's attention is to the block before it.

    from collapse_probe.plots.intervene import plot_intervention_figure
    axes = plot_intervention_figure(report)          # report: probing.outcome.InterventionReport
    save_figure(axes[0].figure, "out/intervention")

Blocks are numbered from 1, as people read them (the CSV's ``block``); each function takes a report, accepts
``ax=None`` (``axes=None`` for the two-panel figure), returns what it drew on and never calls ``show()``.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes

from ..probing.outcome import InterventionReport
from .kinds import finish_kind
from .style import axes_or_new, block_axis, legend_below, legend_right, new_figure, styled

_WHAT = {"reuse": "blocks after k reuse block k's map", "skip": "blocks after k skipped",
         "uniform": "blocks after k: uniform attention"}


def _name(report: InterventionReport) -> str:
    return report.model.architecture or (report.model.checkpoint or "model")


@styled
def plot_output_change(report: InterventionReport, ax: Axes | None = None) -> Axes:
    """Per intervention (x: its block k, 1-based): fraction of top-1 predictions changed with its Wilson 95 % band,
    the accuracy drop where labels exist, and the mean KL(p_orig || p_intervened) on a second y-axis."""
    ax = axes_or_new(ax, (5.6, 3.8))
    rows = report.rows()
    by_mode: dict[str, list[dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).append(r)
    twin = ax.twinx()
    twin.grid(False)
    twin.spines["right"].set_visible(True)
    for i, (mode, rs) in enumerate(by_mode.items()):
        x = np.array([r["block"] for r in rs])
        changed = np.array([r["changed"] for r in rs], dtype=float)
        lo, hi = (np.array([r[k] for r in rs], dtype=float) for k in ("changed_ci_low", "changed_ci_high"))
        if len(x) > 2:
            ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.18, lw=0)
        else:  # a band needs a run of points; a few get error bars
            ax.errorbar(x, changed, yerr=[changed - lo, hi - changed], fmt="none", ecolor=f"C{i}", capsize=3)
        ax.plot(x, changed, marker="o", ms=3, color=f"C{i}", label=f"{mode}: 1 − agreement (95 % CI)")
        drop = np.array([-r["accuracy_change"] for r in rs], dtype=float)
        if np.isfinite(drop).any():
            ax.plot(x, drop, ls="--", color=f"C{i}", alpha=0.8, label=f"{mode}: accuracy drop")
        twin.plot(x, [r["kl"] for r in rs], ls=":", marker="s", ms=2.5, color=f"C{i + 3}", label=f"{mode}: mean KL")
    ax.set(xlabel="block k (" + "; ".join(_WHAT.get(m, m) for m in by_mode) + ")", ylabel="fraction of images")
    twin.set_ylabel("mean KL(p_orig ‖ p_intervened)")
    kl = [r["kl"] for r in rows if not math.isnan(r["kl"])]
    twin.set_ylim(bottom=0, top=max(kl) * 1.05 if kl and max(kl) > 0 else 1)
    ax.set_ylim(-0.02, 1.02)
    block_axis(ax, _depth(report))
    legend_below(ax.figure, [ax, twin])  # the right side holds the KL axis: the legend goes under the figure
    ax.set_title(f"{_name(report)}: output change ({report.images.count} images)")
    return ax


@styled
def plot_block_similarity(report: InterventionReport, ax: Axes | None = None) -> Axes:
    """The applied maps' similarity of block k with block k − 1 (``report.similarity``; 1-based block numbers),
    by the rule of ``plots.kinds``: the threshold line for softmax maps only; maps after Θ + BatchNorm ("mixed") get
    a note and a y scale fitted to their data."""
    ax = axes_or_new(ax, (6.4, 3.4))
    sim = report.similarity
    if sim:
        x = np.array(sim["blocks"])  # 1-based (InterventionReport reads older 0-based files renumbered)
        y = np.array([np.nan if v is None else v for v in sim["neighbor"]], dtype=float)
        ax.plot(x, y, marker="o", ms=3, color="0.25", gid=sim["kind"], label=f"{sim['kind']}: block k vs k − 1")
        finish_kind(ax, sim["kind"], sim.get("threshold"))
        legend_right(ax)
    else:
        ax.text(0.5, 0.5, "similarity not probed", ha="center", va="center", transform=ax.transAxes)
    block_axis(ax, _depth(report))
    ax.set(xlabel="block k", ylabel="mean column cosine with block k − 1")
    ax.set_title("Attention similarity (maps that multiply V)")
    return ax


@styled
def plot_intervention_figure(report: InterventionReport, axes: list[Axes] | None = None) -> list[Axes]:
    """Output change against k (``plot_output_change``) next to the similarity curve (``plot_block_similarity``),
    on a shared block axis, with one legend under both."""
    if axes is None:
        fig = new_figure((11.0, 4.2))
        axes = list(fig.subplots(1, 2, sharex=True, gridspec_kw={"width_ratios": [1.2, 1.0]}))
    plot_output_change(report, axes[0])
    plot_block_similarity(report, axes[1])
    fig = axes[0].figure
    for old in list(fig.legends):
        old.remove()
    twins = [a for a in fig.axes if a not in axes]  # the KL axis of the first panel
    legend_below(fig, [axes[0], *twins, *axes[1:]], ncol=4)
    return axes


def _depth(report: InterventionReport) -> int:
    """The last block number any row or the similarity curve mentions."""
    blocks = [r["block"] for r in report.rows()] + [b + 1 for b in (report.similarity or {}).get("blocks", [])]
    return int(report.depth or max(blocks, default=1))
