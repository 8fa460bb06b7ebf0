"""The one road from a checkpoint or a model to a ``ProbeResult``: load safely, feed images, stream the maps.

    import collapse_probe as cp
    result = cp.probe("checkpoints/vit_micro_d32.safetensors", "builtin:digits")   # every loading check applies
    result = cp.probe(model, loader, threshold=0.9)           # a model in memory, batches [B, C, H, W] (or (x, y))
    result = cp.probe(model, images, max_memory="2GiB", storage="float16")   # split batches to fit

Every command (``similarity``, ``audit``, ``compare``, ``figures``, the trainer's collapse tracking) calls ``probe``
with the same options, and the result is assembled only here: metrics from ``CollapseCollector``, ``model`` and
``images`` as typed records, every setting that shaped the numbers in ``settings``.

Memory per batch: the unit-column maps of every block of that batch (for the all-pairs similarity) and nothing from
earlier batches; the image count does not matter (``memory.fit_batch`` splits batches for ``max_memory``). Maps or
features holding NaN/Inf are excluded image by image and reported in ``ProbeResult.findings``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed
from ..errors import BadArgumentError, UnsupportedModelError, first_line
from ..hooks.capture import Site, capture
from ..loading.build import describe, load_model
from ..loading.images import batch_images, image_loader
from ..loading.info import ImageInfo, LoadedModel
from ..loading.pictures import is_pictures, picture_loader
from ..loading.provenance import matching_images
from .baseline import recalibrate_bn, untrained_twin
from .collector import STORAGE_DTYPES, CollapseCollector
from .memory import fit_batch, parse_bytes
from .result import REDUCTIONS, ProbeResult

Observer = Callable[[Site, torch.Tensor], None]
# how a path is read (``load_model``)
LOAD_OPTIONS = ("model_name", "num_heads", "mean", "std", "key", "trust_pickle", "prefix", "model_code", "model_args")


def _storage(storage: str | torch.dtype) -> tuple[torch.dtype, str]:
    if isinstance(storage, torch.dtype):
        names = {v: k for k, v in STORAGE_DTYPES.items()}
        if storage not in names:
            raise BadArgumentError(f"storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage}")
        return storage, names[storage]
    if storage not in STORAGE_DTYPES:
        raise BadArgumentError(f"--storage must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
    return STORAGE_DTYPES[storage], storage


def _check(threshold: float, neighbors: int, reduction: str, max_memory: int | str | None) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise BadArgumentError(f"--threshold must be between 0 and 1, got {threshold}")
    if neighbors < 1:
        raise BadArgumentError(f"--neighbors must be at least 1, got {neighbors}")
    if reduction not in REDUCTIONS:
        raise BadArgumentError(f"--reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if max_memory is not None:
        parse_bytes(max_memory)  # a bad size fails before anything is loaded


def open_model(model_or_path: nn.Module | LoadedModel | str | Path, device: str | torch.device | None = None,
               **load: Any) -> tuple[LoadedModel, torch.device, int]:
    """(the model and what it is, the device it now lives on, the torchrun world size) for any accepted model.

    A path is read with every safety check (``load_model``; ``load``: ``LOAD_OPTIONS``) onto ``device`` (default
    "auto"); a model in memory goes to ``device`` (default: where it is).
    """
    from_file = isinstance(model_or_path, (str, Path))
    given = {k: v for k, v in load.items() if v is not None and v is not False}
    unknown = set(given) - set(LOAD_OPTIONS)
    if unknown:
        raise TypeError(f"unknown load option(s) {sorted(unknown)}")
    if given and not from_file:
        raise BadArgumentError(f"{', '.join(given)} apply to checkpoint paths, not to a model already built")
    world = 1
    if from_file:
        info = distributed.init_distributed("auto" if device is None else device)  # "" is a mistake, not auto
        dev, world = info.device, info.world
        model_or_path = load_model(model_or_path, **given)
    loaded = model_or_path if isinstance(model_or_path, LoadedModel) else \
        LoadedModel(model_or_path, describe(model_or_path))
    if not from_file:
        dev = distributed.resolve_device(device) if isinstance(device, str) else (
            torch.device(device) if device is not None else next(loaded.model.parameters()).device)
    loaded.model.to(dev)
    return loaded, dev, world


def default_images(model_or_path: Any) -> str | None:
    """The image set a probe uses when none is given: the built-in set matching the dataset our trainer recorded in
    the checkpoint (digits), else None (``image_loader``'s default, builtin:photos). The commands use the same rule
    (``loading.provenance``), so ``probe(path)`` and ``collapse-probe similarity path`` see the same images."""
    path = model_or_path if isinstance(model_or_path, (str, Path)) else (
        model_or_path.info.checkpoint if isinstance(model_or_path, LoadedModel) else None)
    match = matching_images(path) if path is not None else None
    return match[0] if match else None


def _check_batches(images: list | tuple) -> list | tuple:
    """A list of batches, checked: tensors [B, C, H, W] or (x, y) pairs. Anything else is one line, not an error deep
    inside the model."""
    for i, b in enumerate(images):
        x = batch_images(b)
        if not isinstance(x, torch.Tensor):
            raise BadArgumentError(f"images: item {i} is a {type(x).__name__}; pass tensors [B, 3, H, W], (x, y) "
                                   "pairs, numpy arrays or PIL images")
        if x.ndim != 4:
            raise BadArgumentError(f"images: batch {i} has shape {tuple(x.shape)}; a batch is [B, C, H, W] (a list "
                                   "of [C, H, W] tensors is stacked)")
    return images


def image_batches(images: Any, model: nn.Module, num_images: int | None, batch_size: int,
                  workers: int = 0) -> tuple[Iterable, ImageInfo]:
    """Any accepted ``images`` -> (batches, what they are): a folder or builtin:... set, a tensor, batches, or
    pictures (numpy arrays / PIL images, preprocessed like image files: ``loading.pictures``)."""
    if images is None or isinstance(images, (str, Path)):
        return image_loader(model, images, num_images, batch_size, workers)
    if is_pictures(images):
        return picture_loader(model, images, num_images, batch_size, workers)
    if isinstance(images, (list, tuple)) and images and all(isinstance(x, torch.Tensor) and x.ndim == 3
                                                            for x in images):
        try:  # single preprocessed images [C, H, W]: one tensor of them
            images = torch.stack(list(images))
        except RuntimeError as e:
            raise BadArgumentError(f"images: [C, H, W] tensors of different shapes cannot be stacked ({e})") from e
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise BadArgumentError(f"images must be a batch [B, C, H, W], got shape {tuple(images.shape)}")
        return images.split(batch_size), ImageInfo("in-memory tensor", int(images.shape[0]),
                                                   list(images.shape[1:]))
    if isinstance(images, (list, tuple)):
        images = _check_batches(images)
    elif not hasattr(images, "__iter__"):
        raise BadArgumentError(f"images must be a folder, builtin:photos / builtin:digits, a tensor [B, 3, H, W], "
                               f"batches, numpy arrays or PIL images; got a {type(images).__name__}")
    return images, ImageInfo("in-memory batches", None)


@torch.inference_mode()
def probe(
    model_or_path: nn.Module | LoadedModel | str | Path,
    images: str | Path | torch.Tensor | Iterable | None = None,
    *,
    model_name: str | None = None,
    num_heads: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
    prefix: str | None = None,
    model_code: str | Path | None = None,
    model_args: str | dict[str, Any] | None = None,
    num_images: int | None = None,
    batch_size: int = 16,
    workers: int = 0,
    threshold: float = 0.9,
    entry_threshold: float | None = None,
    neighbors: int = 1,
    reduction: str = "mean",
    rank_images: int | None = 16,
    kinds: Sequence[str] = ("probs", "mixed", "out"),
    storage: str | torch.dtype = "float32",
    max_memory: int | str | None = None,
    device: str | torch.device | None = None,
    progress: bool | str = True,
    all_reduce: bool | None = None,
    observers: Sequence[Observer] = (),
    baseline: bool = True,
    baseline_seed: int = 0,
    prefix_tokens: int | None = None,
) -> ProbeResult:
    """Measure collapse of a checkpoint (path), a ``load_model`` result or a model in memory.

    Args:
        model_or_path: a checkpoint file or model folder (read with every safety check, see ``load_model``), a
            ``LoadedModel``, or an ``nn.Module`` of a supported family.
        images: a folder, ``builtin:photos`` or ``builtin:digits`` (preprocessed with the model's own eval
            transform, converted to its channels), a tensor [B, C, H, W] already preprocessed, an iterable of such
            batches / (x, y), or pictures (numpy arrays, PIL images: ``loading.pictures``). Default: as the commands
            choose (``default_images``): the set the checkpoint was trained on when our trainer recorded one
            (digits), else builtin:photos.
        model_name, num_heads, mean, std, key, trust_pickle, prefix: how to read a path (``load_model``).
        model_code, model_args: your own model's code (a .py file or module name, imported: it runs) and the
            keyword arguments for ``model_name``, the class or function in it that builds the model; the untrained
            twin is that factory called again under ``baseline_seed``.
        num_images, batch_size, workers: how many images of a folder / built-in set, in batches of this size.
        threshold: the block criterion: a block is similar when its similarity with the previous block(s) exceeds it.
        entry_threshold: the per-entry cut of the ratio reduction (fraction of column cosines above it; default
            ``threshold``), fixed while probing.
        neighbors, reduction: how ``result.summary`` counts similar blocks (stored in ``settings``).
        rank_images: images whose maps enter the SVD-based ranks (None: all; default 16, as the commands).
        storage: precision of the per-batch maps kept for the all-pairs similarity ("float16" halves memory).
        max_memory: split batches so the probe's tensors fit, e.g. "2GiB".
        device: "auto", "cpu", "cuda:N" (default: "auto" for a path, the model's own device otherwise).
        progress: progress bars on stderr, labelled "probing model" and "probing untrained twin"; a string names
            the model instead (e.g. "checkpoint 2 of 5 (a.pt)").
        all_reduce: shard the images over torchrun ranks and all-reduce the sums (default: for paths only, so a lone
            rank such as the trainer's collapse tracking can probe a model alone).
        observers: extra ``fn(site, tensor)`` callbacks that see every captured tensor in the same forward passes.
        baseline: also measure the untrained twin (``probing.baseline``: same architecture, fresh init with
            ``baseline_seed``, BatchNorm statistics re-estimated on these images) and store it as ``result.baseline``.
            On by default, as in every command: without it the verdict cannot tell collapse from initialisation.
            ``baseline=False`` halves the time.
        prefix_tokens: class / distillation / register tokens before the patch tokens, for the mean attention
            distance (default: the model's ``num_prefix_tokens``, else its token parameters; see ``prefix_tokens_of``).

    The model is switched to eval mode (dropout and BatchNorm statistics frozen) and restored afterwards. Every default
    is the ``similarity`` command's, so ``probe(path)`` and ``collapse-probe similarity path`` give the same JSON.
    """
    entry_threshold = threshold if entry_threshold is None else entry_threshold
    _check(threshold, neighbors, reduction, max_memory)
    if not 0.0 <= entry_threshold <= 1.0:
        raise BadArgumentError(f"--entry-threshold must be between 0 and 1, got {entry_threshold}")
    storage_dtype, storage_name = _storage(storage)
    from_file = isinstance(model_or_path, (str, Path))
    all_reduce = from_file if all_reduce is None else all_reduce
    loaded, dev, _ = open_model(model_or_path, device, model_name=model_name, num_heads=num_heads, mean=mean,
                                    std=std, key=key, trust_pickle=trust_pickle, prefix=prefix,
                                    model_code=model_code, model_args=model_args)
    model, model_info = loaded.model, loaded.info
    if images is None:
        images = default_images(model_or_path)
    batches, image_info = image_batches(images, model, num_images, batch_size, workers)
    if not model_info.depth and iter(batches) is not batches:  # no adapter, no guessed input ran: describe it on ours
        first = next(iter(batches), None)
        model_info = describe(model, batch_images(first).to(dev)) if first is not None else model_info
    all_reduce = all_reduce and distributed.active()
    # the ranks the numbers were summed over (not open_model's: a LoadedModel from cp.probe's single read reports 1)
    world = torch.distributed.get_world_size() if all_reduce else 1
    if all_reduce:
        if not isinstance(batches, DataLoader):
            raise BadArgumentError("all_reduce shards a folder or built-in image set over the ranks; pass one")
        batches = distributed.shard_loader(batches)
    show = bool(progress) and distributed.is_main()
    label = progress if isinstance(progress, str) else "model"
    if baseline and iter(batches) is batches:
        raise BadArgumentError("the untrained twin (baseline=True, the default) needs images it can read twice: pass "
                               "a folder, a built-in set, a tensor or a list of batches, or baseline=False")
    prefix = prefix_tokens_of(model) if prefix_tokens is None else prefix_tokens
    result, max_batch = _measure(model, batches, kinds, entry_threshold, rank_images, storage_dtype, max_memory, dev,
                                 show, all_reduce, observers, prefix, desc=f"probing {label}")
    if not result.attention:
        bad = sum(f["images"] for f in result.findings)
        raise BadArgumentError(f"no finite attention map: every image gave NaN/Inf maps ({bad} image-blocks); check "
                               "the images and --mean/--std" if bad else "no image reached the model: the images "
                               "given are empty")
    result.model, result.images = model_info, image_info
    result.settings = {"threshold": threshold, "entry_threshold": entry_threshold, "neighbors": neighbors,
                       "reduction": reduction, "rank_images": rank_images, "storage_dtype": storage_name,
                       "max_memory": max_memory, "max_batch": max_batch, "batch_size": batch_size, "device": str(dev),
                       "world_size": world}
    if baseline:
        result.baseline = _twin_result(model, batches, kinds, entry_threshold, rank_images, storage_dtype, max_memory,
                                       dev, show, all_reduce, baseline_seed, result, prefix,
                                       "untrained twin" if label == "model" else f"untrained twin of {label}",
                                       loaded.factory)
    return result


def _twin_result(model: nn.Module, batches: Iterable, kinds: Sequence[str], entry_threshold: float,
                 rank_images: int | None, storage_dtype: torch.dtype, max_memory: int | str | None,
                 dev: torch.device, show: bool, all_reduce: bool, seed: int, trained: ProbeResult,
                 prefix: int | None, label: str = "untrained twin",
                 factory: Callable[..., nn.Module] | None = None) -> ProbeResult:
    """The untrained twin measured on the same batches with the same settings (``probing.baseline``; ``factory``:
    the user's own, called again under ``seed``)."""
    twin, how = untrained_twin(model, seed, factory)
    bn_batches = recalibrate_bn(twin, tqdm(batches, desc=f"{label}: BatchNorm statistics", unit="batch", leave=False,
                                           disable=not show), dev, all_reduce=all_reduce)
    result, _ = _measure(twin, batches, kinds, entry_threshold, rank_images, storage_dtype, max_memory, dev, show,
                         all_reduce, (), prefix, desc=f"probing {label}")
    del twin
    result.model, result.images = trained.model, trained.images
    result.settings = {**trained.settings, "twin": {"init": how, "seed": seed, "batchnorm_batches": bn_batches}}
    return result


def prefix_tokens_of(model: nn.Module) -> int | None:
    """Tokens before the patch tokens: timm's ``num_prefix_tokens``, else the class / distillation / register token
    parameters of torchvision, transformers and vit-pytorch ViTs; None when the model shows neither."""
    n = getattr(model, "num_prefix_tokens", None)
    if n is not None:
        return int(n)
    names = ("cls_token", "class_token", "dist_token", "distillation_token", "register_tokens", "reg_token")
    sizes = [p.shape[-2] if p.ndim >= 2 else 1 for name, p in model.named_parameters()
             if name.rsplit(".", 1)[-1] in names]
    return int(sum(sizes)) if sizes else None


class _TokenCounts:
    """Refuse, with one line naming the counts, maps whose token count differs from the first probed block's: the
    collapse metrics compare maps block to block. (Known multi-scale models already probe one stack only:
    ``hooks.selection``; this catches any other.)"""

    def __init__(self) -> None:
        self.first: dict[str, tuple[str, int]] = {}

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        if site.kind == "out" or t.ndim != 4:
            return
        name, n = self.first.setdefault(site.kind, (site.name, int(t.shape[-1])))
        if int(t.shape[-1]) != n:
            raise UnsupportedModelError(
                f"attention blocks run on unequal token counts ({name}: {n} tokens, {site.name}: {t.shape[-1]}); "
                "collapse compares maps block to block, so every probed block must see the same tokens")


def _forward(model: nn.Module, x: torch.Tensor, first: bool) -> None:
    """One forward; on the first batch a shape error of the model becomes one line: the images given (or chosen by
    default, 224 px for a model that does not say its input size) are not what the model takes."""
    if not first:
        model(x)
        return
    try:
        model(x)
    except (RuntimeError, ValueError, AssertionError) as e:
        if isinstance(e, UnsupportedModelError):
            raise
        raise BadArgumentError(f"the model cannot run on the images given ([B, C, H, W] = {list(x.shape)}): "
                               f"{first_line(e)}; pass images it takes, e.g. a tensor [B, C, H, W] of its input "
                               "size (a model in memory does not say its input size; 224 px is assumed)") from e


def _measure(model: nn.Module, batches: Iterable, kinds: Sequence[str], threshold: float, rank_images: int | None,
             storage_dtype: torch.dtype, max_memory: int | str | None, device: torch.device, progress: bool,
             all_reduce: bool, observers: Sequence[Observer],
             prefix_tokens: int | None = None, desc: str = "probing") -> tuple[ProbeResult, int | None]:
    """The probe loop: hooks planned once, every batch streamed into one collector; (result, max batch used)."""
    rank_cap = rank_images
    if rank_images is not None and all_reduce:
        dist = torch.distributed
        rank_cap = distributed.shard_count(rank_images, dist.get_rank(), dist.get_world_size())
    collector: CollapseCollector | None = None
    tokens = _TokenCounts()

    def callback(site: Site, t: torch.Tensor) -> None:
        tokens(site, t)
        collector(site, t)
        for fn in observers:
            fn(site, t)

    was_training = model.training
    model.eval()
    max_batch = None
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False)
    try:
        it = iter(bar)
        first = next(it, None)
        if first is not None and max_memory is not None:  # sized with its own 1-image forward, before the hooks
            max_batch = fit_batch(model, batch_images(first).to(device), kinds, max_memory, storage_dtype)
        example = batch_images(first).to(device) if first is not None else None  # universal route: its dry run
        with capture(model, kinds, callback=callback, example=example) as cap:
            collector = CollapseCollector(cap.sites, threshold, rank_cap, storage_dtype, cap.num_heads, prefix_tokens)
            batch = first
            while batch is not None:
                x = batch_images(batch).to(device)
                for chunk in x.split(max_batch) if max_batch else (x,):
                    _forward(model, chunk, batch is first)
                    collector.end_batch()
                batch = next(it, None)
    finally:  # the bar is cleared before anything else reaches stderr (an interrupt's one line stays last)
        bar.close()
        model.train(was_training)
    collector.release()  # the per-batch buffers it kept for a next batch
    if all_reduce:
        distributed.all_reduce_sums(collector.accumulators(), device)
    return collector.result(), max_batch
