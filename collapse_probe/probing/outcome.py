"""What an intervention is (``Intervention``), what it did to the outputs (``Outcome``) and a run of them
(``InterventionReport``, JSON round trip), with Wilson score intervals for the proportions.

    iv = from_block("reuse", 16, depth=32)     # blocks 17-31 (0-based) multiply V by block 16's applied map
    iv.describe()                               # "reuse block 17's map in blocks 18-32" (1-based, as people read)
    wilson(3, 360)                              # 95 % interval of 3 changed predictions out of 360

Blocks are 0-based in the objects and 1-based in every text and in the CSV columns ``block``, ``source`` and
``blocks`` (``block_index`` is the 0-based ``at``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..errors import BadArgumentError
from ..loading.info import ImageInfo, ModelInfo
from ..metrics.bootstrap import wilson  # noqa: F401  (re-exported: the one Wilson interval)
from .result import finite
from .verdict import spans

MODES = ("reuse", "skip", "uniform")
Z95 = 1.959963984540054  # the 97.5 % standard normal quantile


def span(blocks: tuple[int, ...] | list[int], one_based: bool = True) -> str:
    """"18-32" / "5, 7" for block indices (0-based in, numbered 1-based by default)."""
    off = 1 if one_based else 0
    return spans([b + off for b in blocks]) if blocks else ""  # the verdict's formatter; "" rather than "none"


@dataclass(frozen=True)
class Intervention:
    """``mode`` ("reuse", "skip", "uniform") on the 0-based ``blocks``; reuse: they multiply V by block ``source``'s
    applied map. ``at`` is the block a row is about: k for "after block k" (the reuse source, the last block left
    intact), the block itself for a single-block intervention."""

    mode: str
    blocks: tuple[int, ...]
    source: int | None = None
    at: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadArgumentError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.blocks:
            raise BadArgumentError(f"{self.mode}: no block to intervene on")
        if (self.mode == "reuse") != (self.source is not None):
            raise BadArgumentError("a reuse intervention needs a source block (and only reuse has one)")

    def spec(self) -> dict[str, Any]:
        """Keyword arguments for ``hooks.intervene.intervene``."""
        if self.mode == "reuse":
            return {"reuse": {b: self.source for b in self.blocks}}
        return {self.mode: list(self.blocks)}

    def describe(self, one_based: bool = True) -> str:
        off, s = (1 if one_based else 0), "s" if len(self.blocks) > 1 else ""
        where = f"block{s} {span(self.blocks, one_based)}"
        if self.mode == "reuse":
            return f"reusing block {self.source + off}'s map in {where}"
        if self.mode == "skip":
            return f"skipping {where} (residual branches removed)"
        return f"uniform attention (1/N) in {where}"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "blocks": list(self.blocks), "source": self.source, "at": self.at}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intervention:
        return cls(d["mode"], tuple(d["blocks"]), d.get("source"), d.get("at", 0))


def from_block(mode: str, k: int, depth: int) -> Intervention:
    """Every block after block k (0-based): reuse -> they use block k's map; skip / uniform -> on those blocks."""
    if not 0 <= k < depth - 1:
        raise BadArgumentError(f"--from-block {k + 1} is out of range: the model has {depth} blocks, so it must be "
                               f"between 1 and {depth - 1} (some block must come after it)")
    return Intervention(mode, tuple(range(k + 1, depth)), k if mode == "reuse" else None, k)


def one_block(mode: str, b: int, depth: int, source: int | None = None) -> Intervention:
    """Block b (0-based) alone; reuse takes block ``source``'s map (default: the block before it)."""
    if not 0 <= b < depth:
        raise BadArgumentError(f"--blocks {b + 1} is out of range: the model has blocks 1-{depth}")
    if mode != "reuse":
        return Intervention(mode, (b,), None, b)
    source = b - 1 if source is None else source
    if not 0 <= source < b:
        raise BadArgumentError(f"block {b + 1} cannot reuse block {source + 1}'s map: the source must be an earlier "
                               "block (block 1 has none)")
    return Intervention(mode, (b,), source, b)


def sweep(mode: str, depth: int) -> list[Intervention]:
    """The paper's experiment: for every k, the intervention on all blocks after k (``from_block``)."""
    return [from_block(mode, k, depth) for k in range(depth - 1)]


