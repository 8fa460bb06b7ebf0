"""Pictures handed over in memory (numpy arrays, PIL images) as probe images, preprocessed like the files of a folder.

    loader, info = picture_loader(model, [np.zeros((32, 32, 3), np.uint8), Image.open("cat.jpg")])
    is_pictures([arr, arr])          # True: probe() routes such a list here instead of treating it as batches

A numpy picture is H x W (grey), H x W x C or C x H x W with C in 1, 3 or 4 (channels last wins when both readings
fit), with pixel values as uint8 / integers in 0..255 or floats in [0, 1]; a 4-D array is a stack of such pictures.
Each goes through the model's own eval transform (resize, centre crop, mean/std), exactly like an image file, so the
values are raw pixels, never already-normalised input: that is what a torch tensor [B, 3, H, W] is for. A picture
that fits none of these is refused with one line naming its position (``BadArgumentError``, exit code 2).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader

from ..errors import BadArgumentError
from .images import ProbeImages
from .info import ImageInfo

_EXPECTED = ("expected H x W, H x W x C or C x H x W (C = 1, 3 or 4) with uint8 pixels or floats in [0, 1]; pass "
             "already preprocessed input as a torch tensor [B, 3, H, W]")


def is_pictures(images: Any) -> bool:
    """True for a numpy array, a PIL image, or a list / tuple holding either."""
    if isinstance(images, (np.ndarray, Image.Image)):
        return True
    return isinstance(images, (list, tuple)) and any(isinstance(x, (np.ndarray, Image.Image)) for x in images)


def _pixels(a: np.ndarray, where: str) -> np.ndarray:
    """uint8 pixel values of one array (integers 0..255 or floats in [0, 1])."""
    if a.size == 0:
        raise BadArgumentError(f"{where} is empty (shape {a.shape}); {_EXPECTED}")
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise BadArgumentError(f"{where} holds integers outside 0..255 (dtype {a.dtype}); {_EXPECTED}")
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise BadArgumentError(f"{where} is a float array with values outside [0, 1] (or NaN); {_EXPECTED}")
        return np.round(a * 255.0).astype(np.uint8)
    raise BadArgumentError(f"{where} has dtype {a.dtype}; {_EXPECTED}")


def to_image(x: Any, where: str = "picture") -> Image.Image:
    """One numpy array or PIL image as an RGB PIL image (see the module docstring for what an array may be)."""
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if not isinstance(x, np.ndarray):
        raise BadArgumentError(f"{where} is a {type(x).__name__}; a list of pictures takes numpy arrays or PIL images "
                               "only")
    a = x
    if a.ndim == 3:
        if a.shape[-1] in (1, 3, 4):
            pass
        elif a.shape[0] in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)
        else:
            raise BadArgumentError(f"{where} has shape {tuple(x.shape)}: no axis of 1, 3 or 4 channels; {_EXPECTED}")
        if a.shape[-1] == 1:
            a = a[..., 0]
    elif a.ndim != 2:
        raise BadArgumentError(f"{where} has shape {tuple(x.shape)}; {_EXPECTED}")
    a = np.ascontiguousarray(_pixels(a, where))
    return Image.fromarray(a).convert("RGB")


def _items(images: Any) -> list[Any]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (np.ndarray, Image.Image)):
        return [images]
    out: list[Any] = []
    for x in images:
        out.extend(list(x) if isinstance(x, np.ndarray) and x.ndim == 4 else [x])
    return out


def picture_loader(model: nn.Module, images: Sequence[Any] | np.ndarray | Image.Image, num_images: int | None = None,
                   batch_size: int = 16, workers: int = 0) -> tuple[DataLoader, ImageInfo]:
    """A loader of ``images`` (numpy arrays / PIL images) through ``model``'s eval transform, and what they are."""
    if batch_size < 1:
        raise BadArgumentError(f"--batch-size must be at least 1, got {batch_size}")
    items = _items(images)
    pictures = [to_image(x, f"picture {i} of {len(items)}") for i, x in enumerate(items)]
    if not pictures:
        raise BadArgumentError("no picture given: the list is empty")
    if num_images is not None:
        pictures = pictures[:num_images]
    cfg = resolve_model_data_config(model)
    ds = ProbeImages(pictures, create_transform(**cfg, is_training=False))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return loader, ImageInfo("in-memory pictures (numpy / PIL)", len(pictures), list(cfg["input_size"]),
                             list(cfg["mean"]), list(cfg["std"]))
