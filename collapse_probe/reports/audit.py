"""Audit a ViT checkpoint for attention collapse: every metric, figures and a plain-language verdict in one folder.

    from collapse_probe.audit import audit, compare
    metrics = audit("vit.pt", "out/vit_audit", num_images=32)     # report.md, report.html, metrics.json, *.png
    table, _ = compare(["a.safetensors", "b.pt"], output=None)     # side-by-side markdown table

CLI: ``collapse-probe audit CKPT --output DIR`` and ``collapse-probe compare CKPT1 CKPT2 ... [--output DIR]``.
The folder is written by ``outputs.write_folder``: everything is computed and rendered first, then the folder is
swapped into place in one atomic step; an existing folder is replaced only if collapse-probe wrote all of it.
"""
from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import BadArgumentError
from ..outputs import check_replaceable, write_folder
from ..probing.result import ProbeResult, finite
from ..probing.run import LOAD_OPTIONS, probe
from ..probing.blocks import Criterion, block_rows
from ..probing.verdict import judge, spans
from .labels import unique_labels
from .text import _SPECS, _missing, aligned, cell, csv_text

FIGURES = ("similarity_heatmap", "block_curves", "rank", "cross_head")


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def verdict(result: ProbeResult, threshold: float | None = None, k: int | None = None, reduction: str | None = None,
            notes: Sequence[str] = ()) -> dict[str, Any]:
    """``probing.verdict.judge`` with these settings (default: those probed with): which blocks are similar by the
    paper's metric, which are collapsed beyond the untrained twin, the regimes, and sentences (1-based blocks).

    Judged on the maps that multiply V (``ProbeResult.applied_kind``); the other kind is reported beside."""
    return judge(result, Criterion.of(result, threshold=threshold, neighbors=k, reduction=reduction), notes=notes)


def _figures(result: ProbeResult, threshold: float, k: int, reduction: str) -> dict[str, bytes]:
    """The report's figures; each curve the twin has is drawn beside it (plots.report)."""
    from ..plots.report import figure_png, plot_block_curves, plot_rank
    from ..plots.similarity import plot_cross_head, plot_similarity_heatmap

    axes = {"similarity_heatmap": plot_similarity_heatmap(result, "auto", reduction),
            "block_curves": plot_block_curves(result, threshold, k, reduction),
            "rank": plot_rank(result, "auto"),
            "cross_head": plot_cross_head({result.model.architecture or "model": result}, reference=None)}
    return {name: figure_png(ax.figure) for name, ax in axes.items()}


def _model_rows(result: ProbeResult) -> list[tuple[str, str]]:
    m, im = result.model, result.images
    return [
        ("checkpoint", str(m.checkpoint)), ("format", f"{m.format}" + (f" (entry '{m.key}')" if m.key else "")),
        ("architecture", f"{m.architecture} (source: {m.architecture_source})"),
        ("family", str(m.family)), ("depth", str(m.depth)),
        ("heads", f"{m.num_heads} (decided by: {m.heads_source})"),
        ("tokens", str(m.tokens or "-")), ("parameters", f"{m.params / 1e6:.2f}M"),
        ("input", f"{m.input_size} mean {m.mean} std {m.std} (source: {m.data_source})"),
        ("images", f"{im.count} from {im.source}"),
        ("untrained twin", _twin_text(result)),
        ("tool", f"collapse-probe {__version__}"),
    ]


def _twin_text(result: ProbeResult) -> str:
    if result.baseline is None:
        return "not measured (--no-baseline): counts cannot be told apart from initialisation"
    t = result.baseline.settings.get("twin", {})
    return f"{t.get('init', '?')}; BatchNorm statistics re-estimated on the same images ({t.get('batchnorm_batches')} "\
        "batches)"


