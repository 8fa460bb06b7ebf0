"""The probe's per-site sink: ``CollapseCollector`` takes each captured map or block output and feeds the streaming
accumulators, then assembles the ``ProbeResult`` numbers.

    collector = CollapseCollector(sites, threshold=0.9, rank_images=16)
    with capture(model, kinds, callback=collector):
        model(x); collector.end_batch()
    result = collector.result()
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..hooks.capture import Site
from ..metrics.streaming import (
    CrossHeadAccumulator,
    CrossLayerAccumulator,
    FeatureAccumulator,
    FindingsAccumulator,
    RankAccumulator,
    unit_columns,
)
from .result import AttentionStats, FeatureStats, ProbeResult

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CollapseCollector:
    """Receives ``(site, tensor)`` from ``capture`` and feeds the accumulators of each kind.

    Args:
        sites: every site that will be captured (from ``capture.find_sites``), so each kind knows its block count.
        threshold: cosine threshold for the similarity ratio.
        rank_images: at most this many images enter the SVD-based ranks (None: all).
        storage_dtype: dtype of the stored per-batch maps for the all-pairs similarity.
        num_heads: heads per block, to create every accumulator up front (needed for all-reducing across ranks that
            may see no image); None: learnt from the first map.

    Each map's unit columns are computed once and shared by the cross-layer and cross-head accumulators. An image
    whose map (or block output) holds a non-finite value is excluded from that block's numbers and counted in
    ``findings``.
    """

    def __init__(self, sites: Sequence[Site], threshold: float = 0.9, rank_images: int | None = None,
                 storage_dtype: torch.dtype = torch.float32, num_heads: int | None = None) -> None:
        self.threshold = threshold
        self.all_sites = list(sites)
        self.index = {s.name: i for i, s in enumerate(self.all_sites)}
        self.sites = {k: [s for s in sites if s.kind == k] for k in ("probs", "mixed", "out")}
        self.pos = {s.name: i for ss in self.sites.values() for i, s in enumerate(ss)}
        self.cross = {k: CrossLayerAccumulator(len(ss), threshold, storage_dtype)
                      for k, ss in self.sites.items() if ss and k != "out"}
        self.ranks = {k: RankAccumulator(len(self.sites[k]), max_images=rank_images) for k in self.cross}
        self.heads: dict[str, CrossHeadAccumulator] = {}
        if num_heads is not None:
            self.heads = {k: CrossHeadAccumulator(len(self.sites[k]), num_heads) for k in self.cross}
        self.features = FeatureAccumulator(len(self.sites["out"])) if self.sites["out"] else None
        self.findings = FindingsAccumulator(len(self.all_sites))

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        pos = self.pos[site.name]
        if site.kind == "out":
            valid = self.features.add(pos, t)
            if valid is not None:
                self.findings.add(self.index[site.name], t, valid)
            return
        if site.kind not in self.heads:
            self.heads[site.kind] = CrossHeadAccumulator(len(self.sites[site.kind]), t.shape[1])
        cols, valid = unit_columns(t)
        if valid is not None:
            self.findings.add(self.index[site.name], t, valid)
        self.cross[site.kind].add(pos, t, cols, valid)
        self.heads[site.kind].add(pos, t, cols, valid)
        self.ranks[site.kind].add(pos, t, valid)

    def end_batch(self) -> None:
        for acc in self.cross.values():
            acc.end_batch()
        if self.features is not None:
            self.features.end_batch()

    def accumulators(self) -> list:
        """Every accumulator, in a fixed order (for merging across processes)."""
        accs = [*self.cross.values(), *self.heads.values(), *self.ranks.values(), self.findings]
        return accs + ([self.features] if self.features is not None else [])

    def result(self) -> ProbeResult:
        attention = {}
        for kind, acc in self.cross.items():
            if kind not in self.heads or not (self.heads[kind].count > 0).any():
                continue  # no forward reached these sites
            sites = self.sites[kind]
            attention[kind] = AttentionStats(
                kind=kind, blocks=[s.block for s in sites], names=[s.name for s in sites], threshold=self.threshold,
                similarity=acc.similarity().numpy(), ratio=acc.ratio().numpy(),
                head_similarity=self.heads[kind].matrices().numpy(), cross_head=self.heads[kind].mean().numpy(),
                effective_rank=self.ranks[kind].effective_rank().numpy(),
                energy_rank=self.ranks[kind].energy_rank().numpy(),
            )
        features = None
        if self.features is not None and bool((self.features.images > 0).any()):
            sites = self.sites["out"]
            features = FeatureStats([s.block for s in sites], [s.name for s in sites],
                                    self.features.similarity().numpy(), self.features.residual().numpy())
        findings = [
            {"name": s.name, "kind": s.kind, "block": s.block, "problem": "non-finite values",
             "nonfinite_values": int(self.findings.nonfinite[i]), "images": int(self.findings.images[i]),
             "action": "images excluded from this block's numbers"}
            for i, s in enumerate(self.all_sites) if self.findings.images[i] > 0
        ]
        return ProbeResult(attention=attention, features=features, findings=findings)
