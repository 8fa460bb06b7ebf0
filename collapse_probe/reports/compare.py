"""Several checkpoints side by side: each one's verdict line, a summary row per checkpoint, per-block rows of all.

    table, results = compare(["a.safetensors", "b.pt"], output=None, fmt="table")   # verdict lines, then the table
    rows = compare_rows(results)                                                    # SUMMARY_COLUMNS per checkpoint

CLI: ``collapse-probe compare CKPT1 CKPT2 ... [--output DIR] [--format table|markdown|json|csv]``. Every checkpoint
is judged once (``probing.verdict.judge``) and every format shows the same verdicts; block numbers are 1-based; the
column names are those of every other CSV (``checkpoint`` first, intervals ``*_ci_low`` / ``*_ci_high``).
"""
from __future__ import annotations

import base64
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import BadArgumentError
from ..outputs import check_replaceable, write_folder
from ..probing.blocks import Criterion, block_rows
from ..probing.checked import probe
from ..probing.result import ProbeResult, finite
from ..probing.verdict import judge, spans
from .audit_page import CSS, html_table, md_table
from .audit_page import fmt as cell_text
from .labels import unique_labels
from .text import aligned, cell, csv_text

SUMMARY_COLUMNS = ("checkpoint", "verdict", "architecture", "kind", "depth", "num_heads", "heads_source",
                   "similar_blocks", "similar_count", "similar_count_ci_low", "similar_count_ci_high",
                   "twin_similar_count", "collapsed_beyond_twin", "similar_ratio", "onset", "regimes",
                   "cross_head_mean", "effective_rank_min")
COMPARE_FORMATS = ("table", "markdown", "json", "csv")


def names(paths: Sequence[str | Path]) -> list[str]:
    """Unique labels: the file names, with parent folders added where two are the same (``labels.unique_labels``)."""
    return unique_labels(paths)


def verdicts(results: dict[str, ProbeResult], threshold: float | None = None, k: int | None = None,
             reduction: str | None = None) -> dict[str, dict[str, Any]]:
    """``judge`` of every result, with these settings (default: those each was probed with)."""
    return {n: judge(r, Criterion.of(r, threshold=threshold, neighbors=k, reduction=reduction))
            for n, r in results.items()}


