"""Turn a ProbeResult into text: a per-block table for people, CSV rows or JSON for programs.

    print(render(result, "table"))     # threshold, neighbours and reduction: the ones in result.settings

One naming scheme everywhere (text table, CSV, JSON ``per_block``, the audit report, ``ProbeResult.to_pandas()``):
one row per (kind, block) from ``probing.blocks.block_rows``; the README's metric section defines every column:

    kind            "probs" (softmax maps) or "mixed" (maps after Re-attention's Θ and BatchNorm)
    block           1-based block number (block 1 = module blocks.0), as in the paper; index is the 0-based module
    sim_prev        the paper's metric: mean column cosine (uncentred, Eq. 3) with the previous k block(s)
    ratio_prev      fraction of those column cosines above the per-entry cut (--entry-threshold)
    floor_prev, excess_prev   what two uncorrelated columns score, and sim_prev above it
    pearson_prev    centred similarity (column Pearson) with the previous block: the cross-family comparison
    row_cosine_prev, jsd_prev, matched_prev   row-wise similarity, Jensen-Shannon divergence, head-matched similarity
    entropy, tv_uniform, rank1_residual       entropy / log N, TV distance from uniform, |A - 1 mean row| / |A|
    *_low, *_high   95% bootstrap interval over images; twin_*: the untrained twin's value
    similar         the paper's criterion; beyond_twin: also collapsed beyond the twin; regime: the verdict's reading
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any

from ..loading.info import ModelInfo
from ..probing.blocks import Criterion, block_rows
from ..probing.result import ProbeResult
from ..probing.verdict import judge

_SPECS = {"block": "d", "index": "d", "similar": "", "beyond_twin": "", "regime": "", "kind": "",
          "effective_rank": ".1f", "energy_rank": ".1f", "attention_distance": ".2f"}
# what the text table shows (CSV and JSON have every column); twin columns only when a twin was measured
TABLE_COLUMNS = ("block", "kind", "sim_prev", "sim_prev_low", "sim_prev_high", "twin_sim_prev", "pearson_prev",
                 "twin_pearson_prev", "entropy", "rank1_residual", "cross_head", "effective_rank", "similar",
                 "beyond_twin", "regime")


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


def _present(rows: list[dict[str, Any]], c: str) -> bool:
    return any(c in r and not _missing(r[c]) for r in rows)


def _table(result: ProbeResult, crit: Criterion) -> str:
    rows = block_rows(result, crit)
    cols = [c for c in TABLE_COLUMNS if _present(rows, c) or c in ("block", "kind", "similar")]
    body = [[cell(r.get(c), _SPECS.get(c, ".3f")) for c in cols] for r in rows]
    m, im = result.model, result.images
    summary = judge(result, crit)
    twin = result.baseline.settings.get("twin", {}) if result.baseline is not None else None
    head = [f"model    {m.architecture or '?'} ({m.architecture_source or '?'}): depth {m.depth}, "
            f"{m.num_heads or '?'} heads{_heads_source(m)}, {m.tokens or '?'} tokens, {m.params / 1e6:.2f}M params",
            f"images   {im.count} from {im.source}, input {im.input_size}",
            "twin     " + (f"untrained twin: {twin.get('init', '?')}, BatchNorm re-estimated on these images"
                           if twin is not None else "none (pass --baseline to measure the untrained twin)"),
            f"columns  block: 1-based; sim_prev: {summary['metric']} with the previous {crit.neighbors} block(s), "
            "_low/_high its 95% interval over images",
            "         pearson_prev: centred similarity with the previous block; twin_*: the untrained twin; entropy: "
            "/ log N; rank1_residual: 0 = rows alike",
            f"         similar: {summary['reduction_text']}; beyond_twin: also above the twin's centred similarity "
            f"by {crit.margin}",
            "         kind: probs = softmax maps, mixed = after Re-attention (not on the softmax scale); all columns: "
            "--format csv", ""]
    foot = ["", *summary["text"]]
    for f in result.findings:
        foot.append(f"WARNING {f['name']} ({f['kind']}, block {f['block'] + 1}): {f['nonfinite_values']} "
                    f"{f['problem']} in {f['images']} image(s); {f['action']}")
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
    """``fmt`` is "table", "csv" or "json" (``ProbeResult.to_json``: every matrix, the versioned summary of
    ``probing.verdict.judge``, the settings and ``per_block``, the rows of the table and the CSV).

    Similar blocks are counted with the criterion the result was probed with (``Criterion.of(result)``).
    """
    if fmt == "json":
        return result.to_json()
    crit = Criterion.of(result)
    if fmt == "csv":
        return csv_text(block_rows(result, crit))
    if fmt == "table":
        return _table(result, crit)
    raise ValueError(f"unknown format {fmt!r}; choose table, csv or json")
