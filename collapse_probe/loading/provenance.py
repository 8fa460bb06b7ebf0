"""What a checkpoint our trainer wrote was trained on, read cheaply, so the probe can default to matching images.

    trained_dataset("checkpoints/deepvit_micro_d16.safetensors")   # "digits"
    trained_dataset("runs/train/version_0/last.pt")               # the run's config "dataset", or None

final.safetensors / best.safetensors carry ``train_config`` and ``eval`` in the ``collapse_probe`` metadata;
last.pt carries ``config`` (and the same ``train_config`` in its metadata entry). Only the safetensors header or a
memory-mapped torch archive is read, after the same structural safety checks as ``read_checkpoint``; anything
unreadable gives None, and the probe that follows reports the real problem.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

# the image set of ``loading.images`` that matches a dataset our trainer uses (digits: its validation split)
MATCHING_IMAGES = {"digits": "builtin:digits"}


def _dataset(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return None
    for entry in ("train_config", "config", "eval"):
        d = meta.get(entry)
        if isinstance(d, dict) and isinstance(d.get("dataset"), str):
            return d["dataset"]
    return None


def trained_dataset(path: str | Path) -> str | None:
    """The ``dataset`` recorded by our trainer in the checkpoint at ``path`` (digits, synthetic, folder), or None."""
    from ..errors import CollapseProbeError
    from .read import META_KEY, sniff_format
    from .safety import check_safetensors, check_torch_file

    path = Path(path)
    try:
        if not path.is_file():
            return None
        fmt = sniff_format(path)
        if fmt == "safetensors":
            from safetensors import safe_open

            check_safetensors(path)
            with safe_open(str(path), framework="pt", device="cpu") as f:  # the header only, no tensor is read
                raw = (f.metadata() or {}).get(META_KEY)
            return _dataset(json.loads(raw)) if raw else None
        if fmt != "torch-zip":
            return None
        import torch

        check_torch_file(path, fmt, trust_pickle=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
        return _dataset(obj) or _dataset(obj.get(META_KEY)) if isinstance(obj, dict) else None
    except (CollapseProbeError, OSError, ValueError, RuntimeError, RecursionError):
        return None
    except Exception:  # whatever a damaged file makes a reader raise: the probe itself will say what is wrong
        return None


def matching_images(path: str | Path) -> tuple[str, str] | None:
    """(image set, dataset) when ``path`` records a dataset that has a built-in image set, else None."""
    dataset = trained_dataset(path)
    return (MATCHING_IMAGES[dataset], dataset) if dataset in MATCHING_IMAGES else None
