"""Per-block numbers of one map kind, beside the untrained twin's and with intervals over images: the rows every
command prints (text table, CSV, JSON ``per_block``, the audit report, ``Result.to_pandas()``).

    view = BlockView.of(result, "probs", Criterion.of(result))
    view.values["sim_prev"], view.low["sim_prev"], view.twin["sim_prev"]     # [L] each
    rows = block_rows(result)                                                # one dict per (kind, block)

Numbering: ``block`` is 1-based (block 1 = module ``blocks.0``), as in the paper and every table people read;
``index`` is the 0-based module index, for code (``BlockView.blocks`` holds those module indices). Column names, the
one scheme of every CSV and DataFrame: ``checkpoint`` first, 95 % intervals as ``<name>_ci_low`` / ``<name>_ci_high``,
the untrained twin's value as ``twin_<name>``. "prev" quantities compare a block with the previous ``k`` blocks
(``--neighbors``); the centred, row and matched similarities, JSD and the twin margin always use the previous block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import bootstrap

# a probing.result.ProbeResult, duck-typed: this module sits below result.py, which builds its JSON and tables
# from these rows
Result = Any
REDUCTIONS = ("mean", "ratio")
MARGIN = 0.1  # centred similarity a block must exceed its twin's by, to count as collapsed beyond the twin
UNIFORM_ENTROPY = 0.95  # entropy / log N at or above this: near-uniform attention
TOKEN_UNIFORM_RESIDUAL = 0.1  # rank-1 residual at or below this: rows alike (every query attends the same way)
# mean row Jensen-Shannon divergence (nats) from the previous block's softmax map below which a block's map is
# predicted interchangeable with it: fitted on the 40-epoch bundled models against single-block reuse interventions
# (best F0.5: precision 0.87, recall 0.84 on trained ViT blocks), checked on the 80-epoch set (figures/calibration)
JSD_INTERCHANGEABLE = 0.12


@dataclass(frozen=True)
class Criterion:
    """How similar blocks are counted: block threshold, neighbours k, reduction ("mean" or "ratio", whose per-entry
    cut ``entry_threshold`` was fixed when probing), the twin margin, and the bootstrap's draws and seed."""

    threshold: float = 0.9
    neighbors: int = 1
    reduction: str = "mean"
    entry_threshold: float = 0.9
    margin: float = MARGIN
    n_boot: int = bootstrap.N_BOOT
    seed: int = 0

    @classmethod
    def of(cls, result: Result, **overrides: Any) -> Criterion:
        """The settings ``result`` was probed with, ``overrides`` (None values ignored) on top."""
        s = result.settings
        base = {"threshold": s.get("threshold", 0.9), "neighbors": s.get("neighbors", 1),
                "reduction": s.get("reduction", "mean"),
                "entry_threshold": s.get("entry_threshold", s.get("threshold", 0.9))}
        base.update({k: v for k, v in overrides.items() if v is not None})
        if base["reduction"] not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {base['reduction']!r}")
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return {"block_threshold": self.threshold, "entry_threshold": self.entry_threshold,
                "neighbors": self.neighbors, "reduction": self.reduction, "twin_margin": self.margin,
                "bootstrap_draws": self.n_boot, "bootstrap_seed": self.seed}


def _prev(blocks: list[int], k: int) -> list[list[int]]:
    """For each position, the positions of the k blocks just before it ([] where they are not all probed)."""
    pos = {b: i for i, b in enumerate(blocks)}
    out = []
    for b in blocks:
        p = [pos[b - j] for j in range(1, k + 1) if (b - j) in pos]
        out.append(p if len(p) == k else [])
    return out


def neighbor_of(m: np.ndarray | None, blocks: list[int], k: int = 1) -> np.ndarray:
    """[..., L, L] -> [..., L]: mean of m[..., l, prev] over the previous k blocks (NaN where there are none)."""
    L = len(blocks)
    if m is None:
        return np.full(L, math.nan)
    m = np.asarray(m, dtype=float)
    out = np.full((*m.shape[:-2], L), math.nan)
    for i, p in enumerate(_prev(blocks, k)):
        if p:
            out[..., i] = m[..., i, p].mean(-1)
    return out


