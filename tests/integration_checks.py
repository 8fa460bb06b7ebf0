"""Shared by the callback tests: what ``cp.probe`` says about given weights, and logged values checked against it."""
from __future__ import annotations

import pytest
import torch

import collapse_probe as cp

KINDS = ("probs", "mixed")
METRICS = ("sim_prev", "pearson_prev", "entropy", "cross_head")


def expected(model: torch.nn.Module, weights: dict, images: torch.Tensor) -> tuple[dict, dict]:
    """(per-block rows of the verdict's kind by 1-based block number, the verdict) of ``cp.probe`` on these weights."""
    model.load_state_dict(weights)
    res = cp.probe(model, images, kinds=KINDS, progress=False, rank_images=0)
    verdict = cp.judge(res, sweep_thresholds=None)
    df = res.to_pandas()
    return df[df.kind == verdict["kind"]].set_index("block").to_dict("index"), verdict


def check_logged(logged: dict[int, dict], weights: dict[int, dict], model: torch.nn.Module,
                 images: torch.Tensor) -> None:
    """Every logged step's collapse numbers equal the probe of the weights saved at that step."""
    assert logged
    for step, values in logged.items():
        rows, verdict = expected(model, weights[step], images)
        assert values["collapse/similar_blocks"] == verdict["count"]
        assert values["collapse/similar_ratio"] == pytest.approx(verdict["ratio"])
        for b, row in rows.items():
            for metric in METRICS:
                key = f"collapse/{metric}/block_{b:02d}"
                if row[metric] == row[metric]:  # not NaN
                    assert values[key] == pytest.approx(row[metric], rel=1e-5, abs=1e-6), (step, key)
                else:
                    assert key not in values
