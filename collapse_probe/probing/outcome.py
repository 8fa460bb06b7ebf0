"""What an intervention is (``Intervention``), what it did to the outputs (``Outcome``) and a run of them
(``InterventionReport``, JSON round trip), with Wilson score intervals for the proportions.

    iv = from_block("reuse", 17, depth=32)     # = --mode reuse --from-block 17: blocks 18-32 use block 17's map
    iv.describe()                               # "reusing block 17's map in blocks 18-32"
    one_block("skip", 30, depth=32)             # = intervene --mode skip --blocks 30
    wilson(3, 360)                              # 95 % interval of 3 changed predictions out of 360

Blocks are numbered from 1 everywhere here, as on the command line (``--from-block 17`` is ``from_block(..., 17,
...)``): the fields ``blocks``, ``source`` and ``block`` of an ``Intervention``, ``report.similarity["blocks"]``,
``report.neighbor(block)`` and the CSV columns; ``block_index`` is the 0-based module index. ``Intervention.spec()``
turns them into the module indices ``hooks.intervene`` takes. JSON written before this numbering (0-based, an
intervention's ``at`` field) is read back and renumbered.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BadArgumentError
from ..loading.info import ImageInfo, ModelInfo
from ..metrics.bootstrap import wilson  # noqa: F401  (re-exported: the one Wilson interval)
from .result import _json_text, finite
from .verdict import spans

MODES = ("reuse", "skip", "uniform")
Z95 = 1.959963984540054  # the 97.5 % standard normal quantile
NUMBERING = "1-based"  # what ``InterventionReport.to_dict`` writes; its absence marks an older, 0-based file


def span(blocks: tuple[int, ...] | list[int]) -> str:
    """"18-32" / "5, 7" for 1-based block numbers."""
    return spans(list(blocks)) if blocks else ""  # the verdict's formatter; "" rather than "none"


@dataclass(frozen=True)
class Intervention:
    """``mode`` ("reuse", "skip", "uniform") on ``blocks`` (1-based); reuse: they multiply V by block ``source``'s
    applied map. ``block`` is the block a row is about: k for "after block k" (the reuse source, the last block left
    intact), the block itself for a single-block intervention."""

    mode: str
    blocks: tuple[int, ...]
    source: int | None = None
    block: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadArgumentError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.blocks:
            raise BadArgumentError(f"{self.mode}: no block to intervene on")
        if (self.mode == "reuse") != (self.source is not None):
            raise BadArgumentError("a reuse intervention needs a source block (and only reuse has one)")
        if min(self.blocks) < 1 or (self.source is not None and self.source < 1) or self.block < 1:
            raise BadArgumentError(f"block numbers start at 1, got blocks {list(self.blocks)}, source {self.source}")

    def spec(self) -> dict[str, Any]:
        """Keyword arguments for ``hooks.intervene.intervene`` (0-based module indices)."""
        if self.mode == "reuse":
            return {"reuse": {b - 1: self.source - 1 for b in self.blocks}}
        return {self.mode: [b - 1 for b in self.blocks]}

    def describe(self) -> str:
        s = "s" if len(self.blocks) > 1 else ""
        where = f"block{s} {span(self.blocks)}"
        if self.mode == "reuse":
            return f"reusing block {self.source}'s map in {where}"
        if self.mode == "skip":
            return f"skipping {where} (residual branches removed)"
        return f"uniform attention (1/N) in {where}"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "blocks": list(self.blocks), "source": self.source, "block": self.block}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intervention:
        if "block" not in d:  # written before 1-based numbering: 0-based blocks / source and "at"
            src = d.get("source")
            return cls(d["mode"], tuple(b + 1 for b in d["blocks"]), None if src is None else src + 1,
                       d.get("at", 0) + 1)
        return cls(d["mode"], tuple(d["blocks"]), d.get("source"), d["block"])


def from_block(mode: str, k: int, depth: int) -> Intervention:
    """Every block after block k (1-based, as ``--from-block K``): reuse -> they use block k's map; skip / uniform ->
    on those blocks."""
    if not 1 <= k < depth:
        raise BadArgumentError(f"--from-block {k} is out of range: the model has {depth} blocks, so it must be "
                               f"between 1 and {depth - 1} (some block must come after it)")
    return Intervention(mode, tuple(range(k + 1, depth + 1)), k if mode == "reuse" else None, k)


def one_block(mode: str, b: int, depth: int, source: int | None = None) -> Intervention:
    """Block b (1-based, as ``--blocks B``) alone; reuse takes block ``source``'s map (default: the block before)."""
    if not 1 <= b <= depth:
        raise BadArgumentError(f"--blocks {b} is out of range: the model has blocks 1-{depth}")
    if mode != "reuse":
        return Intervention(mode, (b,), None, b)
    source = b - 1 if source is None else source
    if not 1 <= source < b:
        raise BadArgumentError(f"block {b} cannot reuse block {source}'s map: the source must be an earlier block "
                               "(block 1 has none)")
    return Intervention(mode, (b,), source, b)


