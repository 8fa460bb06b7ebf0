"""Turn a ProbeResult into text: the verdict and a per-block table for people, CSV rows or JSON for programs.

    print(render(result, "table"))     # threshold, neighbours and reduction: the ones in result.settings

The table is short: the verdict line (``probing.verdict.verdict_line``), one line on the model, images and twin, the
per-block table of the maps the verdict judges, then the verdict's sentences. CSV and JSON have every column of both
map kinds. One naming scheme everywhere (text table, CSV, JSON ``per_block``, the audit report,
``ProbeResult.to_pandas()``): one row per (kind, block) from ``probing.blocks.block_rows``; the README's metric
section defines every column:

    checkpoint      the file as given (compare: its name), so rows of several results stay apart
    kind            "probs" (softmax maps) or "mixed" (maps after Re-attention's Θ and its norm)
    block           1-based block number (block 1 = module blocks.0), as in the paper; index is the 0-based module
    sim_prev        the paper's metric: mean column cosine (uncentred, Eq. 3) with the previous k block(s)
    ratio_prev      fraction of those column cosines above the per-entry cut (--entry-threshold)
    floor_prev, excess_prev   what two uncorrelated columns score, and sim_prev above it
    pearson_prev    centred similarity (column Pearson) with the previous block: the cross-family comparison
    row_cosine_prev, jsd_prev, matched_prev   row-wise similarity, Jensen-Shannon divergence, head-matched similarity
    entropy, tv_uniform, rank1_residual       entropy / log N, TV distance from uniform, |A - 1 mean row| / |A|
    *_ci_low, *_ci_high   95% bootstrap interval over images; twin_*: the untrained twin's value
    similar         the paper's criterion; beyond_twin: also collapsed beyond the twin; regime: the verdict's reading
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from typing import Any

from ..loading.info import ModelInfo
from ..probing.blocks import Criterion, block_rows
from ..probing.result import ProbeResult
from ..probing.verdict import judge

_SPECS = {"block": "d", "index": "d", "similar": "", "beyond_twin": "", "regime": "", "kind": "",
          "effective_rank": ".1f", "energy_rank": ".1f", "attention_distance": ".2f"}
# what the text table shows (CSV and JSON have every column); twin columns only when a twin was measured
TABLE_COLUMNS = ("block", "sim_prev", "twin_sim_prev", "pearson_prev", "entropy", "rank1_residual", "cross_head",
                 "similar", "interchangeable", "reuse_changed", "redundant", "regime")


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


def twin_text(result: ProbeResult) -> str:
    """How the untrained twin was made, or that it was not measured; BatchNorm only where the model has some."""
    if result.baseline is None:
        return "not measured (--no-baseline): the verdict cannot tell collapse from initialisation"
    t = result.baseline.settings.get("twin", {})
    bn = t.get("batchnorm_batches")
    return f"{t.get('init', '?')}" + (f"; BatchNorm statistics re-estimated on the same images ({bn} batches)"
                                      if bn else "")


def _table(result: ProbeResult, crit: Criterion) -> str:
    summary = judge(result, crit, sweep_thresholds=None)
    kind = summary["kind"]
    rows = [r for r in block_rows(result, crit) if r["kind"] == kind]
    cols = [c for c in TABLE_COLUMNS if _present(rows, c) or c in ("block", "similar")]
    body = [[cell(r.get(c), _SPECS.get(c, ".3f")) for c in cols] for r in rows]
    m, im = result.model, result.images
    head = [summary["verdict"], "",
            f"model    {m.architecture or '?'} ({m.architecture_source or '?'}): depth {m.depth}, "
            f"{m.num_heads or '?'} heads{_heads_source(m)}, {m.tokens or '?'} tokens, {m.params / 1e6:.2f}M params",
            f"images   {im.count} from {im.source}, input {im.input_size}",
            f"twin     {twin_text(result)}",
            f"table    {summary['kind_text']}; blocks from 1; sim_prev: {summary['metric']} with the previous "
            f"{crit.neighbors} block(s)",
            "         every column" + (" and both map kinds" if len(result.attention) > 1 else "")
            + ": --format csv; what each means: the README's metric section", ""]
    foot = [""] + [line for t in summary["text"][1:] for line in textwrap.wrap(t, 120)]
    for f in result.findings:
        foot.append(f"WARNING {f['name']} ({f['kind']}, block {f['block']}): {f['nonfinite_values']} "
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
