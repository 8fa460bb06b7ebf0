"""Measured redundancy (probing/redundancy.py), the verdict resting on it, and the calibration's agreement metric.

    PYTHONPATH=. pytest tests/test_redundancy.py -q

Ground truth is planted: a block whose attention branch writes nothing changes no output whatever map it multiplies V
with, and one whose map is the only thing that tells the classes apart changes many.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import collapse_probe as cp
import collapse_probe.models  # noqa: F401
from collapse_probe.metrics.agreement import cluster_intervals, label_agreement
from collapse_probe.metrics.bootstrap import wilson
from collapse_probe.probing.redundancy import MAX_CHANGED, MAX_KL, is_redundant, measure_redundancy
from collapse_probe.probing.result import ProbeResult

X = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _model(depth: int = 4, zero: tuple[int, ...] = (), num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(1)
    model = timm.create_model("vit_micro", depth=depth, num_classes=num_classes).eval()
    with torch.no_grad():
        for b in zero:  # 0-based modules whose attention branch writes nothing
            model.blocks[b].attn.proj.weight.zero_()
            model.blocks[b].attn.proj.bias.zero_()
    return model


def test_the_rule_is_both_bounds_strictly():
    row = {"changed": MAX_CHANGED - 1e-9, "kl": MAX_KL - 1e-9}
    assert is_redundant(row)
    assert not is_redundant({**row, "changed": MAX_CHANGED}) and not is_redundant({**row, "kl": MAX_KL})
    assert not is_redundant({**row, "changed": float("nan")})  # no classifier: no evidence


def test_planted_silent_blocks_are_redundant_and_the_sharing_check_covers_the_last_run():
    red = measure_redundancy(_model(5, zero=(2, 3, 4)), X, batch_size=6)
    rows = {r["block"]: r for r in red["per_block"]}
    assert sorted(rows) == [2, 3, 4, 5] and red["images"] == 12 and red["classifier"]
    for b in (3, 4, 5):  # modules 2-4
        assert rows[b]["changed"] == 0 and rows[b]["kl"] == pytest.approx(0.0, abs=1e-12)
        assert (rows[b]["changed_ci_low"], rows[b]["changed_ci_high"]) == pytest.approx(wilson(0, 12))
    assert {3, 4, 5} <= set(red["blocks"])
    sh = red["sharing"]
    first = min(b for b in range(2, 6) if all(b2 in red["blocks"] for b2 in range(b, 6)))
    assert sh["blocks"] == [first, 5] and sh["source"] == first - 1 and sh["changed"] == 0


def test_a_model_without_a_classifier_is_not_called_redundant():
    model = _model(3, zero=(1, 2), num_classes=0)  # a backbone: features, no predictions
    red = measure_redundancy(model, X, batch_size=6)
    assert not red["classifier"] and red["blocks"] == [] and red["sharing"] is None
    result = cp.probe(model, X, batch_size=6, progress=False)
    s = cp.judge(result)
    assert "(measured)" not in s["verdict"]  # the line falls back to the map rule ...
    assert any("no classifier" in t for t in s["text"])  # ... and says why


def test_probe_measures_by_default_and_the_verdict_round_trips_through_json():
    model = _model(4, zero=(2, 3))
    result = cp.probe(model, X, batch_size=6, progress=False)
    assert result.redundancy is not None and {3, 4} <= set(result.redundancy["blocks"])
    s = cp.judge(result)
    assert s["verdict"].startswith("VERDICT: ") and "(measured)" in s["verdict"]
    rows = result.to_pandas()
    applied = rows[rows.kind == result.applied_kind].set_index("block")
    assert bool(applied.loc[4, "redundant"]) and applied.loc[4, "reuse_changed"] == 0
    back = ProbeResult.from_json(result.to_json())
    assert back.redundancy["blocks"] == result.redundancy["blocks"] and back.redundancy["sharing"] == \
        result.redundancy["sharing"]
    assert cp.judge(back)["verdict"] == s["verdict"]
    maps_only = cp.probe(model, X, batch_size=6, progress=False, intervene=False)
    assert maps_only.redundancy is None and "(measured)" not in cp.judge(maps_only)["verdict"]


def test_label_agreement_closed_form():
    pred = [True, True, False, False, True]
    truth = [True, False, True, False, True]
    a = label_agreement(pred, truth)
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 1, 1, 1)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert a["accuracy"] == pytest.approx(3 / 5)
    assert a["precision_ci"] == wilson(2, 3) and a["recall_ci"] == wilson(2, 3)
    nothing = label_agreement([False, False], [True, False])
    assert np.isnan(nothing["precision"]) and nothing["recall"] == 0.0


def test_cluster_bootstrap_is_degenerate_when_every_cluster_agrees_and_wide_when_they_differ():
    # every cluster: 2 true positives, 1 false positive, 1 false negative -> precision 2/3, recall 2/3 in each
    pred = np.array([True, True, True, False] * 5)
    truth = np.array([True, True, False, True] * 5)
    clusters = np.repeat(np.arange(5), 4)
    ci = cluster_intervals(pred, truth, list(clusters), n_boot=200)
    assert ci["precision"] == pytest.approx((2 / 3, 2 / 3)) and ci["recall"] == pytest.approx((2 / 3, 2 / 3))
    # clusters that disagree (one all right, one all wrong) give a wide interval where Wilson's is narrow
    pred2 = np.array([True] * 40)
    truth2 = np.array([True] * 20 + [False] * 20)
    ci2 = cluster_intervals(pred2, truth2, [0] * 20 + [1] * 20, n_boot=500)
    assert ci2["precision"][0] <= 0.0 + 1e-12 and ci2["precision"][1] >= 1.0 - 1e-12
    lo, hi = wilson(20, 40)
    assert hi - lo < 0.35
