"""Turn a ProbeResult into text: a per-block table for people, CSV rows or JSON for programs.

    print(render(result, "table"))     # threshold, neighbours and reduction: the ones in result.settings
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any

from ..loading.info import ModelInfo
from ..probing.result import ProbeResult


def block_rows(result: ProbeResult, threshold: float, k: int = 1, reduction: str = "mean") -> list[dict[str, Any]]:
    """One dict per model block with every per-block number (None where a kind has no such block)."""
    depth = max([result.depth] + [max(s.blocks) + 1 for s in result.attention.values() if s.blocks])
    rows: list[dict[str, Any]] = [{"block": b} for b in range(depth)]
    for kind, st in result.attention.items():
        mean_prev, ratio_prev = st.neighbor(k, "mean"), st.neighbor(k, "ratio")
        similar = set(st.similar_blocks(threshold, k, reduction))
        for pos, b in enumerate(st.blocks):
            rows[b].update({
                f"{kind}_sim_prev": mean_prev[pos], f"{kind}_ratio_prev": ratio_prev[pos],
                f"{kind}_similar": b in similar, f"{kind}_cross_head": st.cross_head[pos],
                f"{kind}_effective_rank": st.effective_rank[pos], f"{kind}_energy_rank": st.energy_rank[pos],
            })
    if result.features is not None:
        f = result.features
        for pos, b in enumerate(f.blocks):
            rows[b].update({"feature_sim_last": f.similarity[pos, -1], "feature_residual": f.residual[pos]})
    return rows


def _num(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "*" if v else ""
    return format(v, fmt)


def _heads_source(model: ModelInfo) -> str:
    src = model.heads_source
    if src and "guess" in src:  # a wrong head count skews every per-head number: say so on the headline itself
        return f" (HEADS GUESSED: {src})"
    return f" (heads from {src})" if src else ""


def _table(result: ProbeResult, threshold: float, k: int, reduction: str) -> str:
    rows = block_rows(result, threshold, k, reduction)
    cols: list[tuple[str, str, str]] = [("block", "block", "d")]
    for kind in result.attention:
        cols += [(f"{kind}_sim_prev", f"{kind}:cos", ".3f"), (f"{kind}_ratio_prev", "ratio", ".3f"),
                 (f"{kind}_similar", "sim", ""), (f"{kind}_cross_head", "x-head", ".3f")]
        if kind == "probs":
            cols += [(f"{kind}_effective_rank", "erank", ".1f"), (f"{kind}_energy_rank", "rank99", ".1f")]
    if result.features is not None:
        cols += [("feature_sim_last", "feat~last", ".3f")]
    cells = [[h for _, h, _ in cols]] + [[_num(r.get(key), f) for key, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]

    m, im = result.model, result.images
    head = [f"model    {m.architecture or '?'} ({m.architecture_source or '?'}): depth {m.depth}, "
            f"{m.num_heads or '?'} heads{_heads_source(m)}, {m.tokens or '?'} tokens, "
            f"{m.params / 1e6:.2f}M params",
            f"images   {im.count} from {im.source}, input {im.input_size}",
            f"columns  cos / ratio: mean column cosine with the previous {k} block(s) / fraction above {threshold}",
            "         sim: similar block (*); x-head: cross-head similarity; erank / rank99: attention rank",
            "         feat~last: token-feature similarity with the last block", ""]
    foot = [""]
    for kind in result.attention:
        s = result.summary(kind, threshold, k, reduction)
        listed = ", ".join(map(str, s["similar_blocks"])) or "none"
        foot.append(f"{kind}: {s['count']} similar blocks of {result.depth} (ratio {s['ratio']:.3f}; {reduction} "
                    f"similarity with previous {k} > {threshold}): {listed}")
    for f in result.findings:
        foot.append(f"WARNING {f['name']} ({f['kind']}, block {f['block']}): {f['nonfinite_values']} {f['problem']} "
                    f"in {f['images']} image(s); {f['action']}")
    return "\n".join(head + lines + foot)


def _csv(result: ProbeResult, threshold: float, k: int, reduction: str) -> str:
    rows = block_rows(result, threshold, k, reduction)
    keys = list(dict.fromkeys(key for r in rows for key in r))
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({key: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for key, v in r.items()})
    return out.getvalue()


def render(result: ProbeResult, fmt: str = "table") -> str:
    """``fmt`` is "table", "csv" or "json" (every matrix, the summary and the settings: ``ProbeResult.to_json``).

    Similar blocks are counted with the threshold, neighbours and reduction the result was probed with.
    """
    s = result.settings
    threshold, k, reduction = s.get("threshold", 0.9), s.get("neighbors", 1), s.get("reduction", "mean")
    if fmt == "json":
        return result.to_json()
    if fmt == "csv":
        return _csv(result, threshold, k, reduction)
    if fmt == "table":
        return _table(result, threshold, k, reduction)
    raise ValueError(f"unknown format {fmt!r}; choose table, csv or json")
