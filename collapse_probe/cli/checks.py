"""Argument checks that need no torch: a wrong path or device is one line (exit 2) before seconds of importing it.

    @click.argument("checkpoint", callback=checkpoint_paths)   # a missing file that looks like a path: refused now
    @click.option("--device", callback=device_name)            # "", "gpu", "cuda:x": refused now

Hub ids pass through untouched (``timm/vit_small_patch16_224``, ``hf-hub:org/name``): only an argument that looks
like a path (an absolute or ./ path, more than one folder, or a checkpoint extension) and does not exist is refused
here; everything else is left to the loader, which reports it the same way after reading what it can.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SCHEME = re.compile(r"^[A-Za-z][\w+.-]+:")  # hf-hub:..., timm:..., builtin:... (a drive letter has one character)
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def looks_like_path(value: str) -> bool:
    """Whether ``value`` can only mean a file or folder (not a hub id such as org/name or hf-hub:org/name)."""
    if _SCHEME.match(value):
        return False
    if value.lower().endswith(CHECKPOINT_SUFFIXES) or value in (".", ".."):
        return True
    if value.startswith(("/", "./", "../", "~")) or os.sep != "/" and os.sep in value:
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and not all(parts))  # "org/name" is a hub id; "a/b/c", "a/" paths


def _existing(value: Any, what: str) -> Any:
    if value is not None and looks_like_path(str(value)) and not os.path.exists(value):
        raise click.BadParameter(f"{what} {value} does not exist")
    return value


def checkpoint_paths(_ctx: Any, _param: Any, value: Any) -> Any:
    """Callback for checkpoint arguments (one or several): a missing path is refused before torch is imported."""
    for v in value if isinstance(value, tuple) else (value,):
        _existing(v, "checkpoint")
    return value


def images_path(_ctx: Any, _param: Any, value: Path | None) -> Path | None:
    """Callback for --images: builtin:... sets pass; a folder must exist."""
    if value is not None and not _SCHEME.match(str(value)) and not os.path.exists(value):
        raise click.BadParameter(f"image folder {value} does not exist (or use builtin:photos, builtin:digits)")
    return value


def device_name(_ctx: Any, _param: Any, value: str | None) -> str | None:
    """Callback for --device: auto, cpu, mps, cuda or cuda:N (whether that device exists is checked when used)."""
    if value is not None and not _DEVICE.match(value):
        raise click.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value