def sweep(mode: str, depth: int) -> list[Intervention]:
    """The paper's experiment: for every k = 1 ... depth - 1, the intervention on all blocks after k
    (``from_block``)."""
    return [from_block(mode, k, depth) for k in range(1, depth)]


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


COLUMNS = ("checkpoint", "mode", "block", "block_index", "source", "blocks", "images", "agreement", "changed",
           "changed_ci_low", "changed_ci_high", "kl", "cosine", "labelled", "accuracy_orig", "accuracy_orig_ci_low",
           "accuracy_orig_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_change", "sim_prev")


@dataclass
class InterventionReport:
    """Interventions measured on one model and one image set.

    ``applied``: per block (position 0 = block 1), the kind of map an intervention replaces ("probs" softmax, "mixed"
    after head mixing), None where it cannot be. ``similarity``: {"kind", "blocks" (1-based), "neighbor"}: the applied
    maps' mean column cosine of each block with the previous one (``ProbeResult.attention[applied_kind].neighbor()``),
    when probed.
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
        """Similarity of block ``block`` (1-based) with the block before it; NaN where not probed."""
        sim = self.similarity or {}
        blocks, values = list(sim.get("blocks", [])), list(sim.get("neighbor", []))
        v = values[blocks.index(block)] if block in blocks else None
        return math.nan if v is None else float(v)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per intervention with ``COLUMNS`` (1-based block numbers; NaN where a number does not exist)."""
        out = []
        label = str(self.model.checkpoint) if self.model.checkpoint else "in-memory model"
        for o in self.outcomes:
            iv = o.intervention
            lo, hi = o.changed_interval()
            (alo, ahi), (blo, bhi) = wilson(o.correct_orig, o.labelled), wilson(o.correct, o.labelled)
            out.append({"checkpoint": label, "mode": iv.mode, "block": iv.block, "block_index": iv.block - 1,
                        "source": "" if iv.source is None else iv.source, "blocks": span(iv.blocks),
                        "images": o.images, "agreement": o.agreement,
                        "changed": math.nan if o.changed is None else o.changed / max(o.images, 1),
                        "changed_ci_low": lo, "changed_ci_high": hi, "kl": o.kl, "cosine": o.cosine,
                        "labelled": o.labelled, "accuracy_orig": o.accuracy_orig, "accuracy_orig_ci_low": alo,
                        "accuracy_orig_ci_high": ahi, "accuracy": o.accuracy, "accuracy_ci_low": blo,
                        "accuracy_ci_high": bhi, "accuracy_change": o.accuracy - o.accuracy_orig,
                        "sim_prev": self.neighbor(iv.block)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"tool": {"name": "collapse-probe", "version": __version__}, "numbering": NUMBERING,
                "model": self.model.to_dict(),
                "images": self.images.to_dict(), "depth": self.depth, "applied": self.applied,
                "similarity": self.similarity, "settings": self.settings, "refused": self.refused,
                "outcomes": [o.to_dict() for o in self.outcomes], "rows": self.rows()}

    def to_json(self, indent: int | None = 1) -> str:
        """Strict JSON (NaN written as null)."""
        return json.dumps(finite(self.to_dict()), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InterventionReport:
        sim = d.get("similarity")
        if sim and d.get("numbering") != NUMBERING:  # an older file: 0-based module indices
            sim = {**sim, "blocks": [b + 1 for b in sim.get("blocks", [])]}
        return cls([Outcome.from_dict(o) for o in d["outcomes"]], ModelInfo.from_dict(d.get("model")),
                   ImageInfo.from_dict(d.get("images")), d.get("depth", 0), list(d.get("applied") or []),
                   sim, dict(d.get("settings") or {}), list(d.get("refused") or []))

    @classmethod
    def from_json(cls, source: str | Path) -> InterventionReport:
        """From intervention.json: a path, or the JSON text itself."""
        return cls.from_dict(json.loads(_json_text(source)[0]))
