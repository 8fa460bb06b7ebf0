"""Full training state on disk: written atomically, readable with ``torch.load(weights_only=True)``.

    save_training_state(path, state)       # temporary file + fsync + rename: a crash leaves the previous file intact
    state = load_training_state(path)      # dict: model, model_ema, optimizer, scheduler, scaler, epoch, rng, config

The state holds only tensors and plain Python values (RNG states are converted to tensors), so loading it never
unpickles arbitrary objects. ``collapse-probe similarity last.pt`` also reads it (weights under "model").
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MalformedFileError, one_line
from ..outputs import write_file


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


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    write_file(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise MalformedFileError(f"cannot resume from {path}: {one_line(e, 200)}; delete it to start over") from e
