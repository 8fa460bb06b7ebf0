"""The one verdict engine: what every command (``similarity``, ``audit``, ``compare``, ``figures``, the trainer's
collapse tracking) says about a ``Result``, as one versioned JSON summary plus sentences.

    summary = judge(result)                       # settings from result.settings; result.baseline = untrained twin
    summary["verdict"]                            # "VERDICT: no collapse beyond initialisation (0 of 32 blocks) — ..."
    summary["text"]                               # the verdict line first, then the sentences with the detail
    summary["similar_blocks"], summary["count_interval"], summary["collapsed_beyond_twin"]   # 1-based block numbers

The verdict line is worded from the summary's fields by ``verdict_line`` alone, so every command (``similarity``,
``audit``, ``compare``, ``figures``' summary.csv) and ``judge`` print the same line, and the rules under it can change
without touching its wording.

Three things make a count a finding rather than a number: the twin (``probe(..., baseline=True)``: same architecture,
fresh init, same images; a block is *collapsed beyond the twin* only when its centred similarity exceeds the twin's),
the interval (bootstrap over images), and the map kind (the maps that multiply V: ``Result.applied_kind``). The
paper's metric is reported as such ("column cosine, uncentred, Eq. 3") under the chosen reduction; the paper does not
publish its reduction, so both readings are offered and each number says which it uses. Recommendations (reuse,
removal, head pruning, Re-attention) are made only from collapse beyond the twin, never Re-attention for blocks that
have it; without a twin nothing is recommended.

Regimes (``BlockView.regimes``) are read from the measures of the map kind they describe, and every regime sentence
names that kind. "Near-uniform" is a property of row-stochastic maps (entropy / log N), so only softmax maps are ever
called uniform; for a Re-attention model, judged on the maps after Θ and its norm, the softmax maps' uniformity is
reported in a sentence of its own about the softmax maps. A median that does not exist is left out, never printed as
nan.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..metrics import bootstrap
from ..metrics.functional import collapse_onset
from .blocks import JSD_INTERCHANGEABLE, TOKEN_UNIFORM_RESIDUAL, UNIFORM_ENTROPY, BlockView, Criterion, Result
from .redundancy_text import passes, redundancy_sentences
from .spans import blocks_text, runs, spans  # noqa: F401  (re-exported)

SCHEMA = "collapse-probe/summary"
SCHEMA_VERSION = 2
NUMBERING = ("block numbers are 1-based (block 1 is module blocks.0), as in the paper; fields named index or "
             "*_index are 0-based module indices")
PAPER_METRIC = "column cosine, uncentred (Eq. 3)"
REDUCTION_TEXT = {"mean": "mean column cosine with the previous {k} block(s) > {t}",
                  "ratio": "fraction of column cosines above {e} with the previous {k} block(s) > {t}"}
PAPER_REDUCTION = ("The paper does not publish how it reduces Eq. 3 over heads, tokens and images; 'mean' and 'ratio' "
                   "are two readings of it")
# the norm after Θ is BatchNorm in the paper's code and our models, a LayerNorm over heads in vit-pytorch: name neither
KIND_TEXT = {"probs": "softmax maps", "mixed": "maps after Re-attention (head mixing Θ, then a norm), the maps that "
             "multiply V"}
KIND_SHORT = {"probs": "softmax maps", "mixed": "maps after Re-attention"}
SWEEP = tuple(round(0.80 + 0.02 * i, 2) for i in range(10))  # 0.80 ... 0.98
INTERCHANGEABLE_RULE = (f"mean row Jensen-Shannon divergence from the previous block's softmax map < "
                        f"{JSD_INTERCHANGEABLE} nats (calibrated against interventions: figures/calibration)")
TWIN_UNIFORM_ENTROPY = 0.99  # a twin whose softmax maps are at least this uniform in every block is uniform attention


def _numbers(view: BlockView, mask: np.ndarray | None) -> list[int] | None:
    return None if mask is None else [b + 1 for b, m in zip(view.blocks, mask) if m]


def _onset(view: BlockView) -> int | None:
    """1-based block from which every later block is similar (the paper's "after block 17"), or None."""
    key = "sim_prev" if view.criterion.reduction == "mean" else "ratio_prev"
    onset = collapse_onset(view.values[key], view.criterion.threshold, view.blocks)
    return None if onset is None else onset + 1


def _count_interval(view: BlockView, per_image: np.ndarray | None) -> list[float] | None:
    if per_image is None or view.weights is None:
        return None
    lo, hi = bootstrap.interval(bootstrap.count_draws(per_image, view.weights, view.criterion.threshold))
    return [float(lo), float(hi)]


def _median(x: np.ndarray, mask: Sequence[bool]) -> float:
    v = x[np.asarray(mask, dtype=bool)]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def _med(label: str, x: np.ndarray, mask: Sequence[bool]) -> str:
    """"<label> 0.123" for the median of x over mask, or "" where no finite value exists (never "nan")."""
    m = _median(x, mask)
    return "" if math.isnan(m) else f"{label} {m:.3f}"


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p)


