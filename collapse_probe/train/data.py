"""Datasets and loaders for training: an ImageNet-style folder, scikit-learn's digits, and a synthetic set.

    train_set, val_set, num_classes = build_datasets(cfg, data_cfg)   # data_cfg = timm.data.resolve_data_config(...)
    loader = train_loader(train_set, cfg, rank, world, epoch)           # DistributedSampler, reseeded each epoch

Transforms are timm's ``create_transform`` (RandAugment, random erasing, ...); images reach them as PIL images, so the
three datasets share one pipeline. Folder images get the checks of the probing commands: only regular files are
listed (a FIFO or device named ``x.png`` is skipped, so it can never block a read), each is opened without blocking
and checked to be a regular file, and Pillow's decompression-bomb limit refuses oversized images (one line, exit 4).
Digits: 8x8 grey levels 0..16 -> 0..255, replicated to RGB and upscaled by the transform to the model's input
size; the validation split is fixed (stratified, seed 0) whatever the training seed.
"""
from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..errors import BadArgumentError, MalformedFileError, first_line
from ..loading.images import digits_arrays
from .config import TrainConfig


class ArrayImageDataset(Dataset):
    """uint8 images [N, H, W] or [N, H, W, 3] and int labels [N] served as (transform(PIL RGB image), label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[i]).convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def synthetic_arrays(n: int, size: int = 32, num_classes: int = 10, seed: int = 0):
    """Learnable noise: each class is a fixed random 8x8 pattern (upscaled) plus per-image noise; uint8 [N, S, S, 3]."""
    g = np.random.default_rng(seed)
    protos = g.integers(0, 256, size=(num_classes, 8, 8, 3)).astype(np.float32)
    rep = max(size // 8, 1)
    protos = protos.repeat(rep, 1).repeat(rep, 2)
    labels = np.arange(n) % num_classes
    noise = g.normal(0, 40, size=(n, *protos.shape[1:]))
    images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def build_datasets(cfg: TrainConfig, train_tf: Callable, val_tf: Callable) -> tuple[Dataset, Dataset, int]:
    """(train set, val set, number of classes) for ``cfg.dataset``."""
    if cfg.dataset == "digits":
        xtr, ytr, xva, yva = digits_arrays(cfg.val_fraction)
        return ArrayImageDataset(xtr, ytr, train_tf), ArrayImageDataset(xva, yva, val_tf), 10
    if cfg.dataset == "synthetic":
        xtr, ytr = synthetic_arrays(cfg.synthetic_size, seed=0)
        xva, yva = synthetic_arrays(cfg.synthetic_size, seed=1)
        return ArrayImageDataset(xtr, ytr, train_tf), ArrayImageDataset(xva, yva, val_tf), 10
    root = Path(cfg.data_dir or "")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise BadArgumentError(f"{root / split} is not a folder; data_dir needs train/ and val/ with one "
                                   "sub-folder per class (ImageNet layout)")
    train, val = _image_folder(root / "train", train_tf), _image_folder(root / "val", val_tf)
    if train.classes != val.classes:
        raise BadArgumentError(f"{root}/train and {root}/val have different class folders")
    return train, val, len(train.classes)


class ImageReadError(MalformedFileError):
    """An image of the folder dataset that PIL cannot read. A DataLoader worker re-raises it in the main process as
    ``ImageReadError("Caught ImageReadError ... Original Traceback ...")``: the last line is our message again."""

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            lines = [ln for ln in message.splitlines() if ln.strip()]
            message = lines[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _load_image(path: str) -> Image.Image:
    try:
        # O_NONBLOCK: were the file swapped for a FIFO after listing, open() returns instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            with warnings.catch_warnings():  # Pillow warns below its bomb limit: refuse instead, as the probe does
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return Image.open(f).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"cannot read image {path} ({first_line(e, 120)}); remove or replace it") from None


def _image_folder(folder: Path, transform: Callable) -> Dataset:
    """torchvision's ImageFolder, with an empty class folder or an unreadable image named in one line."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def valid(path: str) -> bool:  # the default test is the extension alone: a FIFO named x.png would hang a worker
        return path.lower().endswith(IMG_EXTENSIONS) and _regular(path)

    try:
        return ImageFolder(str(folder), transform, loader=_load_image, is_valid_file=valid)
    except (FileNotFoundError, RuntimeError) as e:
        empty = [d for d in sorted(folder.iterdir()) if d.is_dir() and not any(
            p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS) for p in d.rglob("*"))]
        if empty:
            raise BadArgumentError(f"class folder {empty[0]} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...); "
                                   "add images or remove the folder") from e
        raise BadArgumentError(f"{folder}: {first_line(e, 160)}") from e


def train_loader(dataset: Dataset, cfg: TrainConfig, rank: int, world: int, epoch: int) -> DataLoader:
    """Shuffled, sharded (DistributedSampler also for one process), drop_last; the order depends on seed and epoch only.

    Worker processes draw their seeds from the global torch RNG, which the trainer reseeds at every epoch start, so an
    epoch is reproducible whatever happened before it (exact resume).
    """
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    if len(sampler) < cfg.batch_size:
        raise BadArgumentError(f"{len(sampler)} training images per process is less than one batch of "
                               f"{cfg.batch_size}; lower batch_size")
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True,
                      pin_memory=cfg.pin_memory and torch.cuda.is_available(), persistent_workers=False)


def eval_loader(dataset: Dataset, cfg: TrainConfig, rank: int = 0, world: int = 1) -> DataLoader:
    """Every ``world``-th image from ``rank`` (no padding, so summed counts over ranks are exact)."""
    subset = Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(subset, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.workers,
                      pin_memory=cfg.pin_memory and torch.cuda.is_available())


def fixed_batch(dataset: Dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of ``dataset`` as one tensor [n, 3, H, W] (collapse tracking uses the same batch)."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
