"""``cp.probe``: the probe (``run.probe``) and, by default, each block's redundancy measured by intervention, so that
the verdict (``cp.judge(result)``) rests on what replacing a map does, in Python as on the command line.

    result = probe("checkpoints/vit_micro_d32.safetensors")               # maps, twin, and measured redundancy
    result.redundancy["blocks"]                                           # 1-based blocks whose swap changes < 1 %
    result = probe(model, images, intervene=False)                        # maps only (the verdict then predicts)

Kept apart from ``run`` because the interventions (``intervene``) are built on ``run``'s loading and image helpers:
this module sits on top of both. The model is read once; under torchrun the probe is sharded as ``run.probe`` shards
it, and the interventions run on every rank (each needs the full outputs).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..loading.info import LoadedModel
from .redundancy import measure_redundancy
from .result import ProbeResult
from .run import LOAD_OPTIONS, default_images, open_model
from .run import probe as probe_maps

__all__ = ["probe"]


def probe(model_or_path: nn.Module | LoadedModel | str | Path,
          images: str | Path | torch.Tensor | Iterable | None = None, *, intervene: bool = True,
          **options: Any) -> ProbeResult:
    """``run.probe`` (every option: images, baseline, threshold, ... see there) and, with ``intervene`` (default),
    ``probing.redundancy.measure_redundancy`` on the same model and images, stored as ``result.redundancy``.

    Skipped, with ``redundancy`` None, for images that can be read only once (a one-shot iterator)."""
    if not intervene:
        return probe_maps(model_or_path, images, **options)
    from_file = isinstance(model_or_path, (str, Path))
    load = {k: options.pop(k) for k in list(options) if k in LOAD_OPTIONS}
    device = options.pop("device", None)
    loaded, dev, _ = open_model(model_or_path, device, **load)  # read once for both passes
    if images is None:
        images = default_images(model_or_path)
    options.setdefault("all_reduce", from_file and distributed.active())
    result = probe_maps(loaded, images, device=dev, **options)
    if isinstance(images, Iterable) and not isinstance(images, (str, Path, torch.Tensor)) and iter(images) is images:
        return result  # a one-shot iterator was used up by the probe
    progress = options.get("progress", True)
    result.redundancy = measure_redundancy(
        loaded, images, device=dev, num_images=options.get("num_images"), batch_size=options.get("batch_size", 16),
        workers=options.get("workers", 0), progress=bool(progress) and distributed.is_main())
    return result
