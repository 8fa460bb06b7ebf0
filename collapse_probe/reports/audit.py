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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BadArgumentError
from ..outputs import check_replaceable, write_folder
from ..probing.result import ProbeResult, finite
from ..probing.run import probe
from .text import _SPECS, aligned, cell, csv_text, per_block_rows

FIGURES = ("similarity_heatmap", "block_curves", "rank", "cross_head")


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [(first, last), ...] of sorted block indices."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and b == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    return runs


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def verdict(result: ProbeResult, threshold: float = 0.9, k: int = 1, reduction: str = "mean") -> dict[str, Any]:
    """Which blocks are collapsed and what that suggests, as data plus sentences (0-based block indices).

    Judged on the maps that multiply V (``ProbeResult.applied_kind``); the softmax maps of Re-attention models are
    reported beside them.
    """
    kind = result.applied_kind
    st = result.attention[kind]
    depth = len(st.blocks)
    collapsed = st.similar_blocks(threshold, k, reduction)
    runs = _runs(collapsed)
    onset = st.onset(threshold, k, reduction)
    tail = runs[-1] if onset is not None else None
    heads = [b for b, v in zip(st.blocks, st.cross_head) if not math.isnan(v) and v > threshold]
    reattn = set(result.model.reattn_blocks or [])
    text: list[str] = []
    if "guess" in (result.model.heads_source or ""):
        text.append(f"The head count ({result.model.num_heads}) is a guess ({result.model.heads_source}); every "
                    "per-head number below assumes it, so confirm it or pass --num-heads N.")
    maps = "maps after Re-attention (Θ, Norm, scale)" if kind == "mixed" else "softmax attention maps"
    crit = f"attention similarity with the previous {k} block(s) > {threshold} ({reduction}, {maps})"
    if not collapsed:
        text.append(f"No collapsed block: at {crit} every block attends differently from the block before it, "
                    "so these maps give no reason to reuse or remove attention.")
    else:
        listed = ", ".join(_span(a, b) for a, b in runs)
        text.append(f"{len(collapsed)} of {depth} blocks are collapsed ({crit}): {listed}.")
        if onset is not None:
            cure = "" if set(range(onset, st.blocks[-1] + 1)) <= reattn else \
                ", or for re-attention (DeepViT) when retraining a deeper model"
            text.append(f"From block {onset} to the last block attention barely changes: blocks "
                        f"{onset}-{st.blocks[-1]} could reuse block {onset - 1}'s attention map (attention reuse / "
                        f"sharing), or are candidates for removal{cure}.")
        inner = [r for r in runs if r is not tail]
        if inner:
            text.append("Blocks " + ", ".join(_span(a, b) for a, b in inner) + " repeat the attention of the block "
                        "just before them: candidates for sharing that block's map.")
    if heads:
        mix = "" if set(heads) <= reattn else " or for mixing heads (re-attention)"
        text.append(f"In blocks {', '.join(_span(a, b) for a, b in _runs(heads))} all heads attend nearly alike "
                    f"(cross-head similarity > {threshold}): redundant heads, candidates for head pruning{mix}.")
    if kind == "mixed" and "probs" in result.attention:
        before = result.attention["probs"].similar_blocks(threshold, k, reduction)
        text.append(f"Re-attention: {len(collapsed)} blocks are collapsed after head mixing (the maps that multiply "
                    f"V), {len(before)} in the softmax maps before it.")
    if result.features is not None:
        low = [b for b, r in zip(result.features.blocks, result.features.residual) if not math.isnan(r) and r < 0.1]
        if low:
            text.append(f"Token features are close to rank one (residual < 0.1, Dong et al. 2021) in blocks "
                        f"{', '.join(_span(a, b) for a, b in _runs(low))}: rank collapse of the representation.")
    im = result.images
    text.append(f"Measured on {im.count} images ({im.source}); a verdict on untrained or random weights "
                "describes the initialisation, not a trained model.")
    return {"kind": kind, "collapsed_blocks": collapsed, "collapse_onset": onset, "redundant_head_blocks": heads,
            "depth": depth, "threshold": threshold, "neighbors": k, "reduction": reduction, "text": text}


def _figures(result: ProbeResult, threshold: float, k: int, reduction: str) -> dict[str, bytes]:
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
        ("tool", f"collapse-probe {__version__}"),
    ]


