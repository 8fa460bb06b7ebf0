"""Images to probe with: the user's folder, or real photographs that ship with scikit-image (no download).

    loader = image_loader(model, folder=None, num_images=32, batch_size=16)   # preprocessing = the model's own
    loader = image_loader(model, folder="builtin:digits")                     # a built-in set instead of a folder

Built-in sets, none of which downloads anything:
    builtin:photos  the 17 photographs bundled in scikit-image (astronaut, coffee, chelsea, rocket, Hubble deep field,
                    retina, ...; grey ones converted to RGB); asking for more than 17 adds deterministic random crops.
    builtin:digits  the validation split (360 images) of scikit-learn's digits, the split the bundled checkpoints were
                    validated on (8x8 grey levels scaled to 0..255, RGB).
The default is builtin:photos. ``image_labels`` gives the digits' classes (the other sets have none).

Every image is converted to the model's channel count (``input_size[0]`` of its data config) before the transform:
RGB to grey by luminance (PIL's ITU-R 601-2 weights) for a 1-channel model, grey to RGB by repetition for a
3-channel one; any other count gets the grey channel repeated. ``--mean/--std`` give one value per model channel.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import BadArgumentError, one_line
from .info import ImageInfo

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SAMPLE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
    "moon", "coins", "clock", "brick", "grass", "gravel", "cell", "motorcycle_left", "motorcycle_right",
)


def batch_images(batch: object) -> torch.Tensor:
    """The image tensor [B, C, H, W] of a batch that is either that tensor or an (x, y) pair from a labelled loader."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def sample_photographs() -> list[tuple[str, Image.Image]]:
    """The photographs bundled with scikit-image, as RGB PIL images (read from site-packages, never downloaded)."""
    import skimage.data

    out = []
    for name in SAMPLE_PHOTOS:
        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            arr = left if name.endswith("left") else right
        else:
            arr = getattr(skimage.data, name)()
        out.append((name, Image.fromarray(np.asarray(arr)).convert("RGB")))
    return out


BUILTIN_SETS = ("builtin:photos", "builtin:digits")


def digits_arrays(val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 images, bundled with scikit-learn) split into train / val, uint8 [N, 8, 8]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    xtr, xva, ytr, yva = train_test_split(images, d.target, test_size=val_fraction, random_state=0,
                                          stratify=d.target)
    return xtr, ytr, xva, yva


def digits_validation() -> list[Image.Image]:
    """The 360 validation digits of the bundled checkpoints' split (``digits_arrays``)."""
    _, _, images, _ = digits_arrays()
    return [Image.fromarray(a).convert("RGB") for a in images]


def image_labels(folder: str | Path | None, num_images: int | None = None) -> list[int] | None:
    """The class labels of the images ``image_loader(model, folder, num_images)`` yields, in its order, where the set
    has them: builtin:digits (the digit 0-9, the class index of the bundled checkpoints); None otherwise."""
    if folder is None or str(folder) != "builtin:digits":
        return None
    _, _, images, labels = digits_arrays()
    total = min(num_images, len(images)) if num_images else len(images)
    return [int(y) for y in labels[:total]]


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); a clear error if it is not a folder or holds none."""
    folder = Path(folder)
    if not folder.exists():
        raise BadArgumentError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise BadArgumentError(f"--images {folder} is not a folder; pass a directory of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise BadArgumentError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) found under {folder}")
    return files


class _Repeat:
    """[1, H, W] -> [C, H, W]: the grey channel repeated, for models of neither 1 nor 3 channels."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(self.channels, *x.shape[1:]).clone()


def for_channels(transform: Callable, channels: int) -> Callable:
    """``transform`` (a Compose ending in Normalize) made to give ``channels`` channels from a grey image."""
    if channels in (1, 3) or not hasattr(transform, "transforms"):
        return transform
    steps = list(transform.transforms)
    at = next((i for i, t in enumerate(steps) if type(t).__name__ == "Normalize"), len(steps))
    steps.insert(at, _Repeat(channels))
    return type(transform)(steps)


class ProbeImages(Dataset):
    """Images (PIL objects or file paths) through ``transform``; index i >= len(images) is a seeded random crop.
    ``channels``: the model's; images are converted to RGB for 3, to grey (luminance) otherwise."""

    def __init__(self, images: Sequence[Image.Image | Path], transform: Callable, total: int | None = None,
                 channels: int = 3) -> None:
        self.images, self.transform = list(images), transform
        self.total = len(self.images) if total is None else total
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return self.total

    def _open(self, item: Image.Image | Path) -> Image.Image:
        if isinstance(item, Image.Image):
            return item
        try:
            with warnings.catch_warnings():  # PIL warns (one stderr line each) before its bomb limit: refuse instead
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(item) as im:
                    return im.convert(self.mode)
        except Image.DecompressionBombWarning as e:
            raise BadArgumentError(f"image {item} is suspiciously large ({one_line(e)}); remove or shrink it") from e
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
            raise BadArgumentError(f"cannot read image {item}: {e}; remove or replace the file") from e

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self._open(self.images[i % len(self.images)])
        img = img if img.mode == self.mode else img.convert(self.mode)
        if i >= len(self.images):  # deterministic crop covering 30-90% of each side
            rng = np.random.default_rng(i)
            w, h = img.size
            cw, ch = (int(s * rng.uniform(0.3, 0.9)) for s in (w, h))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
        return self.transform(img)


def image_loader(
    model: nn.Module,
    folder: str | Path | None = None,
    num_images: int | None = None,
    batch_size: int = 16,
    workers: int = 0,
) -> tuple[DataLoader, ImageInfo]:
    """A loader of preprocessed images for ``model`` and a description of them (source, count, size).

    Preprocessing is timm's eval transform from the model's own pretrained config (resize, centre crop, mean/std).
    """
    if num_images is not None and num_images < 1:
        raise BadArgumentError(f"--num-images must be at least 1, got {num_images}")
    if batch_size < 1:
        raise BadArgumentError(f"--batch-size must be at least 1, got {batch_size}")
    cfg = resolve_model_data_config(model)
    channels = int(cfg["input_size"][0])
    transform = for_channels(create_transform(**cfg, is_training=False), channels)
    if folder is None or str(folder) == "builtin:photos":
        items: list = [img for _, img in sample_photographs()]
        total = num_images or len(items)
        source = "scikit-image sample photographs" + (" + seeded crops" if total > len(items) else "")
    elif str(folder) == "builtin:digits":
        items = digits_validation()
        total = min(num_images, len(items)) if num_images else len(items)
        items, source = items[:total], "scikit-learn digits (validation split of the bundled checkpoints)"
    elif str(folder).startswith("builtin:"):
        raise BadArgumentError(f"unknown built-in image set '{folder}'; choose {' or '.join(BUILTIN_SETS)}")
    else:
        items = list_images(folder)
        total = min(num_images, len(items)) if num_images else len(items)
        items, source = items[:total], str(folder)
    ds = ProbeImages(items, transform, total, channels)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return loader, ImageInfo(source, total, list(cfg["input_size"]), list(cfg["mean"]), list(cfg["std"]))
