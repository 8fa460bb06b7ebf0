"""Results of a probe run: plain numpy data, derived views (neighbour similarity, similar blocks) and JSON round-trip.

Plots and reports take these objects, never models:

    result = ProbeResult.from_json("sim.json")                      # a path, or the JSON text itself
    result.attention["probs"].similar_blocks(threshold=0.9, k=1)   # 1-based block numbers, as every command prints
    result.attention["probs"].similar_indices(threshold=0.9, k=1)  # the same blocks as 0-based module indices
    result.to_pandas()                                              # one row per (kind, block), a checkpoint column

Numbering: whatever is called ``block`` (methods, summary fields, table and CSV columns) is 1-based, block 1 being
module ``blocks.0``, as in the paper; whatever is called ``index`` / ``*_index`` / ``*_indices`` is a 0-based module
index. One exception, kept for the JSON schema: the ``blocks`` field of ``AttentionStats`` / ``FeatureStats`` lists
the 0-based module indices probed (the array positions).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._version import __version__
from ..errors import BadArgumentError, MalformedFileError
from ..loading.info import ImageInfo, ModelInfo
from ..metrics.functional import blocks_above, collapse_onset
from .blocks import Criterion, block_rows, neighbor_of
from .verdict import judge

Reduction = Literal["mean", "ratio"]
REDUCTIONS = ("mean", "ratio")


def _list(a: np.ndarray) -> Any:
    """numpy -> nested lists with NaN as None (valid JSON)."""
    return [_list(x) for x in a] if a.ndim > 1 else [None if math.isnan(v) else float(v) for v in a.tolist()]


def _array(x: Any) -> np.ndarray:
    return np.array(_nan(x), dtype=float)


def _nan(x: Any) -> Any:
    return [_nan(v) for v in x] if isinstance(x, list) else (math.nan if x is None else x)


def finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _rounded(a: np.ndarray, digits: int = 6) -> Any:
    """``_list`` of ``a`` rounded to ``digits`` significant digits (per-image rows: short JSON, enough to bootstrap)."""
    a = np.asarray(a, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(a))))
        r = np.where(np.isfinite(scale) & (a != 0), np.round(a * scale) / scale, a)
    return _list(r)


def _nan_fill(obj: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fields left None (a result saved before they existed, or built by hand) become NaN arrays of their shape."""
    for name, shape in shapes.items():
        if getattr(obj, name) is None:
            setattr(obj, name, np.full(shape, math.nan))


