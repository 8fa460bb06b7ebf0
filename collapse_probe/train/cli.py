"""Glue between the ``collapse-probe train`` options and ``train()``: merge preset, flags and ``--set`` overrides."""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import BadArgumentError
from .config import parse_override, resolve_config


def run_train(preset: str, sets: Sequence[str] = (), print_config: bool = False, depth: int | None = None,
              **flags: Any) -> None:
    overrides: dict[str, Any] = {k: (str(v) if k in ("data_dir", "output") else v)
                                 for k, v in flags.items() if v is not None}
    if "data_dir" in overrides and preset not in ("paper", "paper32"):
        overrides.setdefault("dataset", "folder")
    for text in sets:
        key, value = parse_override(text)
        overrides[key] = value
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
