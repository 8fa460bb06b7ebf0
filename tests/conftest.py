"""Shared fixtures: tiny checkpoints written once per session, and a CLI runner in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.loading.save import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker: with -n 2 on 2 cores, two threads each oversubscribe the CPU and every small op
    # waits on a thread barrier (measured: a 32-block micro ViT forward 5 s with 2 threads under load, 0.12 s with 1)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the CLI subprocesses some tests start


@pytest.fixture(scope="session")
def deepvit_ckpt(tmp_path_factory) -> Path:
    """A random-init 3-block DeepViT micro model saved as safetensors with our metadata."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "deepvit_micro_d3.safetensors"
    save_checkpoint(timm.create_model("deepvit_micro", depth=3), path)
    return path


@pytest.fixture(scope="session")
def timm_vit_small_ckpt(tmp_path_factory) -> Path:
    """The acceptance case of issue 2: a random-init timm vit_small_patch16_224 state dict saved with torch.save."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vit_small.pt"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False).state_dict(), path)
    return path


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m collapse_probe ARGS`` in a fresh process, as a user would run it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("COLLAPSE_PROBE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "collapse_probe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
