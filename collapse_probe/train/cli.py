"""Glue between the ``collapse-probe train`` options and ``train()``: merge preset, config file, flags and ``--set``.

Precedence, lowest first (as timm's ``train.py -c`` and LightningCLI ``--config``): TrainConfig defaults, the preset,
``--config FILE.yaml``, ``--set KEY=VALUE``, then the named options (``--lr``, ``--epochs``, ...). A preset named in the
file is used unless ``--preset`` is given.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BadArgumentError
from .config import load_config_file, parse_override, resolve_config


def run_train(preset: str | None, sets: Sequence[str] = (), print_config: bool = False, depth: int | None = None,
              config_file: Path | None = None, resume: str | None = None, **flags: Any) -> None:
    """``resume``: None (a new run), "" (``--resume`` alone: OUTPUT/last.pt) or a path to a last.pt."""
    overrides: dict[str, Any] = load_config_file(config_file) if config_file is not None else {}
    preset = preset or overrides.pop("preset", None) or "digits"
    overrides.pop("preset", None)
    for text in sets:
        key, value = parse_override(text)
        overrides[key] = value
    named = {k: (str(v) if k in ("data_dir", "output", "initial_checkpoint") else v)
             for k, v in flags.items() if v is not None}
    if "data_dir" in named and preset not in ("paper", "paper32"):
        named.setdefault("dataset", "folder")
    overrides.update(named)
    if resume is not None:
        overrides["resume"] = True
        if resume:
            overrides["resume_from"] = str(resume)
    cfg = resolve_config(preset, **overrides)
    if depth is not None:
        cfg.model_args["depth"] = depth
    if cfg.dataset != "folder" and cfg.data_dir:
        raise BadArgumentError(f"--data-dir is only used by the folder dataset, not '{cfg.dataset}'")
    if print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    from .engine import train

    result = train(cfg)
    if result.final_path is not None:
        ev = result.final
        print(f"wrote {result.final_path} ({ev['weights']} weights, top-1 {ev['top1']:.2f}%, top-5 {ev['top5']:.2f}%)",
              file=sys.stderr)
