"""Calibrate the verdict against interventions: for every block of a model and of its untrained twin, the verdict's
labels beside what replacing that block's map actually does to the outputs.

    rows = calibrate("checkpoints/vit_micro_d32.safetensors", "builtin:digits")   # one dict per (role, block)
    table = agreement(pd.DataFrame(rows))                                         # precision / recall per label

Ground truth, per block k >= 2 (1-based): *functionally redundant* by ``probing.redundancy``'s rule (the one ``audit``
measures): block k multiplying its V by block k-1's applied map, alone, changes fewer than 1 % of the top-1
predictions AND the mean KL(p_orig || p_new) stays below 0.01 nats. Why the KL bound: by Pinsker's inequality the total
variation between the two output distributions is at most sqrt(KL / 2) = 0.07; the top-1 rule alone would call a block
redundant whose swap moves confidence a lot without flipping the argmax. Skipping the block alone (``skip_*`` columns,
``removable``) is measured beside it, the evidence for removal rather than sharing.

Labels set beside it: the paper's criterion (``similar``, mean reduction; ``similar_ratio``, ratio reduction), collapse
beyond the twin (``beyond_twin``; trained models only), and each regime. A twin is labelled as a model of its own (its
``beyond_twin`` is undefined).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..loading.build import load_model
from ..loading.info import LoadedModel
from ..metrics.agreement import label_agreement
from ..probing.baseline import recalibrate_bn, untrained_twin
from ..probing.blocks import BlockView, Criterion, _arr
from ..probing.intervene import measure
from ..probing.outcome import Intervention
from ..probing.redundancy import is_redundant, single_reuse, single_skip
from ..probing.run import image_batches, probe

PREDICTORS = ("sim_prev", "ratio_prev", "floor_prev", "excess_prev", "pearson_prev", "row_cosine_prev", "jsd_prev",
              "matched_prev", "entropy", "rank1_residual", "cross_head")
LABELS = ("interchangeable", "similar", "similar_ratio", "beyond_twin", "uniform", "token_uniform", "repeating_regime")


def _label_rows(result: Any, kind: str, crit: Criterion, role: str) -> list[dict[str, Any]]:
    """Per block of ``result`` (a probe result, or its ``baseline`` judged as a model of its own): labels and
    predictors."""
    view = BlockView.of(result, kind, crit)
    ratio_view = BlockView.of(result, kind, Criterion(**{**crit.__dict__, "reduction": "ratio"}))
    probs = result.attention.get("probs")
    ent = _arr(probs, "entropy", len(view.blocks)) if kind != "probs" and probs is not None else None
    regimes = view.regimes()
    beyond, inter = view.beyond_twin, view.interchangeable
    rows = []
    for i, b in enumerate(view.blocks):
        row: dict[str, Any] = {"role": role, "kind": kind, "block": b + 1, "index": b}
        row.update({p: float(view.values[p][i]) for p in PREDICTORS})
        row["probs_entropy"] = float(ent[i]) if ent is not None else row["entropy"]  # softmax maps' uniformity
        row.update(interchangeable=None if inter is None else bool(inter[i]), similar=bool(view.similar[i]),
                   similar_ratio=bool(ratio_view.similar[i]),
                   beyond_twin=None if beyond is None else bool(beyond[i]), regime=regimes[i],
                   uniform=regimes[i] == "uniform", token_uniform=regimes[i] == "token-uniform",
                   repeating_regime=regimes[i] == "repeating")
        rows.append(row)
    return rows


def interventions(depth: int) -> list[Intervention]:
    """Per block, alone: reuse the previous block's map (blocks 2..L), and skip it (blocks 1..L); 1-based blocks."""
    return single_reuse(depth) + single_skip(list(range(1, depth + 1)))


def _outcomes(report: Any) -> dict[tuple[str, int], dict[str, float]]:
    out = {}
    for o in report.outcomes:
        iv = o.intervention
        lo, hi = o.changed_interval()
        out[(iv.mode, iv.block)] = {"changed": (o.changed or 0) / max(o.images, 1), "changed_ci_low": lo,
                                 "changed_ci_high": hi, "kl": o.kl, "images": o.images}
    return out


