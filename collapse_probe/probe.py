"""Run a model over images and measure collapse, streaming: maps are folded into accumulators block by block.

    from collapse_probe.probe import probe
    result = probe(model, loader, threshold=0.9)        # -> ProbeResult
    result.attention["probs"].similar_blocks(0.9)
    result = probe(model, loader, max_memory="2GiB", storage_dtype=torch.float16)   # split batches to fit

Memory per batch: the unit-column maps of every block of that batch (for the all-pairs similarity) and nothing from
earlier batches; the image count does not matter. ``estimate_bytes_per_image`` gives the per-image cost that
``max_memory`` divides by (see its docstring and benchmarks/README.md for how it compares with measured RSS).
Maps or features holding NaN/Inf are excluded image by image and reported in ``ProbeResult.findings``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .capture import Site, attention_modules, capture, find_sites
from .checkpoints import build_model, read_checkpoint
from .errors import BadArgumentError
from .images import image_loader
from .metrics.streaming import (
    CrossHeadAccumulator,
    CrossLayerAccumulator,
    FeatureAccumulator,
    FindingsAccumulator,
    RankAccumulator,
    unit_columns,
)
from .results import AttentionStats, FeatureStats, ProbeResult

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
        self.seen: set[str] = set()

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        pos = self.pos[site.name]
        self.seen.add(site.kind)
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


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """"2GiB", "500MB", "1.5g", 10**9 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BadArgumentError(f"cannot read memory size {text!r}; write e.g. 2GiB, 500MB or 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def estimate_bytes_per_image(shapes: dict[str, tuple[int, ...]], storage_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one image adds to a probe batch, from the per-site shapes of a 1-image forward ({name: shape}).

    Held for the whole batch: every captured map's unit columns (H*N*N * storage bytes per block and kind) and every
    block output's unit tokens (N*C * 4). Transient, one block at a time: the unfused attention of the forward
    (logits, softmax, and for re-attention the mixed, normalised and scaled maps) plus our float32 unit columns,
    counted as 8 float32 maps, and the MLP / residual activations, counted as 12 float32 N x C tensors.
    """
    storage = torch.empty(0, dtype=storage_dtype).element_size()
    maps = [s for s in shapes.values() if len(s) == 4]
    feats = [s for s in shapes.values() if len(s) == 3]
    held = sum(h * n * n2 * storage for _, h, n, n2 in maps) + sum(n * c * 4 for _, n, c in feats)
    big_map = max((h * n * n2 for _, h, n, n2 in maps), default=0)
    big_feat = max((n * c for _, n, c in feats), default=0)
    return held + 8 * big_map * 4 + 12 * big_feat * 4


def fit_batch(model: nn.Module, image: torch.Tensor, kinds: Sequence[str], max_memory: int | str,
              storage_dtype: torch.dtype = torch.float32) -> int:
    """Largest batch whose estimated probe memory (parameters + batch) fits ``max_memory`` (one 1-image forward)."""
    budget = parse_bytes(max_memory)
    shapes: dict[str, tuple[int, ...]] = {}
    with capture(model, kinds, callback=lambda site, t: shapes.__setitem__(site.name, tuple(t.shape)), store=False):
        model(image[:1])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_image = estimate_bytes_per_image(shapes, storage_dtype)
    # end-of-batch Gram: float32 chunks of the stored maps, their Gram and comparison, at most 3 x chunk_bytes, and
    # never more than 3 x the batch's maps in float32 (small models)
    chunk = CrossLayerAccumulator(1).chunk_bytes
    maps32 = sum(h * n * n2 * 4 for s in shapes.values() if len(s) == 4 for h, n, n2 in [s[1:]])
    batch = max((budget - params - 3 * chunk) // per_image, (budget - params) // (per_image + 3 * maps32))
    if batch < 1:
        need = params + min(3 * chunk, 3 * maps32) + per_image
        raise BadArgumentError(
            f"--max-memory {max_memory} is too small: the model needs ~{params / 2**20:.0f} MiB and each image "
            f"~{per_image / 2**20:.0f} MiB; allow at least {need / 2**20:.0f} MiB or use --storage float16")
    return int(batch)


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
    max_memory: int | str | None = None,
    all_reduce: bool = False,
    observers: Sequence[Callable[[Site, torch.Tensor], None]] = (),
) -> ProbeResult:
    """Measure collapse of ``model`` over ``loader`` (batches of images [B, 3, H, W], or (images, labels)).

    The model is switched to eval mode (dropout and BatchNorm statistics frozen) and restored afterwards.
    ``max_memory`` (bytes or "2GiB"): split each loader batch into chunks that fit (``fit_batch``).
    ``all_reduce``: every rank of an initialised process group probes its shard of the images and the sums are
    all-reduced at the end (every rank must call); ``rank_images`` stays a global cap (each rank takes its share of the
    first ``rank_images`` images). Off by default, so one rank can probe alone (e.g. the trainer's collapse tracking).
    ``observers``: extra ``fn(site, tensor)`` callbacks that see every captured tensor in the same forward passes
    (e.g. the figures' mean attention maps).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    hooks, _ = find_sites(model, kinds)
    attns = attention_modules(model)
    num_heads = getattr(attns[0][1], "num_heads", None) if attns else None
    rank_cap = rank_images
    all_reduce = all_reduce and distributed.active()
    if rank_images is not None and all_reduce:
        dist = torch.distributed
        rank_cap = distributed.shard_count(rank_images, dist.get_rank(), dist.get_world_size())
    collector = CollapseCollector([h.site for h in hooks], threshold, rank_cap, storage_dtype, num_heads)
    callback = collector
    if observers:
        def callback(site: Site, t: torch.Tensor) -> None:
            collector(site, t)
            for fn in observers:
                fn(site, t)
    was_training = model.training
    model.eval()
    max_batch = None
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in tqdm(loader, total=total, desc="probing", unit="batch", disable=not progress, leave=False):
            x = _images(batch).to(device)
            if max_memory is not None and max_batch is None:
                max_batch = fit_batch(model, x, kinds, max_memory, storage_dtype)
            with capture(model, kinds, callback=callback):
                for chunk in x.split(max_batch) if max_batch else (x,):
                    model(chunk)
                    collector.end_batch()
    finally:
        model.train(was_training)
    if all_reduce:
        distributed.all_reduce_sums(collector.accumulators(), device)
    result = collector.result()
    result.settings = {"threshold": threshold, "rank_images": rank_images, "storage_dtype": str(storage_dtype),
                       "max_memory": max_memory, "max_batch": max_batch}
    return result


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
    max_memory: int | str | None = None,
    storage: str = "float32",
) -> ProbeResult:
    """Load ``checkpoint`` safely, run images through it and return every collapse metric (``similarity`` command).

    ``num_heads``, ``mean`` and ``std`` are passed to ``checkpoints.build_model`` (heads rule, normalisation).
    Under ``torchrun --nproc-per-node N`` each rank probes every N-th image and the results are all-reduced.
    """
    if not 0.0 <= threshold <= 1.0:
        raise BadArgumentError(f"--threshold must be between 0 and 1, got {threshold}")
    if neighbors < 1:
        raise BadArgumentError(f"--neighbors must be at least 1, got {neighbors}")
    if storage not in STORAGE_DTYPES:
        raise BadArgumentError(f"--storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
    if max_memory is not None:
        parse_bytes(max_memory)  # a bad size fails before the model is loaded
    dist_info = distributed.init_distributed(device)
    dev, world = dist_info.device, dist_info.world
    model, info = build_model(read_checkpoint(checkpoint, trust_pickle=trust_pickle, key=key), model_name,
                              num_heads=num_heads, mean=mean, std=std)
    loader, image_info = image_loader(model, images, num_images, batch_size, workers)
    result = probe(model.to(dev), distributed.shard_loader(loader), threshold=threshold, device=dev,
                   rank_images=rank_images, storage_dtype=STORAGE_DTYPES[storage],
                   progress=progress and distributed.is_main(), max_memory=max_memory, all_reduce=True)
    result.model, result.images = info, image_info
    result.settings.update(reduction=reduction, neighbors=neighbors, batch_size=batch_size, device=str(dev),
                           storage_dtype=storage, world_size=world)
    return result