def _arr(st: Any, name: str, L: int) -> np.ndarray:
    v = getattr(st, name, None)
    return np.full(L, math.nan) if v is None else np.asarray(v, dtype=float)


def _per_image(st: Any, name: str) -> np.ndarray | None:
    pi = getattr(st, "per_image", None) or {}
    v = pi.get(name)
    return None if v is None else np.asarray(v, dtype=float)


@dataclass
class BlockView:
    """Per-block arrays [L] of one kind (``values``), their 95% bootstrap bounds (``low``/``high``, where per-image
    values exist) and the twin's values (``twin``, empty without a baseline), plus the per-image neighbour similarity
    of the chosen reduction [n, L] (for count intervals) and the draws' weights."""

    kind: str
    blocks: list[int]
    criterion: Criterion
    values: dict[str, np.ndarray] = field(default_factory=dict)
    low: dict[str, np.ndarray] = field(default_factory=dict)
    high: dict[str, np.ndarray] = field(default_factory=dict)
    twin: dict[str, np.ndarray] = field(default_factory=dict)
    per_image_prev: np.ndarray | None = None
    twin_per_image_prev: np.ndarray | None = None
    weights: np.ndarray | None = None
    twin_difference_low: np.ndarray | None = None  # 95% lower bound of (centred prev - twin's), paired over images

    @classmethod
    def of(cls, result: Result, kind: str, crit: Criterion) -> BlockView:
        st = result.attention[kind]
        view = cls(kind, list(st.blocks), crit)
        view.values, pi = _quantities(st, crit)
        view.per_image_prev = pi.get("sim_prev" if crit.reduction == "mean" else "ratio_prev")
        twin_st = result.baseline.attention.get(kind) if result.baseline is not None else None
        if twin_st is not None and list(twin_st.blocks) == view.blocks:
            view.twin, twin_pi = _quantities(twin_st, crit)
            view.twin_per_image_prev = twin_pi.get("sim_prev" if crit.reduction == "mean" else "ratio_prev")
        else:
            twin_pi = {}
        n = next((v.shape[0] for v in pi.values() if v is not None), 0)
        if n:
            view.weights = bootstrap.resample_weights(n, crit.n_boot, crit.seed)
            for name, v in pi.items():
                view.low[name], view.high[name] = bootstrap.mean_interval(v, view.weights)
            a, b = pi.get("pearson_prev"), twin_pi.get("pearson_prev")
            if a is not None and b is not None and a.shape == b.shape:  # same images in the same order: paired
                view.twin_difference_low = bootstrap.mean_interval(a - b, view.weights)[0]
        return view

    @property
    def similar(self) -> np.ndarray:
        """[L] bool: the paper's criterion (the chosen reduction's prev similarity above the block threshold)."""
        key = "sim_prev" if self.criterion.reduction == "mean" else "ratio_prev"
        return np.nan_to_num(self.values[key], nan=-np.inf) > self.criterion.threshold

    @property
    def twin_similar(self) -> np.ndarray | None:
        if not self.twin:
            return None
        key = "sim_prev" if self.criterion.reduction == "mean" else "ratio_prev"
        return np.nan_to_num(self.twin[key], nan=-np.inf) > self.criterion.threshold

    @property
    def beyond_twin(self) -> np.ndarray | None:
        """[L] bool or None (no twin): similar by the paper's criterion, *and* the centred similarity with the previous
        block is itself above the block threshold (the attention pattern repeats, not only its uniform part) and exceeds
        the twin's by at least the margin, with the paired bootstrap's 95% lower bound of that difference above 0."""
        if not self.twin:
            return None
        pearson = self.values["pearson_prev"]
        diff = pearson - self.twin["pearson_prev"]
        ok = (np.nan_to_num(diff, nan=-np.inf) >= self.criterion.margin) & (
            np.nan_to_num(pearson, nan=-np.inf) > self.criterion.threshold)
        if self.twin_difference_low is not None:
            ok &= np.nan_to_num(self.twin_difference_low, nan=-np.inf) > 0
        return self.similar & ok

    @property
    def interchangeable(self) -> np.ndarray | None:
        """[L] bool, or None where the rule does not apply: the block's softmax map is within ``JSD_INTERCHANGEABLE``
        (mean row Jensen-Shannon divergence) of the previous block's, so reusing the previous map should change the
        outputs little. Defined for row-stochastic maps only; for maps after Re-attention no map measure predicted
        the interventions (figures/calibration), so None."""
        jsd = self.values["jsd_prev"]
        if not np.isfinite(jsd).any():
            return None
        return np.nan_to_num(jsd, nan=np.inf) < JSD_INTERCHANGEABLE

    def regimes(self) -> list[str]:
        """Per block, read from this kind's own measures only (never borrowed from the other kind): "uniform" (entropy
        / log N >= 0.95; defined for row-stochastic maps only, so the softmax maps: a map after Re-attention's Θ and
        BatchNorm has no entropy and is never called uniform), "token-uniform" (rank-1 residual <= 0.1: rows alike),
        "repeating" (collapsed beyond the twin: the centred pattern repeats; without a twin: centred similarity with
        the previous block above the block threshold) or "" (none of these)."""
        ent = self.values["entropy"]
        beyond = self.beyond_twin
        if beyond is None:
            beyond = np.nan_to_num(self.values["pearson_prev"], nan=-np.inf) > self.criterion.threshold
        out = []
        for i in range(len(self.blocks)):
            if ent[i] >= UNIFORM_ENTROPY:  # NaN (mixed maps) compares False
                out.append("uniform")
            elif self.values["rank1_residual"][i] <= TOKEN_UNIFORM_RESIDUAL:
                out.append("token-uniform")
            elif beyond[i]:
                out.append("repeating")
            else:
                out.append("")
        return out


