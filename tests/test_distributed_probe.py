"""``torchrun --nproc-per-node 2 -m collapse_probe similarity`` (gloo, CPU) gives the single-process result."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.distributed import shard_count, shard_indices
from collapse_probe.loading.save import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,world", [(7, 2), (2, 3), (10, 4), (0, 2)])
def test_shards_partition_the_images_without_duplicates(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [shard_count(n, r, world) for r in range(world)] == [len(s) for s in shards]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("COLLAPSE_PROBE_DEBUG", None)
    return env


ATTENTION = ("similarity", "ratio", "head_similarity", "cross_head", "effective_rank", "energy_rank", "entropy",
             "tv_uniform", "cosine_floor", "pearson", "row_cosine", "row_jsd_prev", "matched", "rank1_residual",
             "attention_distance", "attention_distance_heads")


def _arrays(d: dict) -> dict:
    out = {f"{k}.{name}": np.array(v[name], dtype=float) for k, v in d["attention"].items()
           for name in ATTENTION if v[name] is not None}
    out.update({f"features.{n}": np.array(d["features"][n], dtype=float)
                for n in ("similarity", "residual", "token_uniformity", "cka")})
    # per-image rows are gathered, not summed: same rows in the same image order as one process
    out.update({f"{k}.per_image.{n}": np.array(rows, dtype=float) for k, v in d["attention"].items()
                for n, rows in v["per_image"].items()})
    out.update({f"features.per_image.{n}": np.array(rows, dtype=float)
                for n, rows in d["features"]["per_image"].items()})
    return out


@pytest.mark.heavy
def test_torchrun_two_ranks_equal_single_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    torch.manual_seed(0)
    ckpt = tmp_path / "deepvit_micro_d3.safetensors"
    save_checkpoint(timm.create_model("deepvit_micro", depth=3), ckpt)
    # 7 images: the ranks get 4 and 3 (no padding duplicate); rank images capped at 5 globally
    args = ["similarity", str(ckpt), "--num-images", "7", "--batch-size", "2", "--rank-images", "5",
            "--format", "json", "--no-progress", "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "collapse_probe", *args, "-o", str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "collapse_probe", *args,
                            "-o", str(tmp_path / "two.json")], capture_output=True, text=True, env=_env(),
                           timeout=300, cwd=tmp_path)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stderr.count("wrote ") == 1  # only rank 0 writes
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    a, b = _arrays(one), _arrays(two)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=1e-6, err_msg=key)
    assert two["settings"]["world_size"] == 2 and one["summary"] == two["summary"]
