"""Write a model we built as safetensors, with its config in the metadata so it loads without any flag.

    save_checkpoint(model, "out.safetensors", extra={"eval": {"top1": 91.2}})
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..outputs import write_file
from .read import META_KEY


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """Our config for ``model`` (architecture + arguments + preprocessing), stored in every checkpoint we write."""
    args = getattr(model, "collapse_probe_args", None)
    if args is None:
        raise ValueError("model was not created by collapse_probe.models; no config to record")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    pre = {k: cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if k in cfg}
    return {**args, "pretrained_cfg": pre}


def save_checkpoint(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights as safetensors with our config (and ``extra``, e.g. accuracy) in the metadata."""
    from safetensors.torch import save_file

    meta = {**model_metadata(model), **(extra or {})}
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_file(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: json.dumps(meta)}))
