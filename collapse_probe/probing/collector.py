"""The probe's per-site sink: ``CollapseCollector`` takes each captured map or block output and feeds the streaming
accumulators, then assembles the ``ProbeResult`` numbers.

    collector = CollapseCollector(sites, threshold=0.9, rank_images=16, prefix_tokens=1)
    with capture(model, kinds, callback=collector):
        model(x); collector.end_batch()
    result = collector.result()
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..hooks.capture import Site
from ..metrics.cka import CkaAccumulator
from ..metrics.columns import ColumnAccumulator
from ..metrics.distance import DistanceAccumulator
from ..metrics.rows import RowAccumulator
from ..metrics.streaming import FeatureAccumulator, FindingsAccumulator, RankAccumulator
from .result import AttentionStats, FeatureStats, ProbeResult

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NOT_DISTRIBUTIONS = "mixed maps are not row-stochastic: no mean distance"


class CollapseCollector:
    """Receives ``(site, tensor)`` from ``capture`` and feeds the accumulators of each kind.

    Args:
        sites: every site that will be captured (from ``capture.find_sites``), so each kind knows its block count.
        threshold: cosine threshold for the similarity ratio.
        rank_images: at most this many images enter the SVD-based ranks (None: all).
        storage_dtype: dtype of the stored per-batch maps for the all-pairs similarities (columns and rows).
        num_heads: heads per block, to create every accumulator up front (needed for all-reducing across ranks that
            may see no image); None: learnt from the first map.
        prefix_tokens: class / distillation / register tokens before the patch tokens (``num_prefix_tokens`` of timm
            ViTs), for the mean attention distance; None: unknown, no distance.

    Each map is checked for NaN/Inf once (by the column accumulator) and the validity shared with the others. An
    image whose map (or block output) holds a non-finite value is excluded from that block's numbers and counted in
    ``findings``.
    """

    def __init__(self, sites: Sequence[Site], threshold: float = 0.9, rank_images: int | None = None,
                 storage_dtype: torch.dtype = torch.float32, num_heads: int | None = None,
                 prefix_tokens: int | None = None) -> None:
        self.threshold, self.storage_dtype, self.prefix_tokens = threshold, storage_dtype, prefix_tokens
        self.all_sites = list(sites)
        self.index = {s.name: i for i, s in enumerate(self.all_sites)}
        self.sites = {k: [s for s in sites if s.kind == k] for k in ("probs", "mixed", "out")}
        self.pos = {s.name: i for ss in self.sites.values() for i, s in enumerate(ss)}
        self.map_kinds = [k for k in ("probs", "mixed") if self.sites[k]]
        self.rows = {k: RowAccumulator(len(self.sites[k]), k == "probs", storage_dtype) for k in self.map_kinds}
        self.ranks = {k: RankAccumulator(len(self.sites[k]), max_images=rank_images) for k in self.map_kinds}
        self.columns: dict[str, ColumnAccumulator] = {}
        self.distance: dict[str, DistanceAccumulator] = {}
        if num_heads is not None:
            for k in self.map_kinds:
                self._per_head(k, num_heads)
        self.features = FeatureAccumulator(len(self.sites["out"])) if self.sites["out"] else None
        self.cka = CkaAccumulator(len(self.sites["out"])) if self.sites["out"] else None
        self.findings = FindingsAccumulator(len(self.all_sites))

    def _per_head(self, kind: str, num_heads: int) -> None:
        """The accumulators whose sums have a head axis."""
        L = len(self.sites[kind])
        self.columns[kind] = ColumnAccumulator(L, num_heads, self.threshold, self.storage_dtype)
        if kind == "probs":
            self.distance[kind] = DistanceAccumulator(L, num_heads, self.prefix_tokens)

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        pos = self.pos[site.name]
        if site.kind == "out":
            valid = self.features.add(pos, t)
            self.cka.add(pos, t, valid)
            if valid is not None:
                self.findings.add(self.index[site.name], t, valid)
            return
        if site.kind not in self.columns:
            self._per_head(site.kind, t.shape[1])
        valid = self.columns[site.kind].add(pos, t)  # the one NaN/Inf check of this map
        if valid is not None:
            self.findings.add(self.index[site.name], t, valid)
        self.rows[site.kind].add(pos, t, valid)
        if site.kind in self.distance:
            self.distance[site.kind].add(pos, t, valid)
        self.ranks[site.kind].add(pos, t, valid)

    def end_batch(self) -> None:
        for acc in (*self.columns.values(), *self.rows.values()):
            acc.end_batch()
        if self.features is not None:
            self.features.end_batch()
            self.cka.end_batch()

    def accumulators(self) -> list:
        """Every accumulator, in a fixed order (for merging across processes)."""
        accs = [*self.columns.values(), *self.rows.values(), *self.distance.values(), *self.ranks.values(),
                self.findings]
        return accs + ([self.features, self.cka] if self.features is not None else [])

    def release(self) -> None:
        """Free the per-batch buffers kept for a next batch."""
        for acc in (*self.columns.values(), *self.rows.values(), *([self.cka] if self.cka is not None else [])):
            acc.release()

    def result(self) -> ProbeResult:
        attention = {kind: self._attention(kind) for kind in self.map_kinds
                     if kind in self.columns and bool((self.columns[kind].count > 0).any())}  # else: no forward
        features = None
        if self.features is not None and bool((self.features.images > 0).any()):
            sites, f = self.sites["out"], self.features
            features = FeatureStats([s.block for s in sites], [s.name for s in sites], f.similarity().numpy(),
                                    f.residual().numpy(), token_uniformity=f.token_uniformity().numpy(),
                                    cka=self.cka.cka().numpy(), per_image=_numpy(f.per_image()))
        findings = [
            {"name": s.name, "kind": s.kind, "block": s.block + 1, "index": s.block, "problem": "non-finite values",
             "nonfinite_values": int(self.findings.nonfinite[i]), "images": int(self.findings.images[i]),
             "action": "images excluded from this block's numbers"}
            for i, s in enumerate(self.all_sites) if self.findings.images[i] > 0
        ]
        return ProbeResult(attention=attention, features=features, findings=findings)

    def _attention(self, kind: str) -> AttentionStats:
        sites, col, row = self.sites[kind], self.columns[kind], self.rows[kind]
        blocks = [s.block for s in sites]
        # "previous block" statistics exist where the previous position is the model's previous block
        no_prev = np.array([pos == 0 or blocks[pos - 1] != b - 1 for pos, b in enumerate(blocks)])
        per_image = _numpy(col.per_image()) | _numpy(row.per_image())
        per_image["pearson_prev"][:, no_prev] = math.nan
        jsd = row.jsd_prev().numpy()
        jsd[no_prev] = math.nan
        dist, dist_heads, note = None, None, NOT_DISTRIBUTIONS
        if kind in self.distance:
            note = self.distance[kind].note
            if note is None:
                dist, dist_heads = self.distance[kind].mean().numpy(), self.distance[kind].heads().numpy()
        return AttentionStats(
            kind=kind, blocks=blocks, names=[s.name for s in sites], threshold=self.threshold,
            similarity=col.similarity().numpy(), ratio=col.ratio().numpy(), head_similarity=col.matrices().numpy(),
            cross_head=col.cross_head().numpy(), effective_rank=self.ranks[kind].effective_rank().numpy(),
            energy_rank=self.ranks[kind].energy_rank().numpy(), entropy=row.entropy().numpy(),
            tv_uniform=row.tv_uniform().numpy(), cosine_floor=col.floor().numpy(), pearson=col.pearson().numpy(),
            row_cosine=row.row_cosine().numpy(), row_jsd_prev=jsd, matched=col.matched().numpy(),
            rank1_residual=col.rank1_residual().numpy(), attention_distance=dist, attention_distance_heads=dist_heads,
            distance_note=note, per_image=per_image)


def _numpy(rows: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in rows.items()}
