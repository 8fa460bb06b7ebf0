"""Run folders, resuming, fine-tuning, TensorBoard and progress: the parts of a training run around the loop.

    out = run_folder(cfg)                 # -o, or a fresh runs/train/version_N (N = next free, as Lightning)
    state = load_resume(path, cfg)        # a last.pt whose settings match cfg (else a one-line error)
    load_initial(model, path)             # --initial-checkpoint: weights only, through read_checkpoint

Rules, so a second run never mixes with the first: a folder that already holds a run (``RUN_FILES``) is written only
with ``resume``; ``--resume`` alone continues OUTPUT/last.pt (a fresh start if there is none yet; without ``-o`` the
latest version_N), ``--resume PATH`` that file (its folder unless ``-o`` says otherwise). On resume, settings that
change what is computed must equal the checkpoint's (``config.RESUME_FREE`` lists the ones that may differ): we refuse
rather than silently mix two recipes in one run, and say which keys differ.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..errors import BadArgumentError, MalformedFileError, UnsupportedLayoutError, first_line
from .config import TrainConfig, changed_on_resume
from .state import load_training_state

DEFAULT_ROOT = Path("runs/train")
RUN_FILES = ("last.pt", "log.csv", "collapse.csv", "config.json", "final.safetensors", "best.safetensors")
STATE_ENTRIES = ("model", "optimizer", "scheduler", "scaler", "epoch", "num_updates", "rng")
_VERSION = re.compile(r"^version_(\d+)$")


def _versions(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))


def next_version(root: Path = DEFAULT_ROOT) -> Path:
    """root/version_N with N one above the highest existing (0 for the first run)."""
    found = _versions(root)
    return root / f"version_{found[-1][0] + 1 if found else 0}"


def run_folder(cfg: TrainConfig) -> Path:
    """The folder this run writes; raises BadArgumentError where that would overwrite another run."""
    if cfg.output is None:
        if cfg.resume_from:
            return Path(cfg.resume_from).parent
        if cfg.resume:
            runs = [p for _, p in _versions(DEFAULT_ROOT) if (p / "last.pt").exists()]
            if runs:
                return runs[-1]
        return next_version()
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise BadArgumentError(f"--output {out} is a file; give a folder for the run")
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held and not cfg.resume:
        raise BadArgumentError(f"--output {out} already holds a training run ({', '.join(held[:3])}); pass --resume "
                               "to continue it, or choose a new folder (default: a fresh runs/train/version_N)")
    return out


def resume_path(cfg: TrainConfig, out: Path) -> Path | None:
    """The last.pt to continue from, or None for a fresh start."""
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not path.is_file():
            raise BadArgumentError(f"--resume {path} does not exist (or is not a file); give a last.pt")
        return path
    return out / "last.pt" if cfg.resume and (out / "last.pt").exists() else None


def load_resume(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The training state in ``path``, checked to be ours and to match ``cfg``."""
    state = load_training_state(path)
    missing = [k for k in STATE_ENTRIES if not isinstance(state, dict) or k not in state]
    if missing:
        raise MalformedFileError(f"{path} has no {', '.join(repr(k) for k in missing[:3])} entry: not a last.pt of "
                                 "collapse-probe train; start from its weights with --initial-checkpoint instead")
    saved = state.get("config")
    if isinstance(saved, dict):
        now = cfg.to_dict()
        diff = changed_on_resume(saved, cfg)
        if diff:
            shown = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff[:4])
            raise BadArgumentError(f"--resume {path}: settings differ from the checkpoint's ({shown}); resume with "
                                   "its settings, or start a new run with --initial-checkpoint")
    return state


def load_state(module: Any, state: Any, what: str, path: Path) -> None:
    """``module.load_state_dict(state)`` with a mismatch as one line (exit 5), not an internal error."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UnsupportedLayoutError(f"{path}: its {what} does not fit this run ({first_line(e, 160)}); use the "
                                     "--model/--depth it was trained with") from e


def load_initial(model: nn.Module, path: str | Path) -> list[str]:
    """Load weights from ``path`` into ``model`` (every check of ``read_checkpoint``); a classifier head of another
    size is left at its initialisation (fine-tuning to new classes). Returns the names of the keys left out."""
    from ..loading.read import read_checkpoint

    ckpt = read_checkpoint(path)
    sd, own = dict(ckpt.state_dict), model.state_dict()
    dropped = [k for k in list(sd) if k.startswith("head.") and k in own and sd[k].shape != own[k].shape]
    for k in dropped:
        del sd[k]
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise UnsupportedLayoutError(f"--initial-checkpoint {path} does not fit this model ({first_line(e, 160)}); "
                                     "use the --model/--depth it was trained with") from e
    missing = [k for k in missing if k not in dropped]
    if missing or unexpected:
        keys = ", ".join((missing + unexpected)[:3])
        raise UnsupportedLayoutError(f"--initial-checkpoint {path} does not fit this model ({len(missing)} missing, "
                                     f"{len(unexpected)} unexpected keys, e.g. {keys}); use the --model/--depth it "
                                     "was trained with")
    return dropped


def summary_writer(out: Path) -> Any:
    """A TensorBoard SummaryWriter logging into the run folder, or None when tensorboard is not installed.

    The event file is an append-only stream that TensorBoard reads while it grows, so it cannot go through
    ``outputs.write_file``; it only ever adds to its own new file.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out))


def bar(iterable: Iterable, total: int | None, desc: str, show: bool) -> tqdm:
    """A progress bar on a terminal; elsewhere (logs, CI, pipes) one line saying what starts, and no escape codes.

    Always ``position=0, leave=False`` and used as a context manager, so a loop left early (``break``) still closes
    its bar and the next bar does not nest under it (nesting is what writes cursor-up codes).
    """
    tty = sys.stderr.isatty()
    if show and not tty:
        print(f"{desc}{f' ({total} batches)' if total else ''}", file=sys.stderr, flush=True)
    return tqdm(iterable, total=total, desc=desc, unit="batch", file=sys.stderr, leave=False, position=0,
                disable=not (show and tty))