# the names of reports/text.py (one scheme for table, CSV, JSON and this report)
_COLUMNS = ("kind", "block", "sim_prev", "similar", "cross_head", "effective_rank", "energy_rank", "feature_residual")


def _table_rows(result: ProbeResult, threshold: float, k: int, reduction: str) -> tuple[list[str], list[list[str]]]:
    rows = per_block_rows(result, threshold, k, reduction)
    cols = [c for c in _COLUMNS if any(c in r for r in rows)]
    return cols, [[cell(r.get(c), _SPECS.get(c, ""), yes="yes") for c in cols] for r in rows]


def _table_note(result: ProbeResult, threshold: float, k: int, reduction: str) -> str:
    return (f"similar: sim_prev ({reduction} attention similarity with the previous {k} block(s)) > {threshold}; "
            f"the verdict judges kind {result.applied_kind} (probs: softmax maps, mixed: after Re-attention).")


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
    parts += ["", "## Figures", ""]
    for name, png in figures.items():
        parts += [f"### {_CAPTIONS[name]}", "", f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})",
                  ""]
    parts += ["## Per block", "", _md_table(head, rows), "", _table_note(result, threshold, k, reduction), "",
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
            f"<h2>Verdict</h2><ul class='verdict'>{verdict_html}</ul><h2>Figures</h2>{figs}"
            f"<h2>Per block</h2>{_html_table(head, rows)}<p>{html.escape(_table_note(result, threshold, k, reduction))}"
            f"</p><p>Settings: threshold {threshold}, neighbours {k}, "
            f"reduction {html.escape(reduction)}. All numbers: metrics.json.</p></body></html>\n")


