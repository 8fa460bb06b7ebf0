"""How well a binary label predicts a binary ground truth: precision and recall with intervals.

    table = label_agreement(predicted, truth, clusters)     # predicted, truth [n] bool; clusters [n] (e.g. model)
    table["precision"], table["precision_ci"], table["recall"], table["recall_cluster_ci"]

Two intervals per proportion, because blocks of one model are not independent draws: Wilson (blocks treated as
independent, the optimistic one) and a cluster bootstrap over ``clusters`` (whole models resampled with replacement, the
honest one when a handful of models contribute many blocks each). Both at 95 %.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .bootstrap import CONFIDENCE, N_BOOT, wilson


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def cluster_intervals(predicted: np.ndarray, truth: np.ndarray, clusters: Sequence[Any], n_boot: int = N_BOOT,
                      seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, tuple[float, float]]:
    """Percentile intervals of precision and recall when whole clusters are resampled with replacement."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    idx = np.array([ids[c] for c in clusters])
    k = len(ids)
    # per cluster: true positives, predicted positives, actual positives
    tp = np.bincount(idx, weights=(predicted & truth).astype(float), minlength=k)
    pp = np.bincount(idx, weights=predicted.astype(float), minlength=k)
    ap = np.bincount(idx, weights=truth.astype(float), minlength=k)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(n_boot, k))
    counts = np.zeros((n_boot, k))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = (counts @ tp) / (counts @ pp)
        rec = (counts @ tp) / (counts @ ap)
    a = (1 - confidence) / 2
    out = {}
    for name, d in (("precision", prec), ("recall", rec)):
        d = d[np.isfinite(d)]
        out[name] = (float(np.quantile(d, a)), float(np.quantile(d, 1 - a))) if d.size else (math.nan, math.nan)
    return out


def label_agreement(predicted: Sequence[bool], truth: Sequence[bool], clusters: Sequence[Any] | None = None,
                    n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Counts, precision (of the label as a predictor of ``truth``), recall and accuracy, each proportion with its
    Wilson interval and, with ``clusters``, its cluster-bootstrap interval. NaN where a denominator is 0."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"predicted and truth differ in shape: {p.shape} vs {t.shape}")
    tp, fp = int((p & t).sum()), int((p & ~t).sum())
    fn, tn = int((~p & t).sum()), int((~p & ~t).sum())
    out: dict[str, Any] = {"n": int(p.size), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                           "precision": _ratio(tp, tp + fp), "precision_ci": wilson(tp, tp + fp),
                           "recall": _ratio(tp, tp + fn), "recall_ci": wilson(tp, tp + fn),
                           "accuracy": _ratio(tp + tn, p.size), "accuracy_ci": wilson(tp + tn, p.size)}
    if clusters is not None:
        ci = cluster_intervals(p, t, list(clusters), n_boot, seed)
        out["precision_cluster_ci"], out["recall_cluster_ci"] = ci["precision"], ci["recall"]
    return out
