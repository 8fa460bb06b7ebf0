"""Run a model over images and measure collapse, streaming: maps are folded into accumulators block by block.

    from collapse_probe.probe import probe
    result = probe(model, loader, threshold=0.9)        # -> ProbeResult
    result.attention["probs"].similar_blocks(0.9)

Memory per batch: the unit-column maps of every block of that batch (for the all-pairs similarity) and nothing from
earlier batches; the image count does not matter.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import Site, capture, find_sites
from .checkpoints import build_model, read_checkpoint
from .errors import BadArgumentError
from .images import image_loader
from .metrics.streaming import CrossHeadAccumulator, CrossLayerAccumulator, FeatureAccumulator, RankAccumulator
from .results import AttentionStats, FeatureStats, ProbeResult


class CollapseCollector:
    """Receives ``(site, tensor)`` from ``capture`` and feeds the accumulators of each kind.

    Args:
        sites: every site that will be captured (from ``capture.find_sites``), so each kind knows its block count.
        threshold: cosine threshold for the similarity ratio.
        rank_images: at most this many images enter the SVD-based ranks (None: all).
        storage_dtype: dtype of the stored per-batch maps for the all-pairs similarity.
    """

    def __init__(self, sites: Sequence[Site], threshold: float = 0.9, rank_images: int | None = None,
                 storage_dtype: torch.dtype = torch.float32) -> None:
        self.threshold = threshold
        self.sites = {k: [s for s in sites if s.kind == k] for k in ("probs", "mixed", "out")}
        self.pos = {s.name: i for ss in self.sites.values() for i, s in enumerate(ss)}
        self.cross = {k: CrossLayerAccumulator(len(ss), threshold, storage_dtype)
                      for k, ss in self.sites.items() if ss and k != "out"}
        self.ranks = {k: RankAccumulator(len(self.sites[k]), max_images=rank_images) for k in self.cross}
        self.heads: dict[str, CrossHeadAccumulator] = {}
        self.features = FeatureAccumulator(len(self.sites["out"])) if self.sites["out"] else None

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        pos = self.pos[site.name]
        if site.kind == "out":
            self.features.add(pos, t)
            return
        if site.kind not in self.heads:
            self.heads[site.kind] = CrossHeadAccumulator(len(self.sites[site.kind]), t.shape[1])
        self.cross[site.kind].add(pos, t)
        self.heads[site.kind].add(pos, t)
        self.ranks[site.kind].add(pos, t)

    def end_batch(self) -> None:
        for acc in self.cross.values():
            acc.end_batch()
        if self.features is not None:
            self.features.end_batch()

    def accumulators(self) -> list:
        """Every accumulator, in a fixed order (for merging across processes)."""
        accs = [*self.cross.values(), *self.heads.values(), *self.ranks.values()]
        return accs + ([self.features] if self.features is not None else [])

    def result(self) -> ProbeResult:
        attention = {}
        for kind, acc in self.cross.items():
            if kind not in self.heads:
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
        if self.features is not None:
            sites = self.sites["out"]
            features = FeatureStats([s.block for s in sites], [s.name for s in sites],
                                    self.features.similarity().numpy(), self.features.residual().numpy())
        return ProbeResult(attention=attention, features=features)


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.inference_mode()
def probe(
    model: nn.Module,
    loader: Iterable,
    threshold: float = 0.9,
    kinds: Sequence[str] = ("probs", "mixed", "out"),
    device: str | torch.device | None = None,
    rank_images: int | None = None,
    storage_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ProbeResult:
    """Measure collapse of ``model`` over ``loader`` (batches of images [B, 3, H, W], or (images, labels)).

    The model is switched to eval mode (dropout and BatchNorm statistics frozen) and restored afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    hooks, _ = find_sites(model, kinds)
    collector = CollapseCollector([h.site for h in hooks], threshold, rank_images, storage_dtype)
    was_training = model.training
    model.eval()
    try:
        with capture(model, kinds, callback=collector):
            total = len(loader) if hasattr(loader, "__len__") else None
            for batch in tqdm(loader, total=total, desc="probing", unit="batch", disable=not progress, leave=False):
                model(_images(batch).to(device))
                collector.end_batch()
    finally:
        model.train(was_training)
    result = collector.result()
    result.settings = {"threshold": threshold, "rank_images": rank_images, "storage_dtype": str(storage_dtype)}
    return result


def resolve_device(device: str | None = "auto") -> torch.device:
    """"auto" picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadArgumentError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadArgumentError(f"device '{device}' requested but CUDA is not available; use --device cpu")
    return dev


def probe_checkpoint(
    checkpoint: str | Path,
    model_name: str | None = None,
    images: str | Path | None = None,
    num_images: int | None = None,
    batch_size: int = 16,
    threshold: float = 0.9,
    reduction: str = "mean",
    neighbors: int = 1,
    device: str | None = "auto",
    trust_pickle: bool = False,
    key: str | None = None,
    rank_images: int | None = None,
    workers: int = 0,
    progress: bool = True,
    num_heads: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> ProbeResult:
    """Load ``checkpoint`` safely, run images through it and return every collapse metric (``similarity`` command).

    ``num_heads``, ``mean`` and ``std`` are passed to ``checkpoints.build_model`` (heads rule, normalisation).
    """
    if not 0.0 <= threshold <= 1.0:
        raise BadArgumentError(f"--threshold must be between 0 and 1, got {threshold}")
    if neighbors < 1:
        raise BadArgumentError(f"--neighbors must be at least 1, got {neighbors}")
    dev = resolve_device(device)
    model, info = build_model(read_checkpoint(checkpoint, trust_pickle=trust_pickle, key=key), model_name,
                              num_heads=num_heads, mean=mean, std=std)
    loader, image_info = image_loader(model, images, num_images, batch_size, workers)
    result = probe(model.to(dev), loader, threshold=threshold, device=dev, rank_images=rank_images,
                   progress=progress)
    result.model, result.images = info, image_info
    result.settings.update(reduction=reduction, neighbors=neighbors, batch_size=batch_size, device=str(dev))
    return result
