"""Measured redundancy (probing/redundancy.py), the verdict resting on it, and the calibration's agreement metric.

    PYTHONPATH=. pytest tests/test_redundancy.py -q

Ground truth is planted: a block whose attention branch writes nothing changes no output whatever map it multiplies V
with, and one whose map is the only thing that tells the classes apart changes many.
"""
from __future__ import annotations

import re
from pathlib import Path

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


def _calibrate_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "figures" / "calibrate.py"
    spec = importlib.util.spec_from_file_location("calibrate_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_calibration_tables_are_generated_from_the_committed_blocks():
    """figures/calibration: agreement.csv is recomputed from blocks.csv, the README's table from agreement.csv, and
    every precision / recall the top-level README quotes for the calibration is in agreement.csv (a stale or
    hand-edited number fails here)."""
    import pandas as pd

    from collapse_probe.reports.calibration import agreement

    cal = _calibrate_script()
    blocks = pd.read_csv(cal.OUT / "blocks.csv")
    assert set(blocks.model) == {p.stem for p in cal.CKPTS.glob("*_d*.safetensors")}  # every bundled model measured
    committed = pd.read_csv(cal.OUT / "agreement.csv")
    fresh = pd.DataFrame(agreement(blocks))
    pd.testing.assert_frame_equal(fresh.reset_index(drop=True), committed, check_dtype=False, atol=1e-9)
    text = (cal.OUT / "README.md").read_text()
    assert text[text.index(cal.START) + len(cal.START):text.index(cal.END)].strip() == cal.table(committed)
    readme = " ".join((cal.HERE.parent / "README.md").read_text().split())  # quotes may wrap across lines
    quoted = re.findall(r"precision (\d\.\d\d), recall (\d\.\d\d)", readme)
    assert quoted, "the README quotes the calibration's precision and recall"
    pairs = {(f"{r.precision:.2f}", f"{r.recall:.2f}") for r in committed.itertuples()}
    assert len(quoted) >= 3 and set(quoted) <= pairs


def test_skip_baseline_separates_a_block_that_matters_from_one_that_does_not():
    """Planted: in module 2 the attention branch writes nothing (its map is irrelevant) but the MLP matters; in
    modules 3-4 the whole block writes nothing. Reuse is harmless in all three; skipping is harmless only where the
    whole block is silent, and the verdict's baseline sentence names the block that matters."""
    model = _model(5, zero=(2, 3, 4))
    with torch.no_grad():
        for b in (3, 4):
            model.blocks[b].mlp.fc2.weight.zero_()
            model.blocks[b].mlp.fc2.bias.zero_()
        model.blocks[2].mlp.fc2.weight.mul_(50.0)  # module 2's MLP moves the logits: removing the block shows
    red = measure_redundancy(model, X, batch_size=6)
    rows = {r["block"]: r for r in red["per_block"]}
    assert {3, 4, 5} <= set(red["blocks"])
    assert rows[4]["removable"] and rows[5]["removable"] and rows[4]["skip_changed"] == 0
    assert rows[3]["removable"] is False and (rows[3]["skip_changed"] >= MAX_CHANGED or rows[3]["skip_kl"] >= MAX_KL)
    assert 3 not in red["removable"] and {4, 5} <= set(red["removable"])
    for b, r in rows.items():  # the baseline is measured for redundant blocks only
        assert (r["removable"] is None) == (b not in red["blocks"])
    result = cp.probe(model, X, batch_size=6, progress=False)
    text = " ".join(cp.judge(result)["text"])
    assert "Baseline, skipping the block outright (alone)" in text and "the block matters but its own map" in text
    assert "candidates for removal" not in text  # block 3 cannot go, even though blocks 2-5 may share one map
    df = result.to_pandas()
    applied = df[df.kind == result.applied_kind].set_index("block")
    assert applied.loc[5, "removable"] and not applied.loc[3, "removable"]
