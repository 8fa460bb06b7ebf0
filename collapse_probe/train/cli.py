"""Glue between the ``collapse-probe train`` options and ``train()``: merge preset, config file, ``--set`` and flags.

Precedence, lowest first (as timm's ``train.py -c`` and LightningCLI ``--config``): TrainConfig defaults, the preset,
``--config FILE.yaml``, ``--set KEY=VALUE``, then the named options (``--lr``, ``--epochs``, ``--depth`` ...). Mappings
(``model_args``) merge key by key at every step, so a file's ``model_args: {depth: 16}`` keeps the preset's other
model arguments (``config.merge_layers``). A preset named in the file is used unless ``--preset`` is given.

On ``--resume``, an ``epochs`` given nowhere (file, ``--set``, ``--epochs``) means the checkpoint's own; one given
changes the run's length (``resume.plan_epochs``). A closed pipe on standard output or error (``--print-config |
head -1``) ends the command quietly with status 141, as a process killed by SIGPIPE.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BadArgumentError
from .config import merge_layers, resolve_config
from .recipe import load_config_file, parse_override

SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for `yes | head -1`


def run_train(preset: str | None, sets: Sequence[str] = (), print_config: bool = False, depth: int | None = None,
              config_file: Path | None = None, resume: str | None = None, **flags: Any) -> None:
    """``resume``: None (a new run), "" (``--resume`` alone: OUTPUT/last.pt) or a path to a last.pt."""
    try:
        _run(preset, sets, print_config, depth, config_file, resume, flags)
    except BrokenPipeError:
        _quiet_exit()


def _run(preset: str | None, sets: Sequence[str], print_config: bool, depth: int | None, config_file: Path | None,
         resume: str | None, flags: dict[str, Any]) -> None:
    from_file: dict[str, Any] = load_config_file(config_file) if config_file is not None else {}
    preset = preset or from_file.pop("preset", None) or "digits"
    from_file.pop("preset", None)
    from_sets = merge_layers(*({k: v} for k, v in map(parse_override, sets)))
    named = {k: (str(v) if k in ("data_dir", "output", "initial_checkpoint") else v)
             for k, v in flags.items() if v is not None}
    if depth is not None:
        named["model_args"] = {"depth": depth}
    if "data_dir" in named and preset not in ("paper", "paper32"):
        named.setdefault("dataset", "folder")
    base: dict[str, Any] = {}
    if resume is not None:
        named["resume"] = True
        if resume:
            named["resume_from"] = str(resume)
        # as timm's and Lightning's resume: the run's own settings first, then whatever this command line changes
        # (so `train -o RUN --resume` needs none of the options that started RUN)
        folder = named.get("output") or from_file.get("output") or (str(Path(resume).parent) if resume else None)
        if folder:
            from .folder import saved_settings

            base = saved_settings(Path(folder))
    cfg = resolve_config(None if base else preset, **merge_layers(base, from_file, from_sets, named))
    if cfg.dataset != "folder" and cfg.data_dir:
        raise BadArgumentError(f"--data-dir is only used by the folder dataset, not '{cfg.dataset}'")
    if print_config:
        sys.stdout.write(json.dumps(cfg.to_dict(), indent=2) + "\n")
        sys.stdout.flush()
        return
    from .engine import train

    given = "epochs" in from_file or "epochs" in from_sets or "epochs" in named
    result = train(cfg, epochs_from_checkpoint=cfg.resume and not given)
    if result.final_path is not None:
        ev = result.final
        print(f"wrote {result.final_path} ({ev['weights']} weights, top-1 {ev['top1']:.2f}%, top-5 {ev['top5']:.2f}%)",
              file=sys.stderr)


def _quiet_exit() -> None:
    """The reader went away: nothing more can be said. Point stdout/stderr at /dev/null so that Python's flush at
    exit does not raise again, then leave with the status of a process killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError, AttributeError):  # no real descriptor (an embedding host, a test runner)
                pass
    except OSError:
        pass
    raise SystemExit(SIGPIPE_STATUS)
