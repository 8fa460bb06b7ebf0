"""Which folder a training run may write, and writing it only once everything has been checked.

    folder = RunFolder.inspect(Path("runs/d16"))   # reads only: new, empty, ours (manifest) or legacy; else exit 2
    folder.lock()                                  # one trainer per folder (flock on the folder, Linux/macOS)
    rows = folder.read_log("log.csv")              # our CSV or a one-line refusal, before anything is written
    folder.commit(cfg, start_epoch)                # mkdir, manifest, stale temps removed, CSVs cut, config.json
    folder.discard()                               # after an error before the first last.pt: remove what we made

The trainer writes into a folder only when it is new, empty, or holds a run it wrote: the run manifest
(``RUN_MANIFEST``, written at a run's start) says so, and so do the folders of earlier versions, which had none: their
``config.json`` is one of ours (TrainConfig's keys) beside a ``last.pt``, or beside nothing but our own run files.
Anything else (a project folder with its own ``config.json`` or ``log.csv``) is refused with exit 2 and left exactly
as it was, with or without ``--resume``, from flags or from a recipe.

``log.csv`` / ``collapse.csv`` numbers epochs from 1 (the epoch just finished, as the console and TensorBoard);
earlier versions wrote 0-based numbers, and their rows are renumbered when such a run is resumed (the manifest then
records ``epoch_base`` 1).
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BadArgumentError
from ..outputs import committed, write_file

RUN_MANIFEST = ".collapse-probe-run.json"
RUN_FILES = ("last.pt", "log.csv", "collapse.csv", "config.json", "final.safetensors", "best.safetensors")
LOG_FIELDS = ["epoch", "train_loss", "val_loss", "top1", "top5", "ema_top1", "ema_top5", "lr", "images_per_s",
              "epoch_seconds", "similar_blocks"]
COLLAPSE_FIELDS = ["epoch", "kind", "block", "neighbor_similarity", "similar"]
CSV_FIELDS = {"log.csv": LOG_FIELDS, "collapse.csv": COLLAPSE_FIELDS}
MAX_CSV_BYTES = 64 << 20
_CORE_KEYS = {"model", "model_args", "dataset", "epochs", "batch_size", "lr", "seed"}  # in every config we wrote
_EVENTS = re.compile(r"^events\.out\.tfevents\.")
# temporaries of ``outputs.write_file`` (".NAME.RANDOM.tmp") for our file names, and ``outputs`` staging names
_OUR_TEMP = re.compile(r"^\.(?:%s)\.[A-Za-z0-9_]+\.tmp$" % "|".join(re.escape(n) for n in (*RUN_FILES, RUN_MANIFEST)))
_STAGING_TEMP = re.compile(r"^\..+\.collapse-probe-(\d+)-[A-Za-z0-9_]+\.tmp$")


_HELD: set[int] = set()  # descriptors holding a folder lock in this process


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): drop the copies of our lock descriptors. A flock belongs to the open
    file, which a fork shares; a worker that outlives a killed trainer would otherwise keep the folder locked."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _ours_by_name(name: str) -> bool:
    return name in RUN_FILES or name == RUN_MANIFEST or bool(_EVENTS.match(name) or _OUR_TEMP.match(name))


def _read_small(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes, else None (a FIFO is never opened)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError:
        return None


def saved_settings(folder: Path) -> dict[str, Any]:
    """The settings of the run in ``folder`` (its config.json), for ``--resume`` to start from: its TrainConfig keys
    but where it is written and resumed from; {} when the folder holds no run of ours."""
    from dataclasses import fields

    from .config import TrainConfig

    try:
        if not RunFolder.inspect(folder).holds_run:
            return {}
    except BadArgumentError:
        return {}  # train() refuses such a folder with its own message
    raw = _read_small(folder / "config.json", 1 << 20)
    try:
        data = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return {}
    known = {f.name for f in fields(TrainConfig)} - {"output", "resume", "resume_from", "initial_checkpoint", "preset",
                                                      "extended"}
    return {k: v for k, v in data.items() if k in known} if isinstance(data, dict) else {}


def our_config(path: Path) -> bool:
    """Whether ``path`` is a config.json our trainer wrote (a JSON object with TrainConfig's keys)."""
    from dataclasses import fields

    from .config import TrainConfig

    raw = _read_small(path, 1 << 20)
    try:
        data = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    known = {f.name for f in fields(TrainConfig)}
    return _CORE_KEYS <= set(data) and len(set(data) - known) <= 3  # a few keys of another version may differ


class RunFolder:
    """A run folder before and while it is written (see the module docstring)."""

    def __init__(self, path: Path, kind: str, epoch_base: int = 1) -> None:
        self.path, self.kind, self.epoch_base = path, kind, epoch_base
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # folders this process made (deepest last)
        self._new_files: list[str] = []  # files that did not exist before this run wrote them
        self.saved = False  # a last.pt of this process exists: from then on an error leaves the folder as it is

    # ------------------------------------------------------------------------------------------- reading only
    @classmethod
    def inspect(cls, path: Path) -> RunFolder:
        """Classify ``path``; BadArgumentError when it is not a folder we may write."""
        try:
            if not path.exists() and not path.is_symlink():
                return cls(path, "new")
            if not path.is_dir():
                raise BadArgumentError(f"--output {path} is not a folder; give a folder for the run")
            names = sorted(os.listdir(path))
        except OSError as e:
            raise BadArgumentError(f"cannot read --output {path}: {e.strerror or type(e).__name__}") from e
        if (path / RUN_MANIFEST).is_file():
            raw = _read_small(path / RUN_MANIFEST, 1 << 16)
            try:
                man = json.loads(raw) if raw is not None else None
            except (ValueError, RecursionError):
                man = None
            if isinstance(man, dict) and man.get("tool") == "collapse-probe" and man.get("kind") == "train-run":
                return cls(path, "ours", 1 if man.get("epoch_base", 1) == 1 else 0)
        if not [n for n in names if not _OUR_TEMP.match(n)]:
            return cls(path, "empty")
        mine = all(_ours_by_name(n) for n in names)
        if our_config(path / "config.json") and ((path / "last.pt").is_file() or mine):
            return cls(path, "legacy", 0)  # written before run manifests existed: 0-based logs
        foreign = [n for n in names if not _ours_by_name(n)] or names
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise BadArgumentError(f"--output {path} holds files collapse-probe train did not write ({shown}); nothing "
                               "was changed: give a new or empty folder (default: a fresh runs/train/version_N)")

    @property
    def holds_run(self) -> bool:
        return self.kind in ("ours", "legacy")

    def run_files(self) -> list[str]:
        return [f for f in RUN_FILES if (self.path / f).exists()] if self.holds_run else []

    def read_log(self, name: str) -> list[list[str]]:
        """Rows (header first) of our CSV ``name``; [] when absent; BadArgumentError when it is not ours."""
        path = self.path / name
        if not path.exists() and not path.is_symlink():
            return []
        raw = _read_small(path, MAX_CSV_BYTES)
        bad = BadArgumentError(f"{path} was not written by collapse-probe train (not a regular file of at most "
                               f"{MAX_CSV_BYTES >> 20} MiB with our columns); nothing was changed: move it away, "
                               "or give a new folder")
        if raw is None:
            raise bad
        try:
            rows = [r for r in csv.reader(raw.decode("utf-8").splitlines()) if r]
        except (UnicodeDecodeError, csv.Error) as e:
            raise bad from e
        if not rows:
            return []
        if rows[0] != CSV_FIELDS[name] or not all(len(r) == len(rows[0]) and r[0].isdigit() for r in rows[1:]):
            raise bad
        return rows

    # ------------------------------------------------------------------------------------------- writing
    def lock(self) -> None:
        """Hold an exclusive lock on the folder for this process's lifetime (released by ``release``)."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one trainer per folder is then the user's care
            return
        if self._lock_fd is not None or not self.path.is_dir():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise BadArgumentError(f"another collapse-probe train is writing {self.path} right now; wait for it or "
                                   "give another folder") from e
        self._lock_fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._lock_fd is not None:
            _HELD.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None

    def commit(self, config: dict[str, Any], start_epoch: int, cut_logs: bool,
               logs: dict[str, list[list[str]]]) -> None:
        """Make the folder a run folder: create it, lock it, remove our stale temporaries, write the manifest, cut
        (and renumber) ``logs`` to the epochs <= ``start_epoch`` when ``cut_logs``, write config.json."""
        try:
            missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            self._created = list(reversed(missing))
        except OSError as e:
            raise BadArgumentError(f"cannot create --output {self.path}: {e.strerror or type(e).__name__}") from e
        self.lock()
        self.remove_stale_temporaries()
        self._write(RUN_MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(
            {"tool": "collapse-probe", "kind": "train-run", "format": 1, "epoch_base": 1, "version": __version__},
            indent=1) + "\n"))
        if cut_logs:
            for name, rows in logs.items():
                if rows:
                    keep = [rows[0]] + [[str(int(r[0]) + 1 - self.epoch_base), *r[1:]] for r in rows[1:]
                                        if int(r[0]) + 1 - self.epoch_base <= start_epoch]
                    self._write(name, lambda tmp, keep=keep: _write_rows(tmp, keep))
        self.epoch_base = 1
        self.write_config(config)
        self.note_new(n for n in RUN_FILES if not (self.path / n).exists())  # the loop writes these later

    def write_config(self, config: dict[str, Any]) -> None:
        self._write("config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))

    def _write(self, name: str, write) -> None:
        if not (self.path / name).exists():
            self._new_files.append(name)
        write_file(self.path / name, write)

    def note_new(self, names: Iterable[str]) -> None:
        """Files the loop creates itself (logs, events): removed too when the run fails before its first last.pt."""
        self._new_files.extend(n for n in names if n not in self._new_files)

    def remove_stale_temporaries(self) -> None:
        """Temporaries a killed run of ours left (its writes are atomic: the temporary is never the file itself)."""
        for name in os.listdir(self.path):
            m = _STAGING_TEMP.match(name)
            if _OUR_TEMP.match(name) or (m and not _pid_alive(int(m.group(1)))):
                p = self.path / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def discard(self) -> None:
        """After an error before the first last.pt of a run started in a new or empty folder: remove the files this run
        created, and the folders it made when they are empty again; what was there before stays. A folder that held
        a run keeps everything (its logs may already be renumbered, and the next --resume cuts them)."""
        if self.saved or self.kind not in ("new", "empty"):
            self.release()
            return
        for name in self._new_files:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError:
                pass
        gone = {(self.path / n).absolute() for n in self._new_files}
        committed[:] = [p for p in committed if Path(p).absolute() not in gone]  # "interrupted: no output written"
        self.release()
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break


def _write_rows(tmp: str, rows: list[list[str]]) -> None:
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
