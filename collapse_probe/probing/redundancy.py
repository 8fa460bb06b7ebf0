"""Redundancy measured, not inferred: per block, what reusing the previous block's map does to the outputs.

    red = measure_redundancy(loaded, "builtin:digits")        # every block 2..L alone, plus the sharing check
    red["blocks"]                                             # 1-based blocks whose swap changes (almost) nothing
    judge(result, redundancy=red)                             # the verdict then rests on these numbers

A block k (k >= 2) is *redundant* when multiplying its V by block k-1's applied map, alone (every other block intact),
changes fewer than ``MAX_CHANGED`` of the top-1 predictions and the mean KL(p_orig || p_new) is below ``MAX_KL`` nats
(Pinsker: the output distributions then differ by at most sqrt(KL / 2) = 0.07 in total variation). These are the
numbers ``figures/calibration`` set the verdict's map-based rules against. The *sharing check* is what a user would do
with the answer: the last run of redundant blocks f..L all reusing block f-1's map at once, with its Wilson interval.
The *skip baseline*: each redundant block removed outright, alone. Where that changes nothing either, the block barely
matters on its own (common in deep residual networks: figures/calibration found it for 55 of the 56 redundant ViT
blocks), so single-block redundancy says little about the map itself; where skipping does change the outputs, the
block matters but its own map does not.
A model without a classifier has no predictions to compare: nothing is called redundant, and the reason is given.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hooks.intervene import intervention_blocks
from ..loading.info import LoadedModel
from .intervene import measure
from .outcome import Intervention
from .run import LOAD_OPTIONS, open_model

MAX_CHANGED = 0.01  # fewer than 1 % of top-1 predictions change
MAX_KL = 0.01  # nats; Pinsker: total variation <= sqrt(KL / 2) = 0.071
RULE = (f"reusing the previous block's map in the block alone changes < {MAX_CHANGED:.0%} of top-1 predictions and "
        f"mean KL < {MAX_KL} nats")


def single_reuse(depth: int) -> list[Intervention]:
    """Blocks 2..L, each alone, multiplying V by the previous block's applied map (1-based)."""
    return [Intervention("reuse", (b,), b - 1, b) for b in range(2, depth + 1)]


def single_skip(blocks: list[int]) -> list[Intervention]:
    """Each of ``blocks`` (1-based) removed outright, alone: the baseline of single-block reuse."""
    return [Intervention("skip", (b,), None, b) for b in blocks]


def _row(o: Any) -> dict[str, Any]:
    lo, hi = o.changed_interval()
    changed = math.nan if o.changed is None else o.changed / max(o.images, 1)
    return {"block": o.intervention.block, "changed": changed, "changed_count": o.changed, "images": o.images,
            "changed_ci_low": lo, "changed_ci_high": hi, "kl": o.kl}


def is_redundant(row: dict[str, Any]) -> bool:
    return bool(row["changed"] < MAX_CHANGED and row["kl"] < MAX_KL) if math.isfinite(row["changed"]) else False


def _last_run(blocks: list[int], depth: int) -> tuple[int, int] | None:
    """The run of two or more consecutive redundant blocks that ends at the last block, as (first, last), or None (a
    single block's sharing is its single-block reuse, already measured)."""
    if not blocks or blocks[-1] != depth:
        return None
    first = depth
    while first - 1 in blocks:
        first -= 1
    return (first, depth) if 2 <= first < depth else None


@torch.inference_mode()
def measure_redundancy(model_or_path: nn.Module | LoadedModel | str | Path, images: Any = None, *,
                       sharing: bool = True, skip: bool = True, **options: Any) -> dict[str, Any]:
    """Per-block redundancy of a model (``options`` as for ``intervene.measure``: num_images, batch_size, device,
    progress, load options). Returns {"rule", "blocks" (redundant, 1-based), "per_block" [{block, changed,
    changed_ci_low, changed_ci_high, kl, redundant, skip_changed, skip_kl, removable}], "removable" (redundant blocks
    whose removal alone passes the same rule; None when ``skip`` is off), "sharing" (None or the last run's joint
    reuse), "refused", "images", "classifier"}."""
    load = {k: options.pop(k) for k in list(options) if k in LOAD_OPTIONS}
    loaded, dev, _ = open_model(model_or_path, options.pop("device", None), **load)  # read once, for both passes
    options = {"progress": False, **options, "device": dev}
    depth = len(intervention_blocks(loaded.model))
    report = measure(loaded, images, single_reuse(depth), keep_going=True, **options)
    rows = [_row(o) for o in report.outcomes]
    for r in rows:
        r.update(redundant=is_redundant(r), skip_changed=math.nan, skip_kl=math.nan, removable=None)
    blocks = [r["block"] for r in rows if r["redundant"]]
    removable = None
    if skip and blocks:
        skipped = {o.intervention.block: _row(o) for o in
                   measure(loaded, images, single_skip(blocks), keep_going=True, **options).outcomes}
        for r in rows:
            if r["block"] in skipped:
                k = skipped[r["block"]]
                r.update(skip_changed=k["changed"], skip_kl=k["kl"], removable=is_redundant(k))
        removable = [r["block"] for r in rows if r["removable"]]
    out: dict[str, Any] = {"rule": RULE, "max_changed": MAX_CHANGED, "max_kl": MAX_KL, "blocks": blocks,
                           "per_block": rows, "removable": removable, "sharing": None,
                           "refused": list(report.refused), "images": report.images.count,
                           "classifier": bool(report.settings.get("classifier"))}
    run = _last_run(blocks, depth) if sharing else None
    if run is not None:
        first, last = run
        iv = Intervention("reuse", tuple(range(first, last + 1)), first - 1, first - 1)
        shared = measure(loaded, images, [iv], keep_going=True, **options)
        if shared.outcomes:
            row = _row(shared.outcomes[0])
            row.pop("block")
            out["sharing"] = {"source": first - 1, "blocks": [first, last], **row}
    return out