def audit(
    checkpoint: str | Path,
    output: str | Path,
    threshold: float = 0.9,
    neighbors: int = 1,
    reduction: str = "mean",
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Probe ``checkpoint`` and write the report folder; returns the metrics.json content.

    ``probe_kwargs`` go to ``probing.run.probe`` (model_name, images, num_images, batch_size, device, trust_pickle,
    key, rank_images, num_heads, mean, std, max_memory, storage, progress).
    """
    check_replaceable(output)  # before minutes of probing, not after
    result = probe(checkpoint, threshold=threshold, reduction=reduction, neighbors=neighbors, **probe_kwargs)
    vd = verdict(result, threshold, neighbors, reduction)
    figures = _figures(result, threshold, neighbors, reduction)
    metrics = finite({**result.to_dict(), "verdict": vd, "heads_source": result.model.heads_source,
                      "config": {"threshold": threshold, "neighbors": neighbors, "reduction": reduction,
                                 **{k: (str(v) if isinstance(v, Path) else v) for k, v in probe_kwargs.items()}}})
    files = {"metrics.json": json.dumps(metrics, indent=1, allow_nan=False).encode(),
             "report.md": render_markdown(result, vd, figures, threshold, neighbors, reduction).encode(),
             "report.html": render_html(result, vd, figures, threshold, neighbors, reduction).encode(),
             **{f"{name}.png": png for name, png in figures.items()}}
    write_folder(output, files)
    return metrics


def _names(paths: Sequence[str | Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        n = Path(p).name or str(p)
        names.append(n if n not in names else f"{n} ({len(names) + 1})")
    return names


SUMMARY_COLUMNS = ("checkpoint", "architecture", "kind", "depth", "num_heads", "heads_source", "similar_blocks",
                   "similar_ratio", "onset", "cross_head_mean", "effective_rank_min")
COMPARE_FORMATS = ("table", "markdown", "json", "csv")


def compare_rows(results: dict[str, ProbeResult], threshold: float = 0.9, k: int = 1,
                 reduction: str = "mean") -> list[dict[str, Any]]:
    """One dict per checkpoint with ``SUMMARY_COLUMNS``, judged on its applied kind (see ``verdict``)."""
    rows = []
    for name, r in results.items():
        vd = verdict(r, threshold, k, reduction)
        st, m = r.attention[vd["kind"]], r.model
        rows.append({"checkpoint": name, "architecture": m.architecture, "kind": vd["kind"], "depth": vd["depth"],
                     "num_heads": m.num_heads, "heads_source": m.heads_source,
                     "similar_blocks": vd["collapsed_blocks"],
                     "similar_ratio": len(vd["collapsed_blocks"]) / max(vd["depth"], 1), "onset": vd["collapse_onset"],
                     "cross_head_mean": float(st.cross_head.mean()),
                     "effective_rank_min": float(st.effective_rank.min())})
    return rows


def _summary_cells(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``SUMMARY_COLUMNS`` and one row of cells per checkpoint, for the markdown and HTML tables."""
    head = list(SUMMARY_COLUMNS)
    return head, [[_fmt(r[c]) if c != "similar_blocks" else ", ".join(map(str, r[c])) or "none" for c in head]
                  for r in summary]


def render_compare(results: dict[str, ProbeResult], fmt: str = "table", threshold: float = 0.9, k: int = 1,
                   reduction: str = "mean") -> str:
    """table: short plain-text lines; markdown: every summary column; json: summary and per-block rows; csv: the
    per-block rows of every checkpoint (``reports.text`` names) with a leading checkpoint column."""
    if fmt not in COMPARE_FORMATS:
        raise BadArgumentError(f"unknown format {fmt!r}; choose {', '.join(COMPARE_FORMATS)}")
    summary = compare_rows(results, threshold, k, reduction)
    note = f"similar: attention similarity with the previous {k} block(s) > {threshold} ({reduction})"
    if fmt in ("csv", "json"):
        blocks = [{"checkpoint": n, **row} for n, r in results.items()
                  for row in per_block_rows(r, threshold, k, reduction)]
        if fmt == "csv":
            return csv_text(blocks)
        return json.dumps(finite({"settings": {"threshold": threshold, "neighbors": k, "reduction": reduction},
                                  "summary": summary, "per_block": blocks}), indent=1, allow_nan=False)
    if fmt == "markdown":
        head, body = _summary_cells(summary)
        return _md_table(head, body) + f"\n\n{note}\n"
    head = ["checkpoint", "kind", "depth", "similar_blocks", "similar_ratio", "onset", "cross_head_mean",
            "effective_rank_min"]
    spans = {"similar_blocks": lambda v: ",".join(_span(a, b) for a, b in _runs(v)) or "none"}
    body = [[spans.get(c, lambda v, c=c: cell(v, ".1f" if c == "effective_rank_min" else ".3f"))(r[c])
             for c in head] for r in summary]
    return aligned(head, body) + f"\n\n{note}\n"


def compare(
    checkpoints: Sequence[str | Path],
    output: str | Path | None = None,
    threshold: float = 0.9,
    neighbors: int = 1,
    reduction: str = "mean",
    **probe_kwargs: Any,
) -> tuple[str, dict[str, ProbeResult]]:
    """Probe several checkpoints on the same images; a markdown table side by side (and, with ``output``, a folder
    with compare.md, compare.html, metrics.json and the overlaid curves). ``render_compare`` gives other formats.
    """
    if len(checkpoints) < 2:
        raise BadArgumentError("compare needs at least two checkpoints")
    if output is not None:
        check_replaceable(output)
    results = {n: probe(c, threshold=threshold, reduction=reduction, neighbors=neighbors, **probe_kwargs)
               for n, c in zip(_names(checkpoints), checkpoints)}
    table = render_compare(results, "markdown", threshold, neighbors, reduction)
    if output is not None:
        from ..plots.report import figure_png, plot_relative_depth

        head, rows = _summary_cells(compare_rows(results, threshold, neighbors, reduction))
        png = figure_png(plot_relative_depth(results, "auto", neighbors, reduction, threshold).figure)
        uri = f"data:image/png;base64,{base64.b64encode(png).decode()}"
        md = f"# Attention-collapse comparison\n\n{table}\n![curves]({uri})\n"
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>comparison</title><style>{_CSS}</style>"
                f"</head><body><h1>Attention-collapse comparison</h1>{_html_table(head, rows)}<img alt='curves' "
                f"src='{uri}'></body></html>\n")
        metrics = {"tool": {"name": "collapse-probe", "version": __version__},
                   "config": {"threshold": threshold, "neighbors": neighbors, "reduction": reduction,
                              **{k: (str(v) if isinstance(v, Path) else v) for k, v in probe_kwargs.items()}},
                   "checkpoints": {n: {**r.to_dict(), "verdict": verdict(r, threshold, neighbors, reduction)}
                                   for n, r in results.items()}}
        write_folder(output, {"compare.md": md.encode(), "compare.html": page.encode(), "curves.png": png,
                              "metrics.json": json.dumps(finite(metrics), indent=1, allow_nan=False).encode()})
    return table, results