# the names of reports/text.py (one scheme for table, CSV, JSON and this report)
_COLUMNS = ("block", "kind", "sim_prev", "sim_prev_low", "sim_prev_high", "twin_sim_prev", "floor_prev",
            "pearson_prev", "twin_pearson_prev", "row_cosine_prev", "entropy", "tv_uniform", "rank1_residual",
            "cross_head", "effective_rank", "feature_residual", "token_uniformity", "similar", "beyond_twin", "regime")


def _table_rows(result: ProbeResult, threshold: float, k: int, reduction: str) -> tuple[list[str], list[list[str]]]:
    rows = block_rows(result, Criterion.of(result, threshold=threshold, neighbors=k, reduction=reduction))
    cols = [c for c in _COLUMNS if any(c in r and not _missing(r[c]) for r in rows) or c in ("block", "kind")]
    return cols, [[cell(r.get(c), _SPECS.get(c, ".3f"), yes="yes") for c in cols] for r in rows]


def _table_note(result: ProbeResult, vd: dict[str, Any]) -> str:
    return (f"block: 1-based. similar: {vd['metric']}, {vd['reduction_text']} ({vd['paper_reduction']}); "
            f"beyond_twin: also above the twin's centred similarity by {vd['criterion']['twin_margin']}; the verdict "
            f"judges kind {result.applied_kind} (probs: softmax maps, mixed: after Re-attention). Definitions of every "
            "column: the README's metric section.")


def _sweep_table(vd: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["block threshold", "similar (mean)", "twin (mean)", "similar (ratio)", "twin (ratio)"]
    return head, [[f"{r['threshold']:.2f}", _fmt(r["count_mean"]), _fmt(r["twin_count_mean"]),
                   _fmt(r["count_ratio"]), _fmt(r["twin_count_ratio"])] for r in vd["sweep"]]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


_CAPTIONS = {"similarity_heatmap": "Cross-layer attention similarity (L x L)",
             "block_curves": "Per-block curves", "rank": "Attention rank per block",
             "cross_head": "Cross-head similarity per block"}
_CSS = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child{text-align:left}img{max-width:100%}.verdict{background:#fff8e1;padding:.6em 1em}")


def render_markdown(result: ProbeResult, vd: dict[str, Any], figures: dict[str, bytes], threshold: float, k: int,
                    reduction: str) -> str:
    """report.md: figures embedded as PNG data URIs, so the file stands alone."""
    head, rows = _table_rows(result, threshold, k, reduction)
    parts = [f"# Attention-collapse audit: {Path(str(result.model.checkpoint)).name}", "",
             _md_table(["", ""], [[a, b] for a, b in _model_rows(result)]), "", "## Verdict", ""]
    parts += [f"- {t}" for t in vd["text"]]
    sh, sr = _sweep_table(vd)
    parts += ["", "## Threshold sweep", "", f"Similar blocks of kind {vd['kind']} for each block threshold (per-entry "
              f"cut {vd['criterion']['entry_threshold']} for ratio).", "", _md_table(sh, sr)]
    parts += ["", "## Figures", ""]
    for name, png in figures.items():
        parts += [f"### {_CAPTIONS[name]}", "", f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})",
                  ""]
    parts += ["## Per block", "", _md_table(head, rows), "", _table_note(result, vd), "",
              f"Settings: threshold {threshold}, neighbours {k}, reduction {reduction}. All numbers: metrics.json.", ""]
    return "\n".join(parts)


def render_html(result: ProbeResult, vd: dict[str, Any], figures: dict[str, bytes], threshold: float, k: int,
                reduction: str) -> str:
    """report.html: one self-contained page (inline CSS, figures as base64 PNG)."""
    head, rows = _table_rows(result, threshold, k, reduction)
    title = html.escape(f"Attention-collapse audit: {Path(str(result.model.checkpoint)).name}")
    figs = "".join(f"<h3>{html.escape(_CAPTIONS[n])}</h3><img alt='{n}' src='data:image/png;base64,"
                   f"{base64.b64encode(p).decode()}'>" for n, p in figures.items())
    verdict_html = "".join(f"<li>{html.escape(t)}</li>" for t in vd["text"])
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body><h1>{title}</h1>{_html_table(['', ''], [[a, b] for a, b in _model_rows(result)])}"
            f"<h2>Verdict</h2><ul class='verdict'>{verdict_html}</ul><h2>Threshold sweep</h2>"
            f"{_html_table(*_sweep_table(vd))}<h2>Figures</h2>{figs}"
            f"<h2>Per block</h2>{_html_table(head, rows)}<p>{html.escape(_table_note(result, vd))}"
            f"</p><p>Settings: threshold {threshold}, neighbours {k}, "
            f"reduction {html.escape(reduction)}. All numbers: metrics.json.</p></body></html>\n")


