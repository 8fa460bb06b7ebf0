"""Turn a ProbeResult into text: a per-block table for people, CSV rows or JSON for programs.

    print(render(result, "table"))     # threshold, neighbours and reduction: the ones in result.settings

One naming scheme everywhere (text table, CSV, JSON ``per_block``, the audit report, ``ProbeResult.to_pandas()``):
one row per (kind, block), the map kind in its own column, and these quantity names (``COLUMNS``):

    kind            "probs" (softmax maps) or "mixed" (maps after Re-attention's head mixing)
    block           0-based model block index (``blocks.{block}``); block_number is the same, 1-based
    sim_prev        mean column cosine with the previous k block(s) (k = --neighbors)
    ratio_prev      fraction of those column cosines above the threshold
    similar         sim_prev (or ratio_prev with --reduction ratio) above the threshold: a collapsed block
    cross_head      mean similarity between different heads of the block
    effective_rank  attention rank (entropy of the singular values); energy_rank: singular values for 99% energy
    feature_sim_last, feature_residual   token-feature similarity with the last block, residual to rank one
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any

from ..loading.info import ModelInfo
from ..probing.result import COLUMNS, FEATURE_COLUMNS, ProbeResult, per_block_rows

_SPECS = {"block": "d", "block_number": "d", "sim_prev": ".3f", "ratio_prev": ".3f", "similar": "", "cross_head": ".3f",
          "effective_rank": ".1f", "energy_rank": ".1f", "feature_sim_last": ".3f", "feature_residual": ".3f"}


def _settings(result: ProbeResult) -> tuple[float, int, str]:
    s = result.settings
    return s.get("threshold", 0.9), s.get("neighbors", 1), s.get("reduction", "mean")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell(v: Any, spec: str = ".3f", yes: str = "*") -> str:
    """A number for a text table: "-" where missing, ``yes`` / "" for booleans."""
    if _missing(v):
        return "-"
    if isinstance(v, bool):
        return yes if v else ""
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


def aligned(head: list[str], rows: list[list[str]]) -> str:
    """Right-aligned plain-text columns (the first left-aligned), two spaces apart."""
    cells = [head, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join(line(r) for r in cells)


def _heads_source(model: ModelInfo) -> str:
    src = model.heads_source
    if src and "guess" in src:  # a wrong head count skews every per-head number: say so on the headline itself
        return f" (HEADS GUESSED: {src})"
    return f" (from {src})" if src else ""


def _table(result: ProbeResult, threshold: float, k: int, reduction: str) -> str:
    rows = per_block_rows(result, threshold, k, reduction)
    cols = [c for c in ("block", *COLUMNS[3:], *FEATURE_COLUMNS) if any(c in r for r in rows)]
    cols.insert(1, "kind")
    body = [[cell(r.get(c), _SPECS.get(c, "")) for c in cols] for r in rows]
    m, im = result.model, result.images
    head = [f"model    {m.architecture or '?'} ({m.architecture_source or '?'}): depth {m.depth}, "
            f"{m.num_heads or '?'} heads{_heads_source(m)}, {m.tokens or '?'} tokens, {m.params / 1e6:.2f}M params",
            f"images   {im.count} from {im.source}, input {im.input_size}",
            f"columns  sim_prev / ratio_prev: mean column cosine with the previous {k} block(s) / fraction above "
            f"{threshold}",
            "         similar: collapsed block (*); cross_head: cross-head similarity; effective_rank / energy_rank: "
            "attention rank",
            "         kind: probs = softmax maps, mixed = after Re-attention; feature_*: token features", ""]
    foot = [""]
    for kind in result.attention:
        s = result.summary(kind, threshold, k, reduction)
        listed = ", ".join(map(str, s["similar_blocks"])) or "none"
        foot.append(f"{kind}: {s['count']} similar blocks of {result.depth} (ratio {s['ratio']:.3f}; {reduction} "
                    f"similarity with previous {k} > {threshold}): {listed}")
    for f in result.findings:
        foot.append(f"WARNING {f['name']} ({f['kind']}, block {f['block']}): {f['nonfinite_values']} {f['problem']} "
                    f"in {f['images']} image(s); {f['action']}")
    return "\n".join(head + [aligned(cols, body)] + foot)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV, missing numbers as empty cells, columns in first-seen order."""
    keys = list(dict.fromkeys(key for r in rows for key in r))
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({key: ("" if _missing(v) else v) for key, v in r.items()})
    return out.getvalue()


def render(result: ProbeResult, fmt: str = "table") -> str:
    """``fmt`` is "table", "csv" or "json" (``ProbeResult.to_json``: every matrix, the summary, the settings and
    ``per_block``, the rows of the table and the CSV).

    Similar blocks are counted with the threshold, neighbours and reduction the result was probed with.
    """
    threshold, k, reduction = _settings(result)
    if fmt == "json":
        return result.to_json()
    if fmt == "csv":
        return csv_text(per_block_rows(result, threshold, k, reduction))
    if fmt == "table":
        return _table(result, threshold, k, reduction)
    raise ValueError(f"unknown format {fmt!r}; choose table, csv or json")