def compare_rows(results: dict[str, ProbeResult], threshold: float | None = None, k: int | None = None,
                 reduction: str | None = None, judged: dict[str, dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """One dict per checkpoint with ``SUMMARY_COLUMNS`` (1-based block numbers), from the same verdict as ``audit``
    (``judged``: already judged with these settings, so they are not judged again)."""
    judged = judged or verdicts(results, threshold, k, reduction)
    rows = []
    for name, r in results.items():
        vd = judged[name]
        st, m = r.attention[vd["kind"]], r.model
        iv, base = vd["count_interval"] or [None, None], vd["baseline"]
        rows.append({"checkpoint": name, "verdict": vd["verdict"], "architecture": m.architecture, "kind": vd["kind"],
                     "depth": vd["depth"], "num_heads": m.num_heads, "heads_source": m.heads_source,
                     "similar_blocks": vd["similar_blocks"], "similar_count": vd["count"],
                     "similar_count_ci_low": iv[0], "similar_count_ci_high": iv[1],
                     "twin_similar_count": base["count"] if base else None,
                     "collapsed_beyond_twin": vd["collapsed_beyond_twin"], "similar_ratio": vd["ratio"],
                     "onset": vd["onset"],
                     "regimes": "; ".join(f"{n} {spans(b)}" for n, b in vd["regimes"].items() if b) or "none",
                     "cross_head_mean": float(np.nanmean(st.cross_head)),
                     "effective_rank_min": float(np.nanmin(st.effective_rank))})
    return rows


def _summary_cells(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``SUMMARY_COLUMNS`` and one row of cells per checkpoint, for the markdown and HTML tables."""
    head = list(SUMMARY_COLUMNS)
    lists = ("similar_blocks", "collapsed_beyond_twin")
    return head, [[spans(r[c]) if c in lists and r[c] is not None else cell_text(r[c]) for c in head] for r in summary]


def _ci(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None else f"{lo:.0f}-{hi:.0f}"


def render_compare(results: dict[str, ProbeResult], fmt: str = "table", threshold: float | None = None,
                   k: int | None = None, reduction: str | None = None,
                   judged: dict[str, dict[str, Any]] | None = None) -> str:
    """table: each checkpoint's verdict line, then one short line each; markdown: every summary column; json: the
    versioned summary of every checkpoint and per-block rows; csv: the per-block rows of every checkpoint
    (``probing.blocks.block_rows``, whose ``checkpoint`` column holds the names)."""
    if fmt not in COMPARE_FORMATS:
        raise BadArgumentError(f"unknown format {fmt!r}; choose {', '.join(COMPARE_FORMATS)}")
    judged = judged or verdicts(results, threshold, k, reduction)
    summary = compare_rows(results, threshold, k, reduction, judged)
    vd = next(iter(judged.values()))
    note = textwrap.fill(f"similar: {vd['metric']}, {vd['reduction_text']}; blocks 1-based; 95% CI: of the count, "
                         "over images; twin: untrained twin on the same images; beyond_twin: also above the twin's "
                         f"centred similarity by {vd['criterion']['twin_margin']}. {vd['paper_reduction']}.", 120)
    if fmt in ("csv", "json"):
        blocks = [row for n, r in results.items() for row in
                  block_rows(r, Criterion.of(r, threshold=threshold, neighbors=k, reduction=reduction), n)]
        if fmt == "csv":
            return csv_text(blocks)
        return json.dumps(finite({"schema": vd["schema"], "schema_version": vd["schema_version"],
                                  "block_numbering": vd["block_numbering"], "criterion": vd["criterion"],
                                  "summary": summary, "verdicts": judged, "per_block": blocks}), indent=1,
                          allow_nan=False)
    if fmt == "markdown":
        head, body = _summary_cells(summary)
        return md_table(head, body) + f"\n\n{note}\n"
    lines = [f"{r['checkpoint']}: {r['verdict']}" for r in summary]
    head = ["checkpoint", "kind", "depth", "similar", "95% CI", "twin", "beyond_twin", "onset", "regimes"]
    body = [[r["checkpoint"], r["kind"], str(r["depth"]), str(r["similar_count"]),
             _ci(r["similar_count_ci_low"], r["similar_count_ci_high"]), cell(r["twin_similar_count"]),
             "-" if r["collapsed_beyond_twin"] is None else spans(r["collapsed_beyond_twin"]), cell(r["onset"]),
             r["regimes"]] for r in summary]
    return "\n".join(lines) + "\n\n" + aligned(head, body) + f"\n\n{note}\n"


def compare(
    checkpoints: Sequence[str | Path],
    output: str | Path | None = None,
    threshold: float = 0.9,
    neighbors: int = 1,
    reduction: str = "mean",
    baseline: bool = True,
    fmt: str = "markdown",
    per_image: bool = False,
    **probe_kwargs: Any,
) -> tuple[str, dict[str, ProbeResult]]:
    """Probe several checkpoints on the same images; the side-by-side table in ``fmt`` (``render_compare``'s
    formats; default markdown) and the results (with ``output``, also a folder with compare.md, compare.html,
    metrics.json, per_block.csv and the overlaid curves). Each checkpoint is judged once for all of them.
    ``per_image``: keep the per-image rows in metrics.json (large; default: summaries and intervals only).
    """
    if len(checkpoints) < 2:
        raise BadArgumentError("compare needs at least two checkpoints")
    if output is not None:
        check_replaceable(output)
    results: dict[str, ProbeResult] = {}
    labels = names(checkpoints)  # r1/m.pt and r2/m.pt: two labels, never one result replacing the other
    show = probe_kwargs.pop("progress", True)
    with tqdm(list(zip(labels, checkpoints)), desc="checkpoints", unit="ckpt", disable=not show) as bar:
        for i, (n, c) in enumerate(bar, 1):  # closed on any exit, so an interrupt's one line stays the last
            results[n] = probe(c, threshold=threshold, reduction=reduction, neighbors=neighbors, baseline=baseline,
                               progress=show and f"checkpoint {i} of {len(labels)} ({n})", **probe_kwargs)
    judged = verdicts(results, threshold, neighbors, reduction)
    table = render_compare(results, fmt, threshold, neighbors, reduction, judged)
    if output is not None:
        from ..plots.report import figure_png, plot_relative_depth

        markdown = table if fmt == "markdown" else render_compare(results, "markdown", threshold, neighbors,
                                                                   reduction, judged)
        head, rows = _summary_cells(compare_rows(results, threshold, neighbors, reduction, judged))
        png = figure_png(plot_relative_depth(results, "auto", neighbors, reduction, threshold)[0].figure)
        uri = f"data:image/png;base64,{base64.b64encode(png).decode()}"
        lines = "\n".join(f"- **{n}**: {vd['verdict']}" for n, vd in judged.items())
        md = f"# Attention-collapse comparison\n\n{lines}\n\n{markdown}\n![curves]({uri})\n"
        items = "".join(f"<li><strong>{n}</strong>: {vd['verdict']}</li>" for n, vd in judged.items())
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>comparison</title><style>{CSS}</style>"
                f"</head><body><h1>Attention-collapse comparison</h1><div class=verdict><ul>{items}</ul></div>"
                f"{html_table(head, rows)}<img alt='curves' src='{uri}'></body></html>\n")
        saved = {}
        for n, r in results.items():
            d = r.to_dict(per_image=per_image)
            saved[n] = {**d, "summary": judged[n]}
        metrics = {"tool": {"name": "collapse-probe", "version": __version__},
                   "config": {"threshold": threshold, "neighbors": neighbors, "reduction": reduction,
                              **{k: (str(v) if isinstance(v, Path) else v) for k, v in probe_kwargs.items()}},
                   "checkpoints": saved}
        write_folder(output, {"compare.md": md.encode(), "compare.html": page.encode(), "curves.png": png,
                              "per_block.csv": render_compare(results, "csv", threshold, neighbors, reduction,
                                                              judged).encode(),
                              "metrics.json": json.dumps(finite(metrics), indent=1, allow_nan=False).encode()})
    return table, results
