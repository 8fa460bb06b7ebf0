"""The audit report as one page (report.html, and the same in report.md): the answer first, then its evidence.

    page = render_html(result, vd, figures)        # vd = probing.verdict.judge(result); figures: {name: PNG bytes}
    text = render_markdown(result, vd, figures)

Order, so that a reader who stops early still has the answer: the verdict line (``probing.verdict.verdict_line``) and
its sentences; the per-block table trimmed to the decision columns (``DECISION_COLUMNS``: every other column is in
per_block.csv); the per-block measures the verdict rests on (``plots.measures``); the other figures; the threshold
sweep; the model, the images and the twin. Figures are embedded as base64 PNG, so each file stands alone; the page is
laid out for ~980 px.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from .._version import __version__
from ..probing.blocks import Criterion, block_rows
from ..probing.result import ProbeResult
from .text import _missing, twin_text

# what the verdict decides from, under the names of every CSV; the rest of block_rows goes to per_block.csv
DECISION_COLUMNS = ("block", "sim_prev", "twin_sim_prev", "similar", "interchangeable", "reuse_changed", "redundant",
                    "skip_changed", "regime")
CAPTIONS = {"block_measures": "The evidence per block: the paper's cosine beside its floor, centred and row "
                              "similarity, entropy, rank-1 residual and token uniformity (grey dashed: untrained twin)",
            "block_curves": "Similarity with the previous block and cross-head similarity, both map kinds",
            "similarity_heatmap": "Cross-layer attention similarity (L x L)",
            "rank": "Attention rank per block",
            "cross_head": "Cross-head similarity per block"}
CSS = ("body{font-family:sans-serif;max-width:940px;margin:1.5em auto;padding:0 12px;color:#222;line-height:1.4}"
       "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
       "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
       ".verdict{background:#fff8e1;border-left:5px solid #f0b400;padding:.6em 1em}.verdict p{font-size:1.1em;"
       "margin:.2em 0 .5em}.note{font-size:.85em;color:#555}.kv td{text-align:left;overflow-wrap:anywhere}"
       ".yes{font-weight:bold}")


def fmt(v: Any, spec: str = ".3f") -> str:
    """A cell: "-" where missing, "yes" / "" for booleans, ``spec`` for floats."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def decision_rows(result: ProbeResult, crit: Criterion, kind: str) -> tuple[list[str], list[list[str]]]:
    """(headings, cells) of the decision columns for the judged ``kind``; twin columns only when it was measured,
    the measured redundancy only when ``result.redundancy`` holds it."""
    rows = [r for r in block_rows(result, crit) if r["kind"] == kind]
    cols = [k for k in DECISION_COLUMNS if k in ("block", "similar") or any(k in r and not _missing(r[k])
                                                                          for r in rows)]
    yes_no = {True: "yes", False: "no"}  # a decision reads as one, where "" would look like a missing value
    pct = {"reuse_changed", "skip_changed"}  # a share of predictions reads as a percentage
    return cols, [[yes_no[r[k]] if isinstance(r.get(k), bool) else
                   (f"{100 * r[k]:.1f}%" if k in pct and not _missing(r.get(k)) else fmt(r.get(k))) for k in cols]
                  for r in rows]


def model_rows(result: ProbeResult) -> list[tuple[str, str]]:
    m, im = result.model, result.images
    return [
        ("checkpoint", str(m.checkpoint)), ("format", f"{m.format}" + (f" (entry '{m.key}')" if m.key else "")),
        ("architecture", f"{m.architecture} (source: {m.architecture_source})"),
        ("family", str(m.family)), ("depth", str(m.depth)),
        ("heads", f"{m.num_heads} (decided by: {m.heads_source})"),
        ("tokens", str(m.tokens or "-")), ("parameters", f"{m.params / 1e6:.2f}M"),
        ("input", f"{m.input_size} mean {m.mean} std {m.std} (source: {m.data_source})"),
        ("images", f"{im.count} from {im.source}"),
        ("untrained twin", twin_text(result)),
        ("tool", f"collapse-probe {__version__}"),
    ]