def audit(
    checkpoint: str | Path,
    output: str | Path,
    threshold: float = 0.9,
    neighbors: int = 1,
    reduction: str = "mean",
    baseline: bool = True,
    notes: Sequence[str] = (),
    intervene: bool = False,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Probe ``checkpoint`` (and, unless ``baseline=False``, its untrained twin) and write the report folder; returns
    the metrics.json content. ``notes``: extra verdict sentences; ``intervene``: also run the cheap interventions
    (reuse, skip) on the flagged blocks and cite their measured output change in the verdict.

    ``probe_kwargs`` go to ``probing.run.probe`` (model_name, images, num_images, batch_size, device, trust_pickle,
    key, rank_images, num_heads, mean, std, max_memory, storage, progress, entry_threshold, baseline_seed).
    """
    check_replaceable(output)  # before minutes of probing, not after
    result = probe(checkpoint, threshold=threshold, reduction=reduction, neighbors=neighbors, baseline=baseline,
                   **probe_kwargs)
    if intervene:
        notes = [*notes, *_intervention_notes(checkpoint, result, threshold, neighbors, reduction, probe_kwargs)]
    return write_audit(result, output, threshold, neighbors, reduction, notes, probe_kwargs)


_MEASURE_OPTIONS = ("images", "num_images", "batch_size", "workers", "device", *LOAD_OPTIONS)


def _intervention_notes(checkpoint: str | Path, result: ProbeResult, threshold: float, k: int, reduction: str,
                        probe_kwargs: dict[str, Any]) -> list[str]:
    """``audit --intervene``: the cheap checks (reuse, skip) of the last run of blocks collapsed beyond the twin (or,
    without a twin, of the similar blocks), as verdict sentences citing the measured output change."""
    from ..probing.intervene import check_flagged
    from .intervene import intervention_sentences

    vd = verdict(result, threshold, k, reduction)
    flagged = vd["collapsed_beyond_twin"] if vd["collapsed_beyond_twin"] is not None else vd["similar_blocks"]
    opts = {key: v for key, v in probe_kwargs.items() if key in _MEASURE_OPTIONS}
    images = opts.pop("images", None)
    report = check_flagged(checkpoint, images, [b - 1 for b in flagged], **opts)
    if report is None:
        return ["Intervention: no block is flagged, so nothing was checked."]
    return ["Intervention (measured): " + t for t in intervention_sentences(report)]


def write_audit(result: ProbeResult, output: str | Path, threshold: float, neighbors: int, reduction: str,
                notes: Sequence[str] = (), config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Render a probed ``result`` into the report folder ``output`` (replaced atomically); returns metrics.json."""
    probe_kwargs = config or {}
    vd = verdict(result, threshold, neighbors, reduction, notes)
    figures = _figures(result, threshold, neighbors, reduction)
    metrics = finite({**result.to_dict(), "summary": vd, "heads_source": result.model.heads_source,
                      "config": {"threshold": threshold, "neighbors": neighbors, "reduction": reduction,
                                 **{k: (str(v) if isinstance(v, Path) else v) for k, v in probe_kwargs.items()}}})
    files = {"metrics.json": json.dumps(metrics, indent=1, allow_nan=False).encode(),
             "report.md": render_markdown(result, vd, figures, threshold, neighbors, reduction).encode(),
             "report.html": render_html(result, vd, figures, threshold, neighbors, reduction).encode(),
             **{f"{name}.png": png for name, png in figures.items()}}
    write_folder(output, files)
    return metrics


SUMMARY_COLUMNS = ("checkpoint", "architecture", "kind", "depth", "num_heads", "heads_source", "similar_blocks",
                   "similar_count", "count_low", "count_high", "twin_similar_count", "collapsed_beyond_twin",
                   "similar_ratio", "onset", "regimes", "cross_head_mean", "effective_rank_min")
COMPARE_FORMATS = ("table", "markdown", "json", "csv")


def _verdicts(results: dict[str, ProbeResult], threshold: float | None, k: int | None,
              reduction: str | None) -> dict[str, dict[str, Any]]:
    return {n: verdict(r, threshold, k, reduction) for n, r in results.items()}


def compare_rows(results: dict[str, ProbeResult], threshold: float | None = None, k: int | None = None,
                 reduction: str | None = None, verdicts: dict[str, dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """One dict per checkpoint with ``SUMMARY_COLUMNS`` (1-based block numbers), from the same verdict as ``audit``
    (``verdicts``: already judged with these settings, so they are not judged again)."""
    verdicts = verdicts or _verdicts(results, threshold, k, reduction)
    rows = []
    for name, r in results.items():
        vd = verdicts[name]
        st, m = r.attention[vd["kind"]], r.model
        iv, base = vd["count_interval"] or [None, None], vd["baseline"]
        rows.append({"checkpoint": name, "architecture": m.architecture, "kind": vd["kind"], "depth": vd["depth"],
                     "num_heads": m.num_heads, "heads_source": m.heads_source,
                     "similar_blocks": vd["similar_blocks"], "similar_count": vd["count"], "count_low": iv[0],
                     "count_high": iv[1], "twin_similar_count": base["count"] if base else None,
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
    return head, [[spans(r[c]) if c in lists and r[c] is not None else _fmt(r[c]) for c in head] for r in summary]


def render_compare(results: dict[str, ProbeResult], fmt: str = "table", threshold: float | None = None,
                   k: int | None = None, reduction: str | None = None,
                   verdicts: dict[str, dict[str, Any]] | None = None) -> str:
    """table: short plain-text lines; markdown: every summary column; json: the versioned summary of every
    checkpoint and per-block rows; csv: the per-block rows of every checkpoint (``reports.text`` names) with a leading
    checkpoint column. Block numbers are 1-based everywhere."""
    if fmt not in COMPARE_FORMATS:
        raise BadArgumentError(f"unknown format {fmt!r}; choose {', '.join(COMPARE_FORMATS)}")
    verdicts = verdicts or _verdicts(results, threshold, k, reduction)
    summary = compare_rows(results, threshold, k, reduction, verdicts)
    vd = next(iter(verdicts.values()))
    note = (f"similar: {vd['metric']}, {vd['reduction_text']}; blocks 1-based; ci_low/ci_high (count_low/high): 95% "
            "interval of the count over images; twin: untrained twin on the same images; beyond_twin: also above the "
            "twin's centred "
            f"similarity by {vd['criterion']['twin_margin']}. {vd['paper_reduction']}.")
    note = textwrap.fill(note, 120)
    if fmt in ("csv", "json"):
        blocks = [{"checkpoint": n, **row} for n, r in results.items()
                  for row in block_rows(r, Criterion.of(r, threshold=threshold, neighbors=k, reduction=reduction))]
        if fmt == "csv":
            return csv_text(blocks)
        return json.dumps(finite({"schema": vd["schema"], "schema_version": vd["schema_version"],
                                  "block_numbering": vd["block_numbering"], "criterion": vd["criterion"],
                                  "summary": summary,
                                  "verdicts": verdicts,
                                  "per_block": blocks}), indent=1, allow_nan=False)
    if fmt == "markdown":
        head, body = _summary_cells(summary)
        return _md_table(head, body) + f"\n\n{note}\n"
    head = ["checkpoint", "kind", "depth", "similar_count", "count_low", "count_high", "twin_similar_count",
            "collapsed_beyond_twin", "onset", "regimes"]
    fmts = {"similar_count": str, "count_low": lambda v: cell(v, ".0f"), "count_high": lambda v: cell(v, ".0f"),
            "twin_similar_count": lambda v: cell(v), "collapsed_beyond_twin": lambda v: "-" if v is None else spans(v),
            "onset": lambda v: cell(v)}
    body = [[fmts.get(c, str)(r[c]) for c in head] for r in summary]
    short = {"similar_count": "similar", "count_low": "ci_low", "count_high": "ci_high", "twin_similar_count": "twin",
             "collapsed_beyond_twin": "beyond_twin"}  # the markdown / CSV / JSON forms keep the full names
    return aligned([short.get(c, c) for c in head], body) + f"\n\n{note}\n"


def compare(
    checkpoints: Sequence[str | Path],
    output: str | Path | None = None,
    threshold: float = 0.9,
    neighbors: int = 1,
    reduction: str = "mean",
    baseline: bool = True,
    fmt: str = "markdown",
    **probe_kwargs: Any,
) -> tuple[str, dict[str, ProbeResult]]:
    """Probe several checkpoints on the same images; the side-by-side table in ``fmt`` (``render_compare``'s
    formats; default markdown) and the results (with ``output``, also a folder with compare.md, compare.html,
    metrics.json and the overlaid curves). Each checkpoint is judged once for all of them.
    """
    if len(checkpoints) < 2:
        raise BadArgumentError("compare needs at least two checkpoints")
    if output is not None:
        check_replaceable(output)
    results: dict[str, ProbeResult] = {}
    names = unique_labels(checkpoints)  # r1/m.pt and r2/m.pt: two labels, never one result replacing the other
    show = probe_kwargs.pop("progress", True)
    with tqdm(list(zip(names, checkpoints)), desc="checkpoints", unit="ckpt", disable=not show) as bar:
        for i, (n, c) in enumerate(bar, 1):  # closed on any exit, so an interrupt's one line stays the last
            results[n] = probe(c, threshold=threshold, reduction=reduction, neighbors=neighbors, baseline=baseline,
                               progress=show and f"checkpoint {i} of {len(names)} ({n})", **probe_kwargs)
    verdicts = _verdicts(results, threshold, neighbors, reduction)
    table = render_compare(results, fmt, threshold, neighbors, reduction, verdicts)
    if output is not None:
        from ..plots.report import figure_png, plot_relative_depth

        markdown = table if fmt == "markdown" else render_compare(results, "markdown", threshold, neighbors,
                                                                   reduction, verdicts)
        head, rows = _summary_cells(compare_rows(results, threshold, neighbors, reduction, verdicts))
        png = figure_png(plot_relative_depth(results, "auto", neighbors, reduction, threshold).figure)
        uri = f"data:image/png;base64,{base64.b64encode(png).decode()}"
        md = f"# Attention-collapse comparison\n\n{markdown}\n![curves]({uri})\n"
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>comparison</title><style>{_CSS}</style>"
                f"</head><body><h1>Attention-collapse comparison</h1>{_html_table(head, rows)}<img alt='curves' "
                f"src='{uri}'></body></html>\n")
        metrics = {"tool": {"name": "collapse-probe", "version": __version__},
                   "config": {"threshold": threshold, "neighbors": neighbors, "reduction": reduction,
                              **{k: (str(v) if isinstance(v, Path) else v) for k, v in probe_kwargs.items()}},
                   "checkpoints": {n: {**r.to_dict(), "summary": verdicts[n]} for n, r in results.items()}}
        write_folder(output, {"compare.md": md.encode(), "compare.html": page.encode(), "curves.png": png,
                              "metrics.json": json.dumps(finite(metrics), indent=1, allow_nan=False).encode()})
    return table, results
