"""Audit a ViT checkpoint for attention collapse: the verdict, its evidence and every metric in one folder.

    from collapse_probe.reports.audit import audit, compare
    metrics = audit("vit.pt", "out/vit_audit", num_images=32)     # report.html / .md, per_block.csv, metrics.json
    table, _ = compare(["a.safetensors", "b.pt"], output=None)     # side-by-side markdown table (reports.compare)

CLI: ``collapse-probe audit CKPT --output DIR`` and ``collapse-probe compare CKPT1 CKPT2 ... [--output DIR]``.
report.html is one page that answers first (``reports.audit_page``): the verdict line, the per-block decision
columns, the per-block measures the verdict rests on, then the rest. metrics.json holds every number except the
per-image rows (``per_image=True`` / ``--per-image`` keeps them; they are tens of MB for deep models).
The folder is written by ``outputs.write_folder``: everything is computed and rendered first, then the folder is
swapped into place in one atomic step; an existing folder is replaced only if collapse-probe wrote all of it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..outputs import check_replaceable, write_folder
from ..probing.blocks import Criterion, block_rows
from ..probing.checked import probe
from ..probing.result import ProbeResult, finite
from ..probing.verdict import judge
from .audit_page import render_html, render_markdown
from .compare import COMPARE_FORMATS, SUMMARY_COLUMNS, compare, compare_rows, render_compare  # noqa: F401
from .text import csv_text

FIGURES = ("block_measures", "block_curves", "similarity_heatmap", "rank", "cross_head")


def verdict(result: ProbeResult, threshold: float | None = None, k: int | None = None, reduction: str | None = None,
            notes: Sequence[str] = ()) -> dict[str, Any]:
    """``probing.verdict.judge`` with these settings (default: those probed with): the verdict line, which blocks are
    similar by the paper's metric, which are collapsed beyond the untrained twin, the regimes, and sentences
    (1-based blocks). Judged on the maps that multiply V (``ProbeResult.applied_kind``); the other kind beside."""
    return judge(result, Criterion.of(result, threshold=threshold, neighbors=k, reduction=reduction), notes=notes)


def _figures(result: ProbeResult, threshold: float, k: int, reduction: str) -> dict[str, bytes]:
    """The report's figures, the evidence per block first; each curve the twin has is drawn beside it."""
    from ..plots.measures import plot_measures_figure
    from ..plots.report import figure_png, plot_block_curves, plot_rank
    from ..plots.similarity import plot_cross_head, plot_similarity_heatmap

    label = result.model.architecture or "model"
    figs = {"block_measures": plot_measures_figure(result)[0],
            "block_curves": plot_block_curves(result, threshold, k, reduction)[0],  # one panel per map kind
            "similarity_heatmap": plot_similarity_heatmap(result, "auto", reduction),
            "rank": plot_rank(result, "auto"),
            "cross_head": plot_cross_head({label: result}, reference=None,
                                          baselines={label: result.baseline} if result.baseline is not None else None)}
    return {name: figure_png(ax.figure) for name, ax in figs.items()}


def audit(
    checkpoint: str | Path,
    output: str | Path,
    threshold: float = 0.9,
    neighbors: int = 1,
    reduction: str = "mean",
    baseline: bool = True,
    notes: Sequence[str] = (),
    intervene: bool = True,
    per_image: bool = False,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Probe ``checkpoint`` (and, unless ``baseline=False``, its untrained twin) and write the report folder; returns
    the metrics.json content. ``notes``: extra verdict sentences; ``intervene`` (default): measure every block's
    redundancy by intervention (``probing.redundancy``: reuse the previous block's map in it alone, then the last run
    of redundant blocks sharing one map) and rest the verdict on it; ``per_image``: keep the per-image rows in
    metrics.json.

    ``probe_kwargs`` go to ``probing.run.probe`` (model_name, images, num_images, batch_size, device, trust_pickle,
    key, rank_images, num_heads, mean, std, max_memory, storage, progress, entry_threshold, baseline_seed).
    """
    check_replaceable(output)  # before minutes of probing, not after
    result = probe(checkpoint, threshold=threshold, reduction=reduction, neighbors=neighbors, baseline=baseline,
                   intervene=intervene, **probe_kwargs)
    return write_audit(result, output, threshold, neighbors, reduction, notes, probe_kwargs, per_image)


def write_audit(result: ProbeResult, output: str | Path, threshold: float, neighbors: int, reduction: str,
                notes: Sequence[str] = (), config: dict[str, Any] | None = None,
                per_image: bool = False) -> dict[str, Any]:
    """Render a probed ``result`` into the report folder ``output`` (replaced atomically); returns metrics.json."""
    probe_kwargs = config or {}
    crit = Criterion.of(result, threshold=threshold, neighbors=neighbors, reduction=reduction)
    vd = judge(result, crit, notes=notes)  # on result.redundancy when it was measured
    figures = _figures(result, threshold, neighbors, reduction)
    metrics = finite({**result.to_dict(per_image=per_image), "summary": vd,
                      "heads_source": result.model.heads_source,
                      "config": {"threshold": threshold, "neighbors": neighbors, "reduction": reduction,
                                 "per_image": per_image,
                                 **{k: (str(v) if isinstance(v, Path) else v) for k, v in probe_kwargs.items()}}})
    files = {"metrics.json": json.dumps(metrics, indent=1, allow_nan=False).encode(),
             "report.md": render_markdown(result, vd, figures, crit).encode(),
             "report.html": render_html(result, vd, figures, crit).encode(),
             "per_block.csv": csv_text(block_rows(result, crit)).encode(),
             **{f"{name}.png": png for name, png in figures.items()}}
    write_folder(output, files)
    return metrics
