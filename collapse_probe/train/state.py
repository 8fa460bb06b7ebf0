"""Full training state on disk: written atomically, readable with ``torch.load(weights_only=True)``.

    save_training_state(path, state)       # temporary file + fsync + rename: a crash leaves the previous file intact
    state = load_training_state(path)      # dict: model, model_ema, optimizer, scheduler, scaler, epoch, rng, config

The state holds only tensors and plain Python values (RNG states are converted to tensors), so loading it never
unpickles arbitrary objects. Reading goes through the same checks as every checkpoint the probing commands open
(``loading.safety``: a torch zip archive with nothing compressed, no TorchScript, pickle globals scanned and size
capped) before ``torch.load(weights_only=True)``. A failed write (full disk, read-only folder: torch raises a
RuntimeError, not an OSError) is one ``BadArgumentError`` line and leaves the previous file as it was.
``collapse-probe similarity last.pt`` also reads it (weights under "model").
"""
from __future__ import annotations

import errno
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MalformedFileError, first_line, one_line
from ..outputs import write_file

# words in torch.save's messages when the stream could not be written (PytorchStreamWriter / inline_container.cc)
_WRITE_FAILURE = ("write", "file", "disk", "unexpected pos", "space")


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / Python RNG states as tensors and numbers."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save``, with a failed write raised as the OSError it is (outputs.write_file turns it into one line)."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        if any(w in str(e).lower() for w in _WRITE_FAILURE):
            raise OSError(errno.EIO, f"torch.save could not write the file ({first_line(e, 100)}); is the disk "
                          "full or the folder read-only?") from e
        raise


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    write_file(path, lambda tmp: torch_save(state, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The object in a last.pt, after ``loading.safety``'s checks (exit 2 / 3 / 4 as for any checkpoint)."""
    from ..loading.read import sniff_format
    from ..loading.safety import check_torch_file

    path = Path(path)
    fmt = sniff_format(path)  # a FIFO or device: exit 2, never opened for reading
    check_torch_file(path, fmt, trust_pickle=False)  # bombs, TorchScript, tar, pickle globals and size, old torch
    if fmt != "torch-zip":
        raise MalformedFileError(f"{path} is a {fmt} file, not a last.pt of collapse-probe train (a torch.save zip "
                                 "archive); start from its weights with --initial-checkpoint instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd archives; the error line says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise MalformedFileError(f"cannot resume from {path}: {one_line(e, 200)}; delete it to start over") from e
