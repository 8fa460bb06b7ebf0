"""The verdict's sentences about redundancy: measured by intervention (``redundancy``), or predicted from the maps.

    text += redundancy_sentences(summary, reattn={...})    # judge() calls it; 1-based blocks
"""
from __future__ import annotations

from typing import Any

from .blocks import UNIFORM_ENTROPY
from .spans import blocks_text, spans


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def passes(red: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether a measured row (the sharing check's) meets the summary's own rule: changed and KL under its bounds."""
    return row["changed"] < red["max_changed"] and row["kl"] < red["max_kl"]


def _sharing(red: dict[str, Any], reattn: set[int]) -> str:
    """The sharing check: the last run of redundant blocks all reusing one map, and what it would mean."""
    sh = red["sharing"]
    f, last = sh["blocks"]
    many = last > f
    ok = passes(red, sh)
    cure = "" if set(range(f, last + 1)) <= reattn else ", or for Re-attention (DeepViT) when retraining"
    gone = red.get("removable")
    removal = "" if gone is not None and not set(range(f, last + 1)) <= set(gone) else \
        f", or {'are candidates' if many else 'is a candidate'} for removal"
    meaning = (f"{'they' if many else 'it'} could share block {sh['source']}'s attention map{removal}{cure}." if ok
               else "each is redundant alone, but not all of them together.")
    return (f"Reusing block {sh['source']}'s map in {blocks_text(list(range(f, last + 1)))} at once changes "
            f"{_pct(sh['changed'])} of predictions (95% CI {_pct(sh['changed_ci_low'])}-{_pct(sh['changed_ci_high'])}),"
            f" mean KL {sh['kl']:.3g}: {meaning}")


def _skip_baseline(red: dict[str, Any], blocks: list[int]) -> str:
    """The single-block reuse beside its baseline: removing the same block outright, alone."""
    gone, m = red["removable"], len(blocks)
    rest = sorted(set(blocks) - set(gone))
    head = "Baseline, skipping the block outright (alone): "
    if len(gone) == m:
        return (head + f"changes < {red['max_changed']:.0%} of predictions too{'' if m == 1 else f' in all {m}'}: "
                "one block barely matters alone here, so single-block redundancy says little about the maps; the "
                "sharing check tests them together.")
    if not gone:
        return (head + f"changes >= {red['max_changed']:.0%} of predictions or KL >= {red['max_kl']} in every one: "
                "the blocks matter, their own maps do not (the previous block's serves as well).")
    return (head + f"changes < {red['max_changed']:.0%} too in {len(gone)} of these {m}; in {blocks_text(rest)} the "
            "block matters but its own map does not (the previous block's serves as well).")


def redundancy_sentences(s: dict[str, Any], reattn: set[int]) -> list[str]:
    """What the verdict's answer rests on: measured redundancy (and the sharing check), or the map-based prediction,
    and which of those blocks never left near-uniform attention."""
    red, out = s.get("redundancy"), []
    if red is not None and not red.get("classifier"):
        out.append("Redundancy not measured: the model has no classifier, so there are no predictions to compare.")
    elif red is not None:
        rows = [r for r in red["per_block"] if r["redundant"]]
        if rows:
            worst = max(rows, key=lambda r: r["changed"])
            one = len(rows) == 1
            out.append(f"Measured ({red['rule']}, {red['images']} images): {blocks_text(red['blocks'])} "
                       f"{'is' if one else 'are'} redundant; "
                       f"{'its change' if one else 'the largest change among them'} is "
                       f"{_pct(worst['changed'])} (block {worst['block']}, 95% CI {_pct(worst['changed_ci_low'])}-"
                       f"{_pct(worst['changed_ci_high'])}).")
            if red.get("removable") is not None:
                out.append(_skip_baseline(red, [r["block"] for r in rows]))
        if red.get("sharing") is not None:
            out.append(_sharing(red, reattn))
        out += [f"Not measured: {line}." for line in red.get("refused") or []]
    elif s.get("interchangeable") is not None:
        out.append(f"Predicted from the maps ({s['interchangeable_rule']}): blocks {spans(s['interchangeable'])}; "
                   "not measured (--no-intervene / intervene=False).")
    answer = (red["blocks"] if red is not None and red.get("classifier") else s.get("interchangeable")) or []
    flat = sorted(set(answer) & set(s.get("near_uniform") or []))
    if flat:
        one = len(flat) == 1
        out.append(f"Of these, the softmax maps of {blocks_text(flat)} attend near-uniformly (entropy >= "
                   f"{UNIFORM_ENTROPY} of log N): {'it' if one else 'they'} stayed at the uniform attention of "
                   "initialisation rather than repeating a pattern training gave the block before.")
    return out
