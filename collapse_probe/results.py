"""Results of a probe run: plain numpy data, derived views (neighbour similarity, similar blocks) and JSON round-trip.

Plots and reports take these objects, never models:

    result = ProbeResult.from_json(path.read_text())
    result.attention["probs"].similar_blocks(threshold=0.9, k=1)   # 0-based block indices
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Reduction = Literal["mean", "ratio"]
REDUCTIONS = ("mean", "ratio")


def _list(a: np.ndarray) -> Any:
    """numpy -> nested lists with NaN as None (valid JSON)."""
    return [_list(x) for x in a] if a.ndim > 1 else [None if math.isnan(v) else float(v) for v in a.tolist()]


def _array(x: Any) -> np.ndarray:
    return np.array(_nan(x), dtype=float)


def _nan(x: Any) -> Any:
    return [_nan(v) for v in x] if isinstance(x, list) else (math.nan if x is None else x)


@dataclass
class AttentionStats:
    """Per-block statistics of one kind of map ("probs" or "mixed") over the probed images.

    ``blocks`` are 0-based model block indices (``blocks.{i}``); every array is indexed by position in ``blocks``.
    similarity / ratio: [L, L] mean column cosine and fraction of cosines above ``threshold``.
    head_similarity: [L, H, H]; cross_head: [L] mean over different heads; effective_rank, energy_rank: [L].
    """

    kind: str
    blocks: list[int]
    names: list[str]
    threshold: float
    similarity: np.ndarray
    ratio: np.ndarray
    head_similarity: np.ndarray
    cross_head: np.ndarray
    effective_rank: np.ndarray
    energy_rank: np.ndarray

    def matrix(self, reduction: Reduction = "mean") -> np.ndarray:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        return self.similarity if reduction == "mean" else self.ratio

    def neighbor(self, k: int = 1, reduction: Reduction = "mean") -> np.ndarray:
        """[L]: mean similarity of each block with the k blocks just before it (NaN where those are not probed)."""
        m, out = self.matrix(reduction), np.full(len(self.blocks), math.nan)
        for pos, b in enumerate(self.blocks):
            prev = [self.blocks.index(b - j) for j in range(1, k + 1) if (b - j) in self.blocks]
            if len(prev) == k:
                out[pos] = float(np.mean([m[pos, p] for p in prev]))
        return out

    def similar_blocks(self, threshold: float = 0.9, k: int = 1, reduction: Reduction = "mean") -> list[int]:
        """Model block indices whose similarity with the previous k blocks exceeds ``threshold``."""
        nb = self.neighbor(k, reduction)
        return [b for b, v in zip(self.blocks, nb) if not math.isnan(v) and v > threshold]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "blocks": self.blocks, "names": self.names, "threshold": self.threshold,
            **{k: _list(getattr(self, k)) for k in _ATTN_ARRAYS},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionStats:
        return cls(kind=d["kind"], blocks=list(d["blocks"]), names=list(d["names"]), threshold=d["threshold"],
                   **{k: _array(d[k]) for k in _ATTN_ARRAYS})


_ATTN_ARRAYS = ("similarity", "ratio", "head_similarity", "cross_head", "effective_rank", "energy_rank")


@dataclass
class FeatureStats:
    """Block-output statistics: similarity [L, L] (mean token cosine), residual [L] (Dong et al.; 0 = rank one)."""

    blocks: list[int]
    names: list[str]
    similarity: np.ndarray
    residual: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "names": self.names, "similarity": _list(self.similarity),
                "residual": _list(self.residual)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        return cls(list(d["blocks"]), list(d["names"]), _array(d["similarity"]), _array(d["residual"]))


@dataclass
class ProbeResult:
    """Everything one probe run measured, plus what it ran on (``model``, ``images``) and the settings used.

    ``findings``: problems seen per site, e.g. ``{"name": "blocks.5.attn.probs", "kind": "probs", "block": 5,
    "problem": "non-finite values", "nonfinite_values": 2352, "images": 2, "action": ...}``; those images are left out
    of that block's numbers rather than averaged in.
    """

    attention: dict[str, AttentionStats]
    features: FeatureStats | None = None
    model: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return int(self.model.get("depth") or max(len(s.blocks) for s in self.attention.values()))

    def summary(self, kind: str, threshold: float, k: int = 1, reduction: Reduction = "mean") -> dict[str, Any]:
        """Similar blocks of one kind, their count and the ratio count / depth."""
        blocks = self.attention[kind].similar_blocks(threshold, k, reduction)
        return {"similar_blocks": blocks, "count": len(blocks), "ratio": len(blocks) / self.depth}

    def to_dict(self) -> dict[str, Any]:
        from . import __version__
        s = self.settings
        return {
            "tool": {"name": "collapse-probe", "version": __version__},
            "model": self.model, "images": self.images, "settings": s,
            "summary": {k: self.summary(k, s.get("threshold", 0.9), s.get("neighbors", 1), s.get("reduction", "mean"))
                        for k in self.attention},
            "attention": {k: v.to_dict() for k, v in self.attention.items()},
            "features": self.features.to_dict() if self.features else None,
            "findings": self.findings,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        return cls(
            attention={k: AttentionStats.from_dict(v) for k, v in d["attention"].items()},
            features=FeatureStats.from_dict(d["features"]) if d.get("features") else None,
            model=d.get("model", {}), images=d.get("images", {}), settings=d.get("settings", {}),
            findings=list(d.get("findings") or []),
        )

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        return cls.from_dict(json.loads(text))