@dataclass
class AttentionStats:
    """Per-block statistics of one kind of map ("probs" or "mixed") over the probed images.

    ``blocks`` are 0-based model block indices (``blocks.{i}``; the schema's one exception to "block is 1-based");
    every array is indexed by position in ``blocks`` (L of them; H heads). ``similar_blocks`` / ``onset`` answer in
    1-based block numbers, ``similar_indices`` / ``onset_index`` in 0-based module indices.
    similarity / ratio: [L, L] mean column cosine and fraction of cosines above ``threshold``.
    head_similarity: [L, H, H]; cross_head: [L] mean over different heads; effective_rank, energy_rank: [L].

    Companion metrics (``metrics.columns``, ``metrics.rows``, ``metrics.distance`` define them; NaN arrays where a
    metric does not apply to the kind, e.g. the distribution measures for "mixed", or was not in a saved result):
    entropy [L] row entropy / log N and tv_uniform [L] total-variation distance from uniform rows ("probs" only);
    cosine_floor [L, L] what uncorrelated columns with the same means and norms score (similarity - cosine_floor is
    the excess); pearson [L, L] centred column similarity; row_cosine [L, L] the same-query row cosine; row_jsd_prev
    [L] Jensen-Shannon divergence (nats) of each block's rows from the previous block's (NaN for the first block and
    where that block is not probed; "probs" only); matched [L, L] mean column cosine after the best one-to-one head
    matching (invariant to permuting heads); rank1_residual [L] |A - 1 abar^T|_F / |A|_F; attention_distance [L] and
    attention_distance_heads [L, H] mean attention distance in patches, or None with the reason in distance_note.
    per_image: {name: [n_images, ...]} float rows for bootstrap intervals: "similarity", "ratio" [n, L, L] and
    "entropy", "tv_uniform", "rank1_residual", "cross_head", "pearson_prev" (centred similarity with the previous
    block) [n, L]; NaN where an image was excluded; np.nanmean over images gives the per-block mean.
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
    entropy: np.ndarray | None = None
    tv_uniform: np.ndarray | None = None
    cosine_floor: np.ndarray | None = None
    pearson: np.ndarray | None = None
    row_cosine: np.ndarray | None = None
    row_jsd_prev: np.ndarray | None = None
    matched: np.ndarray | None = None
    rank1_residual: np.ndarray | None = None
    attention_distance: np.ndarray | None = None
    attention_distance_heads: np.ndarray | None = None
    distance_note: str | None = None
    per_image: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        L = len(self.blocks)
        _nan_fill(self, {k: (L, L) if k in _ATTN_MATRICES else (L,) for k in _ATTN_COMPANIONS})

    def matrix(self, reduction: Reduction = "mean") -> np.ndarray:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        return self.similarity if reduction == "mean" else self.ratio

    def neighbor(self, k: int = 1, reduction: Reduction = "mean") -> np.ndarray:
        """[L]: mean similarity of each block with the k blocks just before it (NaN where those are not probed)."""
        return neighbor_of(self.matrix(reduction), list(self.blocks), k)

    def similar_indices(self, threshold: float = 0.9, k: int = 1, reduction: Reduction = "mean") -> list[int]:
        """0-based module indices of the blocks whose similarity with the previous k blocks exceeds ``threshold``."""
        return blocks_above(self.neighbor(k, reduction), threshold, self.blocks)

    def similar_blocks(self, threshold: float = 0.9, k: int = 1, reduction: Reduction = "mean") -> list[int]:
        """1-based block numbers (as printed by every command) whose similarity with the previous k blocks exceeds
        ``threshold``."""
        return [i + 1 for i in self.similar_indices(threshold, k, reduction)]

    def onset_index(self, threshold: float = 0.9, k: int = 1, reduction: Reduction = "mean") -> int | None:
        """0-based module index from which every later block is similar, or None (``metrics.collapse_onset``)."""
        return collapse_onset(self.neighbor(k, reduction), threshold, self.blocks)

    def onset(self, threshold: float = 0.9, k: int = 1, reduction: Reduction = "mean") -> int | None:
        """1-based block number from which every later block is similar (the paper's "after block 17" reads onset
        18), or None."""
        i = self.onset_index(threshold, k, reduction)
        return None if i is None else i + 1

    def to_dict(self) -> dict[str, Any]:
        dist = {k: None if getattr(self, k) is None else _list(getattr(self, k)) for k in _ATTN_DISTANCE}
        return {
            "kind": self.kind, "blocks": self.blocks, "names": self.names, "threshold": self.threshold,
            **{k: _list(getattr(self, k)) for k in _ATTN_ARRAYS + _ATTN_COMPANIONS}, **dist,
            "distance_note": self.distance_note, "per_image": {k: _rounded(v) for k, v in self.per_image.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionStats:
        saved = "attention_distance" in d
        return cls(kind=d["kind"], blocks=list(d["blocks"]), names=list(d["names"]), threshold=d["threshold"],
                   **{k: _array(d[k]) for k in _ATTN_ARRAYS},
                   **{k: _array(d[k]) if d.get(k) is not None else None for k in _ATTN_COMPANIONS + _ATTN_DISTANCE},
                   distance_note=d.get("distance_note") if saved else "not in this saved result",
                   per_image={k: _array(v) for k, v in (d.get("per_image") or {}).items()})


_ATTN_ARRAYS = ("similarity", "ratio", "head_similarity", "cross_head", "effective_rank", "energy_rank")
_ATTN_COMPANIONS = ("entropy", "tv_uniform", "cosine_floor", "pearson", "row_cosine", "row_jsd_prev", "matched",
                    "rank1_residual")
_ATTN_MATRICES = ("cosine_floor", "pearson", "row_cosine", "matched")
_ATTN_DISTANCE = ("attention_distance", "attention_distance_heads")


@dataclass
class FeatureStats:
    """Block-output statistics: similarity [L, L] (mean token cosine), residual [L] (Dong et al.; 0 = rank one),
    token_uniformity [L] (mean cosine between different tokens of an image), cka [L, L] (linear CKA per image over
    its tokens, averaged over images; ``metrics.cka``), per_image {"residual", "token_uniformity": [n_images, L]}.
    Fields missing from a saved result are NaN arrays."""

    blocks: list[int]
    names: list[str]
    similarity: np.ndarray
    residual: np.ndarray
    token_uniformity: np.ndarray | None = None
    cka: np.ndarray | None = None
    per_image: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        L = len(self.blocks)
        _nan_fill(self, {"token_uniformity": (L,), "cka": (L, L)})

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "names": self.names, "similarity": _list(self.similarity),
                "residual": _list(self.residual), "token_uniformity": _list(self.token_uniformity),
                "cka": _list(self.cka), "per_image": {k: _rounded(v) for k, v in self.per_image.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        opt = {k: _array(d[k]) if d.get(k) is not None else None for k in ("token_uniformity", "cka")}
        return cls(list(d["blocks"]), list(d["names"]), _array(d["similarity"]), _array(d["residual"]), **opt,
                   per_image={k: _array(v) for k, v in (d.get("per_image") or {}).items()})


@dataclass
class ProbeResult:
    """Everything one probe run measured, plus what it ran on (``model``, ``images``) and the settings used.

    ``baseline``: the untrained twin's result on the same images (``probe(..., baseline=True)``), or None.
    ``findings``: problems seen per site, e.g. ``{"name": "blocks.5.attn.probs", "kind": "probs", "block": 6,
    "index": 5, "problem": "non-finite values", "nonfinite_values": 2352, "images": 2, "action": ...}``; those images
    are left out of that block's numbers rather than averaged in. ``redundancy``: each block's measured redundancy
    (``probing.redundancy``; ``cp.probe`` measures it unless ``intervene=False``), or None.
    """

    attention: dict[str, AttentionStats]
    features: FeatureStats | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    images: ImageInfo = field(default_factory=ImageInfo)
    settings: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    baseline: ProbeResult | None = None
    redundancy: dict[str, Any] | None = None

    def __post_init__(self) -> None:  # plain dicts (JSON, hand-built results) become the typed records
        if isinstance(self.model, dict):
            self.model = ModelInfo.from_dict(self.model)
        if isinstance(self.images, dict):
            self.images = ImageInfo.from_dict(self.images)

    @property
    def depth(self) -> int:
        return int(self.model.depth or max(len(s.blocks) for s in self.attention.values()))

    @property
    def applied_kind(self) -> str:
        """The one rule for which maps multiply V: "mixed" when every probed block has Re-attention (its maps after
        Θ, Norm and scale are what V is multiplied with), else "probs" (plain blocks, or Re-attention in only some
        blocks: then the softmax maps are the only kind measured in every block, and "mixed" is reported beside)."""
        mixed, probs = self.attention.get("mixed"), self.attention.get("probs")
        if mixed is not None and (probs is None or list(mixed.blocks) == list(probs.blocks)):
            return "mixed"
        return "probs"

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}: {len(v.blocks)} blocks" for k, v in self.attention.items())
        return (f"ProbeResult({self.model.architecture or 'model'}, depth {self.depth}, {kinds}, "
                f"{self.images.count} images, applied={self.applied_kind})")

    def summary(self, kind: str, threshold: float | None = None, k: int | None = None,
                reduction: Reduction | None = None) -> dict[str, Any]:
        """Similar blocks of one kind (1-based block numbers, as the commands print them; ``similar_indices``: the
        same as 0-based module indices), their count, count / depth and the onset (1-based), with the settings used
        (default: those the result was probed with). The full verdict is ``probing.verdict.judge`` (intervals, the
        twin, the verdict line)."""
        s = self.settings
        threshold = s.get("threshold", 0.9) if threshold is None else threshold
        k = s.get("neighbors", 1) if k is None else k
        reduction = s.get("reduction", "mean") if reduction is None else reduction
        st = self.attention[kind]
        indices = st.similar_indices(threshold, k, reduction)
        return {"similar_blocks": [i + 1 for i in indices], "similar_indices": indices, "count": len(indices),
                "ratio": len(indices) / self.depth,
                "onset": st.onset(threshold, k, reduction), "depth": self.depth, "threshold": threshold,
                "neighbors": k, "reduction": reduction}

    def to_pandas(self, threshold: float | None = None, k: int | None = None,
                  reduction: Reduction | None = None, checkpoint: str | None = None) -> Any:
        """A ``pandas.DataFrame`` with one row per (kind, block): the rows of the CSV and JSON's ``per_block``
        (``probing.blocks.block_rows``; block is 1-based, index 0-based, intervals ``*_ci_low`` / ``*_ci_high``).
        The ``checkpoint`` column (default: the file as given, ``checkpoint`` to name it otherwise) keeps results apart
        after ``pd.concat``. Defaults: the settings probed with.

            df = pd.concat([a.to_pandas(), b.to_pandas()])
            df[df.kind == "probs"].groupby("checkpoint").similar.sum()
        """
        import pandas as pd  # only here: the package itself does not need pandas to load

        df = pd.DataFrame(per_block_rows(self, threshold, k, reduction, checkpoint))
        return df.astype({"block": "int64", "index": "int64", "similar": "bool"})

    to_frame = to_pandas

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        """Everything, as plain JSON types; ``per_image=False`` leaves out the per-image rows (see ``to_json``)."""
        d = self._dict()
        if not per_image:
            _drop_per_image(d)
        return d

    def _dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "tool": {"name": "collapse-probe", "version": __version__},
            "model": self.model.to_dict(), "images": self.images.to_dict(), "settings": s,
            "summary": judge(self) if self.attention else None, "applied_kind": self.applied_kind,
            "attention": {k: v.to_dict() for k, v in self.attention.items()},
            "features": self.features.to_dict() if self.features else None,
            "per_block": per_block_rows(self),  # the rows of the text table and the CSV (NaN -> null in to_json)
            "findings": self.findings,
            "baseline": self.baseline.to_dict() if self.baseline is not None else None,
            "redundancy": self.redundancy,
        }

    def to_json(self, indent: int | None = 1, per_image: bool = True) -> str:
        """Strict JSON: a NaN/Inf anywhere (e.g. a block whose every image was excluded) is written as null.
        ``per_image=False`` leaves out the per-image rows (the summary's intervals are computed first, so they stay;
        a result read back from such a file has no rows to re-bootstrap)."""
        return json.dumps(finite(self.to_dict(per_image)), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        return cls(
            attention={k: AttentionStats.from_dict(v) for k, v in d["attention"].items()},
            features=FeatureStats.from_dict(d["features"]) if d.get("features") else None,
            model=ModelInfo.from_dict(d.get("model")), images=ImageInfo.from_dict(d.get("images")),
            settings=d.get("settings", {}),
            findings=list(d.get("findings") or []),
            baseline=cls.from_dict(d["baseline"]) if d.get("baseline") else None,
            redundancy=d.get("redundancy"),
        )

    @classmethod
    def from_json(cls, source: str | Path) -> ProbeResult:
        """A result from its JSON: a path (``Path`` or a string naming a file, e.g. ``similarity -o sim.json``), or
        the JSON text itself. A file that is not a saved result is one line (``MalformedFileError``, exit 4)."""
        text, where = _json_text(source)
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MalformedFileError(f"{where} is not a collapse-probe result (similarity --format json or an audit's "
                                     f"metrics.json): {type(e).__name__}: {e}") from e


def _json_text(source: str | Path) -> tuple[str, str]:
    """(JSON text, what to call it in an error) of a path or of the text itself."""
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
        path = Path(source)
        try:
            return path.read_text(), str(path)
        except FileNotFoundError as e:
            raise BadArgumentError(f"no such file: {path}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise MalformedFileError(f"cannot read {path}: {e}") from e
    if not isinstance(source, str):
        raise BadArgumentError(f"from_json takes a path or JSON text, got a {type(source).__name__}")
    return source, "the text given"


def _drop_per_image(d: dict[str, Any]) -> None:
    """Remove the per-image rows from a ``ProbeResult.to_dict()`` (and its baseline's), in place."""
    for st in (d.get("attention") or {}).values():
        st.pop("per_image", None)
    if d.get("features"):
        d["features"].pop("per_image", None)
    if d.get("baseline"):
        _drop_per_image(d["baseline"])


def per_block_rows(result: ProbeResult, threshold: float | None = None, k: int | None = None,
                   reduction: str | None = None, checkpoint: str | None = None) -> list[dict[str, Any]]:
    """One dict per (kind, block): ``probing.blocks.block_rows`` with the settings probed with, or these."""
    return block_rows(result, Criterion.of(result, threshold=threshold, neighbors=k, reduction=reduction), checkpoint)