def _quantities(st: Any, crit: Criterion) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """(per-block values [L], per-image values [n, L] where the result kept them) of one AttentionStats."""
    blocks, k, L = list(st.blocks), crit.neighbors, len(st.blocks)
    sim, ratio = neighbor_of(st.similarity, blocks, k), neighbor_of(st.ratio, blocks, k)
    floor = neighbor_of(getattr(st, "cosine_floor", None), blocks, k)
    v = {"sim_prev": sim, "ratio_prev": ratio, "floor_prev": floor, "excess_prev": sim - floor,
         "pearson_prev": neighbor_of(getattr(st, "pearson", None), blocks, 1),
         "row_cosine_prev": neighbor_of(getattr(st, "row_cosine", None), blocks, 1),
         "matched_prev": neighbor_of(getattr(st, "matched", None), blocks, 1),
         "jsd_prev": _arr(st, "row_jsd_prev", L), "entropy": _arr(st, "entropy", L),
         "tv_uniform": _arr(st, "tv_uniform", L), "rank1_residual": _arr(st, "rank1_residual", L),
         "cross_head": _arr(st, "cross_head", L), "effective_rank": _arr(st, "effective_rank", L),
         "energy_rank": _arr(st, "energy_rank", L),
         "attention_distance": _arr(st, "attention_distance", L)}
    pi: dict[str, np.ndarray | None] = {}
    s, r = _per_image(st, "similarity"), _per_image(st, "ratio")
    if s is not None:
        pi["sim_prev"] = neighbor_of(s, blocks, k)
    if r is not None:
        pi["ratio_prev"] = neighbor_of(r, blocks, k)
    for name in ("pearson_prev", "entropy", "tv_uniform", "rank1_residual", "cross_head"):
        x = _per_image(st, name)
        if x is not None:
            pi[name] = x
    return v, pi


ROW_KEYS = ("sim_prev", "ratio_prev", "floor_prev", "excess_prev", "pearson_prev", "row_cosine_prev", "matched_prev",
            "jsd_prev", "entropy", "tv_uniform", "rank1_residual", "cross_head", "effective_rank", "energy_rank",
            "attention_distance")
INTERVAL_KEYS = ("sim_prev", "ratio_prev", "pearson_prev", "entropy", "rank1_residual", "cross_head")
TWIN_KEYS = ("sim_prev", "ratio_prev", "pearson_prev", "entropy", "rank1_residual", "cross_head")
FEATURE_KEYS = ("feature_sim_last", "feature_residual", "token_uniformity", "cka_prev")


