"""Run folders, fine-tuning, TensorBoard and progress: the parts of a training run around the loop.

    folder, source = plan_output(cfg)     # -o, or a fresh runs/train/version_N; the last.pt to continue (or None)
    load_initial(model, path)             # --initial-checkpoint: weights only, through read_checkpoint
    scalars = Scalars(folder); scalars.log(row, epoch)   # TensorBoard, its event file made with the first row

Rules, so a second run never mixes with the first and no user folder is written: which folders a run may write is
``folder.RunFolder.inspect`` (new, empty, or holding a run of ours); a folder that already holds a run is written
only with ``resume``; ``--resume`` alone continues OUTPUT/last.pt (a fresh start if there is none yet; without ``-o``
the latest version_N), ``--resume PATH`` that file (its folder unless ``-o`` says otherwise, and never into a folder
that holds another run's last.pt). What a resume checks is ``resume``; nothing is written before it has passed.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..errors import BadArgumentError, UnsupportedLayoutError, first_line
from .artifacts import log_scalars
from .config import TrainConfig
from .folder import RunFolder

DEFAULT_ROOT = Path("runs/train")
_VERSION = re.compile(r"^version_(\d+)$")


def _versions(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))


def next_version(root: Path = DEFAULT_ROOT) -> Path:
    """root/version_N with N one above the highest existing (0 for the first run)."""
    found = _versions(root)
    return root / f"version_{found[-1][0] + 1 if found else 0}"


def plan_output(cfg: TrainConfig) -> tuple[RunFolder, Path | None]:
    """The run folder (inspected, nothing written) and the last.pt to continue from (None: a fresh start)."""
    if cfg.output is not None:
        out = Path(cfg.output)
    elif cfg.resume_from:
        out = Path(cfg.resume_from).parent
    else:
        runs = [p for _, p in _versions(DEFAULT_ROOT) if (p / "last.pt").exists()] if cfg.resume else []
        out = runs[-1] if runs else next_version()
    folder = RunFolder.inspect(out)
    own = folder.path / "last.pt"
    if cfg.resume_from:
        source = Path(cfg.resume_from)
        if not source.is_file():
            raise BadArgumentError(f"--resume {source} does not exist (or is not a file); give a last.pt")
        if own.exists() and not os.path.samefile(own, source):
            raise BadArgumentError(f"--output {out} holds another run (its own last.pt); continue {source} into a "
                                   "new folder")
        return folder, source
    held = folder.run_files()
    if held and not cfg.resume:
        raise BadArgumentError(f"--output {out} already holds a training run ({', '.join(held[:3])}); pass --resume "
                               "to continue it, or choose a new folder (default: a fresh runs/train/version_N)")
    if cfg.resume and folder.holds_run and own.is_file():
        return folder, own
    return folder, None


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


class Scalars:
    """TensorBoard scalars of a run; the event file is created with the first row, so a run that logs nothing (a
    finished run resumed, an error before the first epoch ends) leaves none."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder, self.writer, self.off = folder, None, False

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.off:
            return
        if self.writer is None:
            before = set(os.listdir(self.folder.path))
            self.writer = summary_writer(self.folder.path)
            self.off = self.writer is None
            self.folder.note_new(set(os.listdir(self.folder.path)) - before)
            if self.off:
                return
        log_scalars(self.writer, row, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