@dataclass
class Outcome:
    """Sums over the probe images of what one intervention did; ``agree`` / ``kl_sum`` are None without a classifier.

    Per image: top-1 agreement with the unmodified model, KL(p_orig || p_intervened) of the softmax outputs, cosine
    of the final features (the classifier's input), and top-1 correctness of both where labels exist.
    """

    intervention: Intervention
    images: int = 0
    agree: int | None = 0
    kl_sum: float | None = 0.0
    cos_sum: float = 0.0
    labelled: int = 0
    correct_orig: int = 0
    correct: int = 0

    @property
    def agreement(self) -> float:
        return self.agree / self.images if self.agree is not None and self.images else math.nan

    @property
    def changed(self) -> int | None:
        return None if self.agree is None else self.images - self.agree

    def changed_interval(self) -> tuple[float, float]:
        return wilson(self.changed, self.images) if self.changed is not None else (math.nan, math.nan)

    @property
    def kl(self) -> float:
        return self.kl_sum / self.images if self.kl_sum is not None and self.images else math.nan

    @property
    def cosine(self) -> float:
        return self.cos_sum / self.images if self.images else math.nan

    @property
    def accuracy_orig(self) -> float:
        return self.correct_orig / self.labelled if self.labelled else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"intervention": self.intervention.to_dict(), "images": self.images, "agree": self.agree,
                "kl_sum": self.kl_sum, "cos_sum": self.cos_sum, "labelled": self.labelled,
                "correct_orig": self.correct_orig, "correct": self.correct}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        kl = d["kl_sum"] if d["kl_sum"] is not None or d["agree"] is None else math.nan  # null: NaN or no classifier
        return cls(Intervention.from_dict(d["intervention"]), d["images"], d["agree"], kl,
                   d["cos_sum"] if d["cos_sum"] is not None else math.nan, d["labelled"], d["correct_orig"],
                   d["correct"])


COLUMNS = ("mode", "block", "block_index", "source", "blocks", "images", "agreement", "changed", "changed_lo",
           "changed_hi", "kl", "cosine", "labelled", "accuracy_orig", "accuracy_orig_lo", "accuracy_orig_hi",
           "accuracy", "accuracy_lo", "accuracy_hi", "accuracy_change", "sim_prev")


@dataclass
class InterventionReport:
    """Interventions measured on one model and one image set.

    ``applied``: per block, the kind of map an intervention replaces ("probs" softmax, "mixed" after head mixing),
    None where it cannot be. ``similarity``: {"kind", "blocks", "neighbor"}: the applied maps' mean column cosine
    of each block with the previous one (``ProbeResult.attention[applied_kind].neighbor()``), when probed.
    ``refused``: one line per intervention that the family does not allow (``check_flagged`` skips those).
    """

    outcomes: list[Outcome]
    model: ModelInfo = field(default_factory=ModelInfo)
    images: ImageInfo = field(default_factory=ImageInfo)
    depth: int = 0
    applied: list[str | None] = field(default_factory=list)
    similarity: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    def neighbor(self, block: int) -> float:
        """Similarity of block ``block`` (0-based) with the block before it; NaN where not probed."""
        sim = self.similarity or {}
        blocks, values = list(sim.get("blocks", [])), list(sim.get("neighbor", []))
        v = values[blocks.index(block)] if block in blocks else None
        return math.nan if v is None else float(v)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per intervention with ``COLUMNS`` (1-based block numbers; NaN where a number does not exist)."""
        out = []
        for o in self.outcomes:
            iv = o.intervention
            lo, hi = o.changed_interval()
            (alo, ahi), (blo, bhi) = wilson(o.correct_orig, o.labelled), wilson(o.correct, o.labelled)
            out.append({"mode": iv.mode, "block": iv.at + 1, "block_index": iv.at,
                        "source": "" if iv.source is None else iv.source + 1, "blocks": span(iv.blocks),
                        "images": o.images, "agreement": o.agreement,
                        "changed": math.nan if o.changed is None else o.changed / max(o.images, 1),
                        "changed_lo": lo, "changed_hi": hi, "kl": o.kl, "cosine": o.cosine, "labelled": o.labelled,
                        "accuracy_orig": o.accuracy_orig, "accuracy_orig_lo": alo, "accuracy_orig_hi": ahi,
                        "accuracy": o.accuracy, "accuracy_lo": blo, "accuracy_hi": bhi,
                        "accuracy_change": o.accuracy - o.accuracy_orig, "sim_prev": self.neighbor(iv.at)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"tool": {"name": "collapse-probe", "version": __version__}, "model": self.model.to_dict(),
                "images": self.images.to_dict(), "depth": self.depth, "applied": self.applied,
                "similarity": self.similarity, "settings": self.settings, "refused": self.refused,
                "outcomes": [o.to_dict() for o in self.outcomes], "rows": self.rows()}

    def to_json(self, indent: int | None = 1) -> str:
        """Strict JSON (NaN written as null)."""
        return json.dumps(finite(self.to_dict()), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InterventionReport:
        return cls([Outcome.from_dict(o) for o in d["outcomes"]], ModelInfo.from_dict(d.get("model")),
                   ImageInfo.from_dict(d.get("images")), d.get("depth", 0), list(d.get("applied") or []),
                   d.get("similarity"), dict(d.get("settings") or {}), list(d.get("refused") or []))

    @classmethod
    def from_json(cls, text: str) -> InterventionReport:
        return cls.from_dict(json.loads(text))