def checkpoint_label(result: Result) -> str:
    """What the ``checkpoint`` column of a result's rows says: the file or folder as given, else "in-memory model"."""
    return str(result.model.checkpoint) if result.model.checkpoint else "in-memory model"


def block_rows(result: Result, crit: Criterion | None = None, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """One dict per (kind, block): checkpoint (``checkpoint``, default ``checkpoint_label``), kind, block (1-based),
    index (0-based), the ``ROW_KEYS`` values, ``*_ci_low`` / ``*_ci_high`` bounds for ``INTERVAL_KEYS`` (when
    per-image values exist), ``twin_*`` for ``TWIN_KEYS`` (with a baseline), similar / beyond_twin / interchangeable /
    regime, and the feature columns when block outputs were probed. NaN where a number does not exist (e.g.
    sim_prev of block 1)."""
    crit = crit or Criterion.of(result)
    feats = _feature_columns(result)
    label = checkpoint_label(result) if checkpoint is None else checkpoint
    rows: list[dict[str, Any]] = []
    for kind in result.attention:
        view = BlockView.of(result, kind, crit)
        regimes, similar, beyond = view.regimes(), view.similar, view.beyond_twin
        inter = view.interchangeable
        for i, b in enumerate(view.blocks):
            row: dict[str, Any] = {"checkpoint": label, "kind": kind, "block": b + 1, "index": b}
            row.update({key: float(view.values[key][i]) for key in ROW_KEYS})
            for key in INTERVAL_KEYS:
                if key in view.low:
                    row[f"{key}_ci_low"], row[f"{key}_ci_high"] = float(view.low[key][i]), float(view.high[key][i])
            if view.twin:
                row.update({f"twin_{key}": float(view.twin[key][i]) for key in TWIN_KEYS})
            row["similar"] = bool(similar[i])
            row["beyond_twin"] = None if beyond is None else bool(beyond[i])
            row["interchangeable"] = None if inter is None else bool(inter[i])
            row.update(_measured(result, kind, b + 1))
            row["regime"] = regimes[i]
            if feats:
                row.update(feats.get(b, dict.fromkeys(FEATURE_KEYS, math.nan)))
            rows.append(row)
    return rows


def _measured(result: Result, kind: str, block: int) -> dict[str, Any]:
    """The measured redundancy of ``block`` (``result.redundancy``, ``probing.redundancy``) on the rows of the kind
    the verdict judges: ``reuse_changed`` (share of predictions changed by reusing the previous block's map in it
    alone) with its Wilson bounds, ``reuse_kl`` and ``redundant``; for redundant blocks the skip baseline,
    ``skip_changed`` and ``removable`` (removing the block alone passes the same rule). Empty when not measured."""
    red = getattr(result, "redundancy", None)
    if not red or kind != result.applied_kind:
        return {}
    m = next((r for r in red.get("per_block") or [] if r["block"] == block), None)
    if m is None:
        return {"reuse_changed": math.nan, "reuse_changed_ci_low": math.nan, "reuse_changed_ci_high": math.nan,
                "reuse_kl": math.nan, "redundant": None, "skip_changed": math.nan, "removable": None}
    return {"reuse_changed": m["changed"], "reuse_changed_ci_low": m["changed_ci_low"],
            "reuse_changed_ci_high": m["changed_ci_high"], "reuse_kl": m["kl"], "redundant": m["redundant"],
            "skip_changed": m.get("skip_changed", math.nan), "removable": m.get("removable")}


def _feature_columns(result: Result) -> dict[int, dict[str, float]]:
    f = result.features
    if f is None:
        return {}
    L = len(f.blocks)
    tu, cka = _arr(f, "token_uniformity", L), neighbor_of(getattr(f, "cka", None), list(f.blocks), 1)
    return {b: {"feature_sim_last": float(f.similarity[i, -1]), "feature_residual": float(f.residual[i]),
                "token_uniformity": float(tu[i]), "cka_prev": float(cka[i])} for i, b in enumerate(f.blocks)}