def sweep(result: Result, crit: Criterion, kind: str, thresholds: Sequence[float] = SWEEP) -> list[dict]:
    """Similar-block counts of ``kind`` for each block threshold, both reductions, the twin beside (None without)."""
    st, twin = result.attention[kind], (result.baseline.attention.get(kind) if result.baseline else None)
    out = []
    for t in thresholds:
        row: dict[str, Any] = {"threshold": t}
        for red in ("mean", "ratio"):
            row[f"count_{red}"] = len(st.similar_blocks(t, crit.neighbors, red))
            row[f"twin_count_{red}"] = None if twin is None else len(twin.similar_blocks(t, crit.neighbors, red))
        out.append(row)
    return out


def judge(result: Result, crit: Criterion | None = None, sweep_thresholds: Sequence[float] | None = SWEEP,
          notes: Sequence[str] = (), redundancy: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of ``result`` (schema ``SCHEMA`` version ``SCHEMA_VERSION``): the verdict line, counts with
    intervals, the twin's, uniform attention's, collapse beyond the twin, the blocks predicted interchangeable from
    their maps, regimes per block, a threshold sweep and the sentences (``text``, the verdict line first).

    ``notes``: extra sentences to cite. ``redundancy``: ``probing.redundancy.measure_redundancy`` of the same model
    (default: ``result.redundancy``, which ``cp.probe`` measures); the verdict then rests on the measured output change
    rather than on the maps."""
    crit = crit or Criterion.of(result)
    if redundancy is None:
        redundancy = getattr(result, "redundancy", None)
    kind = result.applied_kind
    view = BlockView.of(result, kind, crit)
    regimes = view.regimes()
    depth = result.depth
    similar, beyond = view.similar, view.beyond_twin
    sim_numbers = _numbers(view, similar)
    twin_mask = view.twin_similar
    comparable = sum(1 for p in range(len(view.blocks)) if np.isfinite(view.values["sim_prev"][p]))
    out: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "block_numbering": NUMBERING, "verdict": "",
        "kind": kind, "kind_text": KIND_TEXT.get(kind, kind), "metric": PAPER_METRIC,
        "reduction_text": REDUCTION_TEXT[crit.reduction].format(k=crit.neighbors, t=crit.threshold,
                                                                 e=crit.entry_threshold),
        "paper_reduction": PAPER_REDUCTION, "criterion": crit.to_dict(), "depth": depth,
        "images": result.images.count,
        "similar_blocks": sim_numbers, "count": len(sim_numbers), "ratio": len(sim_numbers) / max(depth, 1),
        "count_interval": _count_interval(view, view.per_image_prev),
        "onset": _onset(view),
        "uniform_attention": {"count": comparable, "note": "uniform maps (1/N) give column cosine 1 between any two "
                              "blocks, so every block with a previous block would count"},
        "baseline": None, "collapsed_beyond_twin": _numbers(view, beyond),
        "interchangeable": _numbers(view, view.interchangeable), "interchangeable_rule": INTERCHANGEABLE_RULE,
        "redundancy": _redundancy(redundancy),
        "regimes": _regime_numbers(view, regimes),
        "near_uniform": _near_uniform(result, view),
    }
    if view.twin:
        tb = result.baseline
        twin_numbers = _numbers(view, twin_mask) or []
        out["baseline"] = {"what": "untrained twin", **(tb.settings.get("twin") or {}),
                           "similar_blocks": twin_numbers, "count": len(twin_numbers),
                           "count_interval": _count_interval(view, view.twin_per_image_prev),
                           "uniform": _twin_uniform(result, len(twin_numbers), comparable)}
    other = [k for k in result.attention if k != kind]
    ov = None
    if other:
        ov = BlockView.of(result, other[0], crit)
        on = _numbers(ov, ov.similar) or []
        out["other_kind"] = {"kind": other[0], "kind_text": KIND_TEXT.get(other[0], other[0]),
                             "similar_blocks": on, "count": len(on), "regimes": _regime_numbers(ov, ov.regimes())}
    out["sweep"] = sweep(result, crit, kind, sweep_thresholds) if sweep_thresholds else []
    out["verdict"] = verdict_line(out)
    out["headline"], out["text"] = _sentences(result, view, regimes, ov, out, notes)
    return out


def _redundancy(red: dict[str, Any] | None) -> dict[str, Any] | None:
    """The measured redundancy as the summary keeps it (None: not measured)."""
    if red is None:
        return None
    keep = ("rule", "max_changed", "max_kl", "blocks", "per_block", "removable", "sharing", "refused", "images",
            "classifier")
    return {k: red.get(k) for k in keep}


def _near_uniform(result: Result, view: BlockView) -> list[int] | None:
    """1-based blocks whose softmax maps are near-uniform (entropy / log N >= UNIFORM_ENTROPY): they attend as an
    untrained ViT does. None when no softmax map was measured."""
    probs = result.attention.get("probs")
    if probs is None or getattr(probs, "entropy", None) is None:
        return None
    ent = np.asarray(probs.entropy, dtype=float)
    return [b + 1 for b, e in zip(probs.blocks, ent) if np.isfinite(e) and e >= UNIFORM_ENTROPY]


def _twin_uniform(result: Result, twin_count: int, comparable: int) -> bool:
    """Whether the untrained twin is, for the paper's metric, uniform attention: softmax entropy >=
    TWIN_UNIFORM_ENTROPY of log N in every block and the same similar-block count. Then the twin is no separate
    finding (a library's init attends uniformly) and the verdict says so."""
    probs = result.baseline.attention.get("probs") if result.baseline is not None else None
    if probs is None or getattr(probs, "entropy", None) is None:
        return False
    ent = np.asarray(probs.entropy, dtype=float)
    return bool(ent.size and np.all(ent >= TWIN_UNIFORM_ENTROPY)) and twin_count == comparable


def _regime_numbers(view: BlockView, regimes: list[str]) -> dict[str, list[int]]:
    return {name: [b + 1 for b, r in zip(view.blocks, regimes) if r == name]
            for name in ("uniform", "token-uniform", "repeating")}


def verdict_line(s: dict[str, Any]) -> str:
    """The one-line answer, worded from the summary ``s`` alone (``judge``'s fields), e.g.

        VERDICT: blocks 6-7, 9-32 redundant (26 of 32), each alone: reusing the previous block's map in the block
        changes < 1% of predictions (measured); not together: block 8's map in blocks 9-32 at once changes 11.1%
        — softmax maps: paper's metric 1/32, untrained twin 31/32 = uniform attention

    In order of evidence: redundancy measured by intervention (``audit`` by default), else the blocks predicted
    interchangeable from their softmax maps (the calibrated rule), else, for maps after Re-attention, which no map
    measure predicts, no answer but where to get one. The paper's count, the twin's and uniform attention's follow the
    dash. Every command prints this line first; change the rules in ``judge``, the wording here."""
    d, base, red = s["depth"], s.get("baseline"), s.get("redundancy")
    counts = [f"paper's metric {s['count']}/{d}"]
    uniform = s["uniform_attention"]["count"]
    if base is not None and base.get("uniform"):
        counts.append(f"untrained twin {base['count']}/{d} = uniform attention")
    else:
        if base is not None:
            counts.append(f"untrained twin {base['count']}/{d}")
        counts.append(f"uniform attention {uniform}/{d}")
    detail = f"{KIND_SHORT.get(s['kind'], s['kind'])}: " + ", ".join(counts)
    if red is not None and red.get("classifier"):
        blocks = red["blocks"]
        answer = (f"{blocks_text(blocks)} redundant ({len(blocks)} of {d}), each alone: reusing the previous "
                  f"block's map in the block changes < {red['max_changed']:.0%} of predictions (measured)"
                  + _together(red) if blocks else
                  f"no redundant block (0 of {d}): reusing the previous block's map changes >= "
                  f"{red['max_changed']:.0%} of predictions or KL >= {red['max_kl']} in every block (measured)")
    elif s.get("interchangeable") is not None:
        blocks = s["interchangeable"]
        answer = (f"{blocks_text(blocks)} predicted redundant from the maps ({len(blocks)} of {d}; not measured: "
                  "--no-intervene)" if blocks else
                  f"no block predicted redundant from the maps (0 of {d}; not measured: --no-intervene)")
    elif s["kind"] == "mixed":
        answer = ("not judged from the maps: no map measure predicts redundancy after Re-attention; drop "
                  "--no-intervene to measure it")
    else:
        answer = ("not judged from the maps: the row divergence the rule needs was not measured; drop "
                  "--no-intervene to measure redundancy")
    return f"VERDICT: {answer} — {detail}"


def _together(red: dict[str, Any]) -> str:
    """The sharing check in the verdict line: whether the last run of redundant blocks can reuse one map at once."""
    sh = red.get("sharing")
    if not sh:
        return ""
    f, last = sh["blocks"]
    return (f"; {'and' if passes(red, sh) else 'not'} together: block {sh['source']}'s map in blocks {f}-{last} "
            f"at once changes {100 * sh['changed']:.1f}%")


def _heads_note(result: Result) -> list[str]:
    m = result.model
    if "guess" in (m.heads_source or ""):
        return [(f"HEADS GUESSED: the head count ({m.num_heads}) is a guess ({m.heads_source}); every per-head "
                 "number below assumes it, so confirm it or pass --num-heads N.")]
    return []


def _not_above(s: dict[str, Any], base: dict[str, Any]) -> bool:
    """True when the trained count is not clearly above the twin's (intervals overlap, or the twin scores more)."""
    if s["count_interval"] and base["count_interval"]:
        return s["count_interval"][0] <= base["count_interval"][1]
    return s["count"] <= base["count"]


def _ci(iv: list[float] | None) -> str:
    return "" if iv is None else f" [95% CI {iv[0]:.0f}-{iv[1]:.0f} over images]"


def _sentences(result: Result, view: BlockView, regimes: list[str], other: BlockView | None, s: dict[str, Any],
               notes: Sequence[str]) -> tuple[str, list[str]]:
    crit, v = view.criterion, view.values
    name = result.model.architecture or "model"
    base, where = s["baseline"], f"In the {KIND_SHORT.get(view.kind, view.kind)}, "
    head = (f"{name}, {s['kind_text']}: {s['count']} of {s['depth']} blocks similar by the paper's metric "
            f"({PAPER_METRIC}; {s['reduction_text']}){_ci(s['count_interval'])}")
    head += (f"; untrained twin {base['count']}{_ci(base['count_interval'])}; uniform attention "
             f"{s['uniform_attention']['count']}; collapsed beyond the twin: {len(s['collapsed_beyond_twin'])}"
             + (f" (blocks {spans(s['collapsed_beyond_twin'])})" if s["collapsed_beyond_twin"] else "")
             if base else f"; uniform attention {s['uniform_attention']['count']}; no untrained twin measured, so this "
             "count cannot be told apart from initialisation")
    reattn = {b + 1 for b in (result.model.reattn_blocks or [])}
    text = [s["verdict"], *_heads_note(result), head + "."]
    text += redundancy_sentences(s, reattn)
    text.append(f"Similar blocks (paper's criterion): {spans(s['similar_blocks'])}. {PAPER_REDUCTION}.")
    if base and base.get("uniform"):
        text.append(f"The untrained twin attends uniformly (softmax entropy >= {TWIN_UNIFORM_ENTROPY} of log N in "
                    f"every block): its count ({base['count']}) is uniform attention's, not a separate baseline.")
    elif base and s["similar_blocks"] and _not_above(s, base):
        text.append(f"The untrained twin scores {base['count']} on the same images: the paper's count alone does "
                    "not show collapse that training produced.")
    mask = {r: [x == r for x in regimes] for r in ("uniform", "token-uniform", "repeating")}
    if s["regimes"]["uniform"]:
        text.append(_uniform_sentence(where, s["regimes"]["uniform"], v, mask["uniform"]))
    if other is not None and other.kind == "probs" and s["kind"] != "probs":
        o_uniform = s["other_kind"]["regimes"]["uniform"]
        if o_uniform:
            o_mask = [r == "uniform" for r in other.regimes()]
            text.append(_uniform_sentence("Before Re-attention, in the softmax maps, ", o_uniform, other.values,
                                          o_mask, after=" The maps after Re-attention are judged on their own "
                                          "measures (the norm after Θ rescales them: not row-stochastic, so no "
                                          "entropy)."))
    if s["regimes"]["token-uniform"]:
        m = mask["token-uniform"]
        rows = _med("median", v["row_cosine_prev"], m)
        tu = s["regimes"]["token-uniform"]
        text.append(f"{where}{blocks_text(tu)} ha{'s' if len(tu) == 1 else 've'} rows alike ("
                    + _join(f"rank-1 residual <= {TOKEN_UNIFORM_RESIDUAL}", _med("median", v["rank1_residual"], m))
                    + "): every query attends the same way (token-uniform maps). Eq. 3 scores such maps 1 even on "
                    "disjoint keys" + (f"; row cosine with the previous block, {rows}" if rows else "") + ".")
    red = s["regimes"]["repeating"]
    if red:
        m = mask["repeating"]
        tw = _med("vs the twin's", view.twin["pearson_prev"], m) if view.twin else ""
        text.append(f"{where}{blocks_text(red)} repeat{'s' if len(red) == 1 else ''} the previous block's centred "
                    f"pattern: centred similarity (column Pearson), {_join(_med('median', v['pearson_prev'], m), tw)}"
                    + (f" (margin >= {crit.margin}, paired 95% bound above 0)." if view.twin else
                       f" (> {crit.threshold}). Without the untrained twin this is no evidence that training made "
                       "them so, and nothing is recommended; measure the twin (drop --no-baseline)."))
    if not any(s["regimes"].values()):
        uniform_defined = bool(np.isfinite(v["entropy"]).any())  # row-stochastic maps only
        text.append(f"{where}no regime of collapse: " + ("attention is not near-uniform, " if uniform_defined else "")
                    + "rows differ between queries, and no block repeats the previous block's centred attention "
                    "pattern" + (" beyond the twin." if view.twin else "."))
    text += _heads_sentences(view, regimes, other, reattn)
    if "other_kind" in s and s["kind"] == "mixed":
        o = s["other_kind"]
        text.append(f"Re-attention: {s['count']} blocks similar after head mixing ({s['kind_text']}), {o['count']} in "
                    "the softmax maps before it; the two are not on one scale (the norm after Θ centres the mixed "
                    "maps).")
    text += list(notes)
    im = result.images
    text.append(f"Measured on {im.count} images ({im.source}).")
    return head, text


def _uniform_sentence(where: str, blocks: list[int], v: dict[str, np.ndarray], m: Sequence[bool],
                      after: str = "") -> str:
    floor = _med("median floor", v["floor_prev"], m)
    return (f"{where}{blocks_text(blocks)} attend{'s' if len(blocks) == 1 else ''} near-uniformly ("
            + _join(f"entropy >= {UNIFORM_ENTROPY} of log N", _med("median", v["entropy"], m),
                    _med("TV from uniform", v["tv_uniform"], m))
            + "): the paper's cosine sits at its floor" + (f" ({floor})" if floor else "")
            + "; they attend as an untrained model does." + after)


def _heads_sentences(view: BlockView, regimes: list[str], other: BlockView | None, reattn: set[int]) -> list[str]:
    """Head pruning, only from heads alike beyond the twin (no twin: no advice). Alike heads are evidence of
    redundant heads only where the maps carry a pattern: uniform or token-uniform maps make every pair of heads alike
    trivially, and for maps after Re-attention the softmax maps they are mixed from must carry one too."""
    crit, ch, tch = view.criterion, view.values["cross_head"], view.twin.get("cross_head")
    if tch is None:
        return []
    soft_uniform = other.regimes() if other is not None and other.kind == "probs" and other.blocks == view.blocks \
        else [""] * len(view.blocks)
    heads = [b + 1 for i, b in enumerate(view.blocks) if ch[i] > crit.threshold and regimes[i] == ""
             and soft_uniform[i] != "uniform" and ch[i] - tch[i] >= crit.margin]
    if not heads:
        return []
    mix = "" if set(heads) <= reattn else " or for mixing heads (Re-attention)"
    return [f"In the {KIND_SHORT.get(view.kind, view.kind)}, in blocks {spans(heads)} all heads attend nearly alike "
            f"(cross-head similarity > {crit.threshold}, beyond the twin by >= {crit.margin}): redundant heads, "
            f"candidates for head pruning{mix}."]