def table_note(vd: dict[str, Any]) -> str:
    red = vd.get("redundancy")
    measured = (f"reuse_changed: predictions changed by reusing the previous block's map in the block alone; "
                f"redundant: {red['rule']}; skip_changed: predictions changed by removing the block alone (the "
                "baseline, measured for redundant blocks)" if red else
                "reuse_changed, redundant: not measured (--no-intervene)")
    inter = (f"interchangeable: predicted from the maps, {vd['interchangeable_rule']}" if vd.get("interchangeable")
             is not None else "interchangeable: no map rule for this kind")
    return (f"Kind {vd['kind']}: {vd['kind_text']}. Block numbers start at 1. sim_prev: similarity with the previous "
            f"block by the paper's metric, {vd['metric']}; twin_sim_prev: the untrained twin's; similar: "
            f"{vd['reduction_text']}; {inter}; {measured}. {vd['paper_reduction']}. Every other column (intervals, "
            "centred and row similarity, beyond_twin, entropy, ranks, both map kinds): per_block.csv; every number: "
            "metrics.json; definitions: the README's metric section.")


def sweep_rows(vd: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["block threshold", "similar (mean)", "twin (mean)", "similar (ratio)", "twin (ratio)"]
    return head, [[f"{r['threshold']:.2f}", fmt(r["count_mean"]), fmt(r["twin_count_mean"]),
                   fmt(r["count_ratio"]), fmt(r["twin_count_ratio"])] for r in vd["sweep"]]


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def html_table(head: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """A table; ``head`` None: rows only (a key-value list)."""
    th = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td{' class=yes' if c == 'yes' else ''}>{html.escape(c)}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table{f' class={cls}' if cls else ''}>{th}{body}</table>"


def _uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def _title(result: ProbeResult) -> str:
    return f"Attention-collapse audit: {Path(str(result.model.checkpoint)).name}"


def render_markdown(result: ProbeResult, vd: dict[str, Any], figures: dict[str, bytes],
                    crit: Criterion | None = None) -> str:
    """report.md: the same order as the page, figures embedded as PNG data URIs, so the file stands alone."""
    crit = crit or Criterion.of(result)
    head, rows = decision_rows(result, crit, vd["kind"])
    parts = [f"# {_title(result)}", "", f"**{vd['verdict']}**", ""]
    parts += [f"- {t}" for t in vd["text"][1:]]
    parts += ["", f"## Per block ({vd['kind_text']})", "", md_table(head, rows), "", table_note(vd), ""]
    for name, png in figures.items():
        parts += [f"### {CAPTIONS.get(name, name)}", "", f"![{name}]({_uri(png)})", ""]
    sh, sr = sweep_rows(vd)
    parts += ["## Threshold sweep", "", f"Similar blocks of kind {vd['kind']} for each block threshold (per-entry cut "
              f"{vd['criterion']['entry_threshold']} for ratio).", "", md_table(sh, sr), "",
              "## Model, images, twin", "", md_table(["", ""], [[a, b] for a, b in model_rows(result)]), "",
              f"Settings: threshold {crit.threshold}, neighbours {crit.neighbors}, reduction {crit.reduction}.", ""]
    return "\n".join(parts)


def render_html(result: ProbeResult, vd: dict[str, Any], figures: dict[str, bytes],
                crit: Criterion | None = None) -> str:
    """report.html: one self-contained page (inline CSS, figures as base64 PNG), about 980 px wide."""
    crit = crit or Criterion.of(result)
    head, rows = decision_rows(result, crit, vd["kind"])
    e = html.escape
    detail = "".join(f"<li>{e(t)}</li>" for t in vd["text"][1:])
    figs = "".join(f"<h3>{e(CAPTIONS.get(n, n))}</h3><img alt='{e(n)}' src='{_uri(p)}'>" for n, p in figures.items())
    sh, sr = sweep_rows(vd)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(_title(result))}</title><style>{CSS}"
            f"</style></head><body><h1>{e(_title(result))}</h1><div class=verdict><p><strong>{e(vd['verdict'])}"
            f"</strong></p><ul>{detail}</ul></div><h2>Per block ({e(vd['kind_text'])})</h2>{html_table(head, rows)}"
            f"<p class=note>{e(table_note(vd))}</p><h2>Figures</h2>{figs}<h2>Threshold sweep</h2>"
            f"<p class=note>Similar blocks of kind {e(vd['kind'])} for each block threshold (per-entry cut "
            f"{vd['criterion']['entry_threshold']} for ratio).</p>{html_table(sh, sr)}<h2>Model, images, twin</h2>"
            f"{html_table(None, [[a, b] for a, b in model_rows(result)], 'kv')}<p class=note>Settings: "
            f"threshold {crit.threshold}, neighbours {crit.neighbors}, reduction {crit.reduction}.</p>"
            "</body></html>\n")