def _twin(loaded: LoadedModel, images: Any, num_images: int | None, batch_size: int, seed: int,
          device: torch.device) -> LoadedModel:
    """The untrained twin exactly as ``probe(..., baseline=True)`` builds it (same seed, BatchNorm statistics
    re-estimated on the same images)."""
    twin, _ = untrained_twin(loaded.model, seed)
    batches, _ = image_batches(images, twin, num_images, batch_size)
    recalibrate_bn(twin, batches, device)
    return LoadedModel(twin, loaded.info, loaded.checkpoint)


def calibrate(path: str | Path, images: Any = "builtin:digits", *, num_images: int | None = None,
              batch_size: int = 60, seed: int = 0, progress: bool = False, **probe_options: Any
              ) -> list[dict[str, Any]]:
    """One row per (role, block) of the checkpoint at ``path`` and its untrained twin: labels, predictors and the
    measured output change of each single-block intervention (``reuse_*``, ``skip_*``), and ``redundant`` (truth)."""
    loaded = load_model(path)
    result = probe(loaded, images, num_images=num_images, batch_size=batch_size, kinds=("probs", "mixed"),
                   baseline=True, baseline_seed=seed, progress=progress, **probe_options)
    crit, kind, depth = Criterion.of(result), result.applied_kind, result.depth
    device = next(loaded.model.parameters()).device
    ivs = interventions(depth)
    common = dict(num_images=num_images, batch_size=batch_size, progress=progress, keep_going=True)
    measured = {"trained": _outcomes(measure(loaded, images, ivs, **common)),
                "twin": _outcomes(measure(_twin(loaded, images, num_images, batch_size, seed, device), images, ivs,
                                          **common))}
    rows = _label_rows(result, kind, crit, "trained") + _label_rows(result.baseline, kind, crit, "twin")
    info = loaded.info
    for row in rows:
        row.update(model=Path(path).stem, architecture=info.architecture, depth=depth)
        for mode in ("reuse", "skip"):
            o = measured[row["role"]].get((mode, row["block"]))
            for key in ("changed", "changed_ci_low", "changed_ci_high", "kl"):
                row[f"{mode}_{key}"] = math.nan if o is None else o[key]
        for mode, truth in (("reuse", "redundant"), ("skip", "removable")):  # the verdict's rule; None: not measured
            changed = row[f"{mode}_changed"]
            row[truth] = is_redundant({"changed": changed, "kl": row[f"{mode}_kl"]}) if math.isfinite(changed) \
                else None
    return rows


def agreement(frame: Any, labels: tuple[str, ...] = LABELS, truth: str = "redundant") -> list[dict[str, Any]]:
    """Precision and recall of each label as a predictor of ``truth``, per role (trained, twin) and over both, with
    Wilson and cluster-bootstrap (over models) 95 % intervals. Blocks without a truth value (block 1) are left out."""
    out = []
    df = frame[frame[truth].notna()]
    for role, part in (("trained", df[df.role == "trained"]), ("twin", df[df.role == "twin"]), ("all", df)):
        for label in labels:
            sub = part[part[label].notna()]
            if sub.empty:
                continue
            a = label_agreement(sub[label].astype(bool).to_numpy(), sub[truth].astype(bool).to_numpy(),
                                (sub.model + "/" + sub.role).tolist())
            out.append({"role": role, "label": label, "truth": truth, "blocks": a["n"], "tp": a["tp"], "fp": a["fp"],
                        "fn": a["fn"], "tn": a["tn"], "precision": a["precision"],
                        "precision_ci_low": a["precision_ci"][0], "precision_ci_high": a["precision_ci"][1],
                        "precision_cluster_ci_low": a["precision_cluster_ci"][0],
                        "precision_cluster_ci_high": a["precision_cluster_ci"][1], "recall": a["recall"],
                        "recall_ci_low": a["recall_ci"][0], "recall_ci_high": a["recall_ci"][1],
                        "recall_cluster_ci_low": a["recall_cluster_ci"][0],
                        "recall_cluster_ci_high": a["recall_cluster_ci"][1]})
    return out
