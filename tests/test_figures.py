"""Figures that do not mislead: map kinds never share an axis unlabelled, the paper's numbers stay on their own
panels, accuracy has intervals and seed counts, correlations come with their partial, maps and heatmaps are scaled
to their data, Θ is shown against its initialisation, and untrained twins are drawn where given.

    PYTHONPATH=$PWD python -m pytest tests/test_figures.py -x -q

Everything is built by hand in the tests (tiny results, hand-made ``ModelRun``s); only the Θ-initialisation tests
build (tiny) models.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection

import collapse_probe.reports.figure_jobs as fj
from collapse_probe.plots import (
    MeanMaps,
    ThetaWeights,
    feature_attention_correlation,
    feature_attention_partial_correlation,
    plot_accuracy_vs_depth,
    plot_attention_maps,
    plot_cross_head,
    plot_feature_heatmap,
    plot_head_maps,
    plot_neighbor_similarity,
    plot_neighbor_similarity_by_kind,
    plot_paper_similar_blocks,
    plot_similar_blocks,
    plot_similarity_heatmap,
    plot_theta_change,
    wilson_interval,
)
from collapse_probe.plots.depth import PAPER_SIMILAR_BLOCKS
from collapse_probe.plots.style import BASELINE_LABEL, MIXED_NOTE, read_csv
from collapse_probe.reports.figure_inputs import initial_theta, recorded_seed, validation_images
from collapse_probe.reports.figures import ModelRun, plan_figures
from tests.test_plots import make_result

REPO = Path(__file__).resolve().parents[1]


def deep_result(nb_probs: list[float], nb_mixed: list[float], seed: int = 0, depth: int | None = None):
    """A Re-attention result: softmax maps ("probs") and the maps that multiply V ("mixed") in every block."""
    res = make_result(nb_mixed, kind="mixed", seed=seed, depth=depth)
    res.attention["probs"] = make_result(nb_probs, seed=seed + 1, features=False).attention["probs"]
    return res


def run(label: str, family: str, depth: int, top1: float | None = None, baseline: bool = False, **kw) -> ModelRun:
    nb = [0.2 + 0.7 * i / depth + 0.05 * (i % 2) for i in range(depth - 1)]  # a trend and a wiggle
    res = deep_result([0.99] * (depth - 1), [0.05 * (-1) ** i for i in range(depth - 1)], depth=depth) \
        if family == "deepvit" else make_result(nb, depth=depth)
    twin = None
    if baseline:
        twin = deep_result([0.97] * (depth - 1), [0.01] * (depth - 1), seed=5, depth=depth) if family == "deepvit" \
            else make_result([0.5] * (depth - 1), seed=5, depth=depth)
    kinds = ("probs", "mixed") if family == "deepvit" else ("probs",)
    rng = np.random.default_rng(depth)
    maps = {k: MeanMaps(k, list(range(depth)), rng.random((depth, 5, 5)), 3, rng.normal(size=(depth, 2, 5, 5)))
            for k in kinds}
    theta = ThetaWeights(list(range(depth)), rng.normal(size=(depth, 2, 2))) if family == "deepvit" else None
    return ModelRun(label, Path(f"{label}.safetensors"), f"{family}_micro", family, depth, res, maps, theta, top1,
                    baseline=twin, **kw)


@pytest.fixture
def drawn(monkeypatch):
    """The figures the jobs save, by file stem (the files are written as well)."""
    figs: dict[str, object] = {}
    real = fj.save_figure

    def keep(fig, stem, fmts=("png",)):
        figs[Path(stem).name] = fig
        return real(fig, stem, ("png",))
    monkeypatch.setattr(fj, "save_figure", keep)
    return figs


def _legend(ax) -> list[str]:
    return [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]  # long labels are wrapped


def _notes(ax) -> str:
    return " ".join(t.get_text().replace("\n", " ") for t in ax.texts)


def _threshold_lines(ax, value: float) -> list:
    return [ln for ln in ax.lines if len(set(np.asarray(ln.get_ydata(), dtype=float))) == 1
            and float(ln.get_ydata()[0]) == value]


# ---------------------------------------------------------------- 1. kinds never share an axis unlabelled


def test_by_kind_splits_softmax_and_mixed_and_draws_threshold_on_softmax_only():
    vit = make_result([0.5, 0.95, 0.97])
    deep = deep_result([0.99, 0.99, 0.995], [0.1, -0.2, 0.05], seed=3)
    probs_ax, mixed_ax = plot_neighbor_similarity_by_kind({"vit": vit, "deepvit": deep}, ks=(1,), threshold=0.9)
    assert _legend(probs_ax) == ["vit (probs)", "deepvit (probs, before Θ)", "threshold 0.9"]
    assert _legend(mixed_ax) == ["deepvit (mixed)"]
    assert len(_threshold_lines(probs_ax, 0.9)) == 1 and not _threshold_lines(mixed_ax, 0.9)
    np.testing.assert_array_equal(mixed_ax.lines[0].get_ydata(), deep.attention["mixed"].neighbor(1))
    assert MIXED_NOTE in _notes(mixed_ax) and not probs_ax.texts
    lo, hi = mixed_ax.get_ylim()
    assert -0.3 < lo < -0.2 and 0.05 < hi < 0.2  # fitted to the mixed data, not stretched to the 0.9 line
    assert "BatchNorm" in mixed_ax.get_title() and "softmax" in probs_ax.get_title()
    only_vit = plot_neighbor_similarity_by_kind({"vit": vit})
    assert len(only_vit) == 1 and only_vit[0].get_title() == "softmax maps (probs)"


def test_one_axis_refuses_both_kinds_and_a_mixed_axis_says_why_it_has_no_threshold():
    both = {"vit": make_result([0.5, 0.95]), "deep": make_result([0.1, 0.2], kind="mixed")}
    for fn in (plot_neighbor_similarity, plot_cross_head):
        with pytest.raises(ValueError, match="one axis"):
            fn(both)
    with pytest.raises(ValueError, match="one axis"):
        plot_similar_blocks({"vit": [both["vit"]], "deepvit": [both["deep"]]})
    ax = plot_neighbor_similarity({"deep": make_result([0.1, 0.2], kind="mixed")}, ks=(1,), threshold=0.9)
    assert not _threshold_lines(ax, 0.9) and "not drawn" in _notes(ax) and MIXED_NOTE in _notes(ax)
    assert _legend(ax) == ["deep (mixed)"]


def test_fig8_comparison_job_has_one_panel_per_kind(tmp_path, drawn):
    runs = [run("v4", "vit", 4), run("d4", "deepvit", 4)]
    jobs, _ = plan_figures(runs)
    dict(jobs)["fig8 d4"](tmp_path, ("png",))
    fig = drawn["fig8_similarity_vit_vs_deepvit_d4"]
    probs_ax, mixed_ax = [a for a in fig.axes if a.lines]
    assert _legend(probs_ax)[:2] == ["v4 (probs)", "d4 (probs, before Θ)"] and _legend(mixed_ax) == ["d4 (mixed)"]
    assert _threshold_lines(probs_ax, 0.9) and not _threshold_lines(mixed_ax, 0.9)
    rows = read_csv(tmp_path / "fig8_similarity_vit_vs_deepvit_d4.csv")
    assert {(r["model"], r["kind"], r["applied"]) for r in rows} == {("v4", "probs", "1"), ("d4", "probs", "0"),
                                                                     ("d4", "mixed", "1")}


# ---------------------------------------------------------------- 2. Fig. 3(b): paper panel, two reductions


def test_paper_counts_have_their_own_axes():
    ax = plot_paper_similar_blocks("count")
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), sorted(PAPER_SIMILAR_BLOCKS))
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [5, 11, 15])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [0, 0, 0])
    assert "unpublished" in ax.get_title()
    np.testing.assert_allclose(plot_paper_similar_blocks("ratio").lines[0].get_ydata(), [5 / 16, 11 / 24, 15 / 32])


def test_fig3b_one_row_per_kind_both_reductions_paper_apart_and_csv(tmp_path, drawn):
    runs = [run("v4", "vit", 4), run("v8", "vit", 8), run("d4", "deepvit", 4), run("d8", "deepvit", 8)]
    fj.fig3b(runs, tmp_path / "fig3b", ("png",), 0.9)
    fig = drawn["fig3b"]
    assert "unpublished" in fig._suptitle.get_text() and "ratio" in fig._suptitle.get_text()
    ours = [a for a in fig.axes if "Paper" not in a.get_title()]
    paper = [a for a in fig.axes if "Paper" in a.get_title()]
    assert len(ours) == 4 and len(paper) == 1
    assert {a.get_title().split("reduction: ")[1] for a in ours} == {"mean", "ratio"}
    for a in ours:  # one kind per panel, named in its title; no paper marker on the digits axes
        kind = "mixed" if "mixed" in a.get_title() else "probs"
        assert {ln.get_gid() for ln in a.lines} == {kind}
        assert all(set(np.asarray(ln.get_xdata()).tolist()) <= {4, 8} for ln in a.lines)
        assert not any("paper" in ln.get_label() for ln in a.lines)
    mixed_mean = next(a for a in ours if "mixed" in a.get_title() and a.get_title().endswith("mean"))
    assert [ln.get_label() for ln in mixed_mean.lines] == ["deepvit (mixed)"] and "softmax" in _notes(mixed_mean)
    probs_mean = next(a for a in ours if "softmax" in a.get_title() and a.get_title().endswith("mean"))
    assert [ln.get_label() for ln in probs_mean.lines] == ["vit (probs)", "deepvit (probs, before Θ)"]
    for ln, fam in zip(probs_mean.lines, ("vit", "deepvit")):  # y: similar blocks / depth
        want = [r.result.summary("probs", 0.9)["count"] / r.depth for r in runs if r.family == fam]
        np.testing.assert_allclose(ln.get_ydata(), want)
    rows = read_csv(tmp_path / "fig3b.csv")
    assert {"reduction", "entry_cut"} <= set(rows[0])
    for r in runs:
        for reduction in ("mean", "ratio"):
            kind = r.result.applied_kind
            row, = [x for x in rows if (x["model"], x["kind"], x["reduction"]) == (r.label, kind, reduction)]
            assert int(row["similar_blocks"]) == r.result.summary(kind, 0.9, 1, reduction)["count"]
    assert [(x["depth"], x["similar_blocks"]) for x in rows if x["family"] == "paper ViT (ImageNet)"] == [
        ("16", "5"), ("24", "11"), ("32", "15")]
    assert {x["reduction"] for x in rows if x["family"].startswith("paper")} == {"unpublished"}


def test_similar_blocks_reductions_differ_where_the_data_do():
    res = make_result([0.95, 0.95, 0.95])
    res.attention["probs"].ratio[:] = 0.0  # no single cosine above the cut: the "ratio" reading finds nothing
    a = plot_similar_blocks({"vit": [res]}, "count", reduction="mean")
    b = plot_similar_blocks({"vit": [res]}, "count", reduction="ratio")
    assert a.lines[0].get_ydata().tolist() == [3] and b.lines[0].get_ydata().tolist() == [0]


# ---------------------------------------------------------------- 3. Fig. 1: Wilson intervals and seeds


def test_wilson_interval_closed_forms():
    z = 1.959963984540054
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))  # p = 0: [0, z²/(n+z²)]
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z * z), 1.0))
    lo, hi = wilson_interval(5, 10)  # p = 1/2: 1/2 ± z·sqrt(n/4 + z²/4) / (n + z²)
    half = z * math.sqrt(10 / 4 + z * z / 4) / (10 + z * z)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    lo, hi = wilson_interval(332, 360)
    assert lo < 332 / 360 < hi and hi - lo < 0.06
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_fig1_groups_seeds_with_pooled_wilson_bars(tmp_path, drawn):
    runs = [run("v4_s0", "vit", 4, 80.0, val_images=100, val_images_source="metadata eval.val_images", seed=0),
            run("v4_s1", "vit", 4, 90.0, val_images=100, val_images_source="metadata eval.val_images", seed=1),
            run("d4", "deepvit", 4, 95.0, val_images=200, val_images_source="metadata eval.val_images", seed=42),
            run("d8", "deepvit", 8, 93.0)]  # no validation size: a point without a bar
    fj.fig1(runs, tmp_path / "fig1", ("png",))
    rows = {(r["family"], r["depth"]): r for r in read_csv(tmp_path / "fig1.csv")}
    v4 = rows[("vit", "4")]
    assert (v4["seeds"], v4["models"], v4["seed_values"]) == ("2", "v4_s0 v4_s1", "0 1")
    assert float(v4["top1"]) == 85.0 and (v4["correct"], v4["images"]) == ("170", "200")
    lo, hi = wilson_interval(170, 200)
    assert (float(v4["top1_ci_low"]), float(v4["top1_ci_high"])) == pytest.approx((100 * lo, 100 * hi))
    assert rows[("deepvit", "4")]["seeds"] == "1" and rows[("deepvit", "8")]["top1_ci_low"] == ""
    assert rows[("deepvit", "8")]["images_source"] == "not recorded"
    ax = drawn["fig1"].axes[0]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    segs = [s for c in bars for s in c.get_segments()]
    assert len(segs) == 2  # vit d4 and deepvit d4; deepvit d8 has no size, so no bar
    assert any(np.allclose(s, [[4, 100 * lo], [4, 100 * hi]]) for s in segs)
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("2 seeds") == 1 and texts.count("1 seed") == 2
    assert "Wilson" in ax.get_title()


def test_plot_accuracy_intervals_and_seed_labels():
    ax = plot_accuracy_vs_depth({"vit": {4: 80.0}}, intervals={"vit": {4: (70.0, 88.0)}}, seeds={"vit": {4: 3}},
                                per_seed={"vit": {4: [78.0, 80.0, 82.0]}})
    assert ax.collections[0].get_segments()[0].tolist() == [[4.0, 70.0], [4.0, 88.0]]
    assert [t.get_text() for t in ax.texts] == ["3 seeds"]
    assert ax.lines[1].get_ydata().tolist() == [78.0, 80.0, 82.0]  # the seeds themselves, as hollow dots
    assert ax.lines[0].get_label() == "vit, one depth only"  # a "vs depth" line of one point says so


def test_validation_images_from_metadata_or_the_digits_split():
    assert validation_images({"eval": {"val_images": 360}}) == (360, "metadata eval.val_images")
    assert validation_images({"eval": {"images": 50, "val_images": 360}}) == (50, "metadata eval.images")
    n, src = validation_images({"train_config": {"dataset": "digits", "val_fraction": 0.2}})
    assert n == 360 and "val_fraction=0.2" in src  # ceil(0.2 x 1797), scikit-learn's rounding of the test share
    from collapse_probe.loading.images import digits_arrays

    assert len(digits_arrays(0.25)[2]) == validation_images({"train_config": {"dataset": "digits",
                                                                              "val_fraction": 0.25}})[0]
    assert validation_images({"eval": {"val_images": True}}) == (None, "not recorded")
    assert validation_images({}) == (None, "not recorded")


def test_bundled_checkpoints_record_their_validation_size_and_seed():
    from safetensors import safe_open

    with safe_open(str(REPO / "checkpoints" / "vit_micro_d4.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["collapse_probe"])
    assert validation_images(meta) == (360, "metadata eval.val_images") and recorded_seed(meta) == 42


# ---------------------------------------------------------------- 4. Fig. 4: partial correlation given block


def test_partial_correlation_matches_numpy_closed_form():
    res = make_result([0.2, 0.5, 0.4, 0.8, 0.7, 0.9], seed=4)
    f = res.features.similarity[1:, -1]  # block 0 has no previous block, so no attention value
    a = np.array([0.2, 0.5, 0.4, 0.8, 0.7, 0.9])
    b = np.arange(1, 7, dtype=float)

    def resid(y):
        slope, icept = np.polyfit(b, y, 1)
        return y - (slope * b + icept)
    expected = np.corrcoef(resid(f), resid(a))[0, 1]
    assert feature_attention_partial_correlation(res) == pytest.approx(expected, abs=1e-12)
    assert feature_attention_correlation(res) == pytest.approx(np.corrcoef(f, a)[0, 1])
    # two curves that only share a linear trend in the block index: raw r = 1, partial r undefined (no residual)
    lin = make_result([0.2, 0.3, 0.4, 0.5, 0.6], seed=1)
    lin.features.similarity[1:, -1] = 0.1 + 0.05 * np.arange(5)
    assert feature_attention_correlation(lin) == pytest.approx(1.0)
    assert math.isnan(feature_attention_partial_correlation(lin))
    assert math.isnan(feature_attention_partial_correlation(make_result([0.2, 0.3, 0.4])))  # 3 points: undefined


def test_fig4_job_reports_both_correlations(tmp_path, drawn):
    r = run("v6", "vit", 6, baseline=True)
    fj.fig4(r, tmp_path / "fig4", ("png",))
    rows = read_csv(tmp_path / "fig4.csv")
    got = {(x["model"], x["quantity"]): x["value"] for x in rows if "_r" in x["quantity"]}
    assert float(got[("v6", "pearson_r")]) == pytest.approx(feature_attention_correlation(r.result))
    partial = feature_attention_partial_correlation(r.result)
    assert np.isfinite(partial) and float(got[("v6", "partial_r_given_block")]) == pytest.approx(partial)
    assert ("v6 (untrained twin)", "partial_r_given_block") in got
    title = drawn["fig4"].axes[2].get_title()
    assert "partial r | block" in title and f"{feature_attention_correlation(r.result):.2f}" in title


# ---------------------------------------------------------------- 5. Fig. 8 maps: per-panel scale, cls, single heads


def test_attention_maps_mark_the_class_token():
    maps = MeanMaps("probs", [0, 1], np.random.default_rng(0).random((2, 17, 17)), 4)
    axes = plot_attention_maps(maps)  # 17 tokens = 16 patches + a class token (guessed)
    for ax in axes:
        assert {float(ln.get_xdata()[0]) for ln in ax.lines if ln.get_xdata()[0] == ln.get_xdata()[-1]} == {0.5}
        assert [t.get_text() for t in ax.get_xticklabels()] == ["cls"]
    assert not plot_attention_maps(maps, prefix_tokens=0)[0].lines  # told there is none: nothing marked


def test_head_maps_of_one_image_on_one_symmetric_scale():
    rng = np.random.default_rng(1)
    first = rng.normal(size=(3, 2, 5, 5))
    maps = MeanMaps("mixed", [0, 1, 2], first.mean(axis=1), 7, first)
    axes = plot_head_maps(maps)
    assert len(axes) == 6 and axes[3].get_title() == "block 2 h1"
    np.testing.assert_array_equal(axes[3].images[0].get_array(), first[1, 1])
    v = np.percentile(np.abs(first), 99)  # one scale for every block and head, centred at 0
    assert all(ax.images[0].get_clim() == pytest.approx((-v, v)) for ax in axes)
    one = plot_head_maps(maps, heads=[1], scale="percentile")  # the per-panel scale stays on request
    assert len(one) == 3 and one[0].get_title() == f"block 1: ±{np.percentile(np.abs(first[0, 1]), 99):.2g}"
    with pytest.raises(ValueError):
        plot_head_maps(maps, heads=[2])
    with pytest.raises(ValueError, match="first_image"):
        plot_head_maps(MeanMaps("mixed", [0], first[:1, 0], 1))


def test_maps_job_shows_single_heads_for_mixed_and_means_for_probs(tmp_path, drawn):
    r = run("d3", "deepvit", 3)
    fj.maps(r, "mixed", tmp_path / "mixed", ("png",))
    fj.maps(r, "probs", tmp_path / "probs", ("png",))
    mixed = drawn["mixed"]
    assert "one image" in mixed._suptitle.get_text() and "all 2 heads" in mixed._suptitle.get_text()
    panels = [a for a in mixed.axes if a.images]
    assert len(panels) == 3 * 2
    np.testing.assert_array_equal(panels[1].images[0].get_array(), r.maps["mixed"].first_image[0, 1])
    rows = read_csv(tmp_path / "mixed.csv")
    assert len(rows) == 3 * 2 * 5 and {x["head"] for x in rows} == {"0", "1"} and rows[0]["image"] == "first"
    assert "mean over heads" in drawn["probs"]._suptitle.get_text()
    assert {x["head"] for x in read_csv(tmp_path / "probs.csv")} == {"mean"}
    big = run("d40", "deepvit", 40)  # 40 blocks x 2 heads > 64 panels: head 0 only, said in the title
    fj.maps(big, "mixed", tmp_path / "big", ("png",))
    assert "head 0 of 2" in drawn["big"]._suptitle.get_text()
    assert len([a for a in drawn["big"].axes if a.images]) == 40


# ---------------------------------------------------------------- 6. Θ: final vs init


def _tiny_deepvit_meta(seed: int):
    from collapse_probe.loading.save import model_metadata
    from collapse_probe.train.config import resolve_config
    from collapse_probe.train.engine import build_model
    from collapse_probe.train.state import seed_everything

    cfg = resolve_config("digits", model="deepvit_micro", model_args={"depth": 2, "patch_size": 8}, seed=seed)
    seed_everything(cfg.seed)  # exactly what the trainer does before building its model
    model = build_model(cfg, 10)
    return {**model_metadata(model), "train_config": cfg.to_dict()}, ThetaWeights.from_state_dict(model.state_dict())


def test_initial_theta_is_what_the_trainer_built():
    meta, theta_at_init = _tiny_deepvit_meta(7)
    torch.manual_seed(123)
    before = (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy())
    got, note = initial_theta(meta, theta_at_init)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])  # the caller's random streams are untouched
    assert "seed=7" in note
    np.testing.assert_array_equal(got.weight, theta_at_init.weight)
    np.testing.assert_array_equal(got.bias, theta_at_init.bias)
    other, _ = initial_theta({**meta, "train_config": {**meta["train_config"], "seed": 8}}, theta_at_init)
    assert not np.allclose(other.weight, theta_at_init.weight)  # the seed matters: not a constant init
    none, why = initial_theta({**meta, "train_config": {}}, theta_at_init)
    assert none is None and "no training seed" in why


def test_bundled_deepvit_theta_moved_little_from_its_recreated_init():
    from safetensors import safe_open

    with safe_open(str(REPO / "checkpoints" / "deepvit_micro_d4.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["collapse_probe"])
        names = [k for k in f.keys() if ".theta." in k]  # noqa: SIM118 (a safetensors handle, not a dict)
        final = ThetaWeights.from_state_dict({k: f.get_tensor(k) for k in names})
    init, _ = initial_theta(meta, final)
    assert np.all(final.relative_change(init) < 0.2)  # the right init: a few percent (measured 2-5%)
    wrong, _ = initial_theta({**meta, "train_config": {**meta["train_config"], "seed": 0}}, final)
    assert np.all(final.relative_change(wrong) > 0.5)  # a wrong seed's init is unrelated


def test_theta_change_plot_and_job(tmp_path, drawn):
    rng = np.random.default_rng(2)
    init = ThetaWeights([0, 1, 2], rng.normal(size=(3, 2, 2)), rng.normal(size=(3, 2)))
    final = ThetaWeights([0, 1, 2], init.weight + 0.1 * rng.normal(size=(3, 2, 2)), init.bias + 0.01)
    axes = plot_theta_change(final, init)
    rel = [np.linalg.norm(final.weight[i] - init.weight[i]) / np.linalg.norm(init.weight[i]) for i in range(3)]
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), rel)
    np.testing.assert_array_equal(axes[0].lines[0].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(axes[1 + 3 * 2 + 2].images[0].get_array(), final.weight[2] - init.weight[2])
    r = run("d3", "deepvit", 3, theta_init=init, theta_init_note="re-created from train_config.seed=1")
    r.theta = final
    fj.theta(r, tmp_path / "theta", ("png",))
    rows = read_csv(tmp_path / "theta.csv")
    assert {"final", "init", "change", "relative_change_block"} <= set(rows[0])
    w = [x for x in rows if x["input_head"] != "bias"]
    assert len(w) == 3 * 2 * 2 and len(rows) == 3 * 2 * 3
    x = w[5]  # block 2, output head 0, input head 1
    assert float(x["final"]) - float(x["init"]) == pytest.approx(float(x["change"]))
    assert float(x["relative_change_block"]) == pytest.approx(rel[1])
    assert "initialisation" in drawn["theta"]._suptitle.get_text()
    r.theta_init, r.theta_init_note = None, "the checkpoint records no training seed"
    fj.theta(r, tmp_path / "theta2", ("png",))
    assert "not shown: the checkpoint records no training seed" in drawn["theta2"]._suptitle.get_text()
    assert all(x["init"] == "" for x in read_csv(tmp_path / "theta2.csv"))


# ---------------------------------------------------------------- 7. heatmaps fitted to the off-diagonal range


def test_similarity_heatmaps_span_the_off_diagonal_range():
    res = make_result([0.4, 0.8, 0.95])
    m = res.attention["probs"].similarity
    off = m[~np.eye(4, dtype=bool)]
    ax = plot_similarity_heatmap(res)
    assert ax.images[0].get_clim() == (off.min(), off.max()) and off.max() < 1.0
    label = ax.figure.axes[-1].get_ylabel()  # the colour bar
    assert f"{off.min():.3g}" in label and f"{off.max():.3g}" in label
    ax = plot_feature_heatmap(res)
    f = res.features.similarity
    off = f[~np.eye(4, dtype=bool)]
    assert ax.images[0].get_clim() == (off.min(), off.max())


def test_audit_heatmap_uses_the_fitted_scale(monkeypatch):
    import collapse_probe.plots.similarity as psim
    from collapse_probe.reports import audit

    seen = []
    real = psim.plot_similarity_heatmap

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]
    monkeypatch.setattr(psim, "plot_similarity_heatmap", spy)
    res = make_result([0.4, 0.8, 0.95])
    audit._figures(res, 0.9, 1, "mean")
    m = res.attention["probs"].similarity
    off = m[~np.eye(4, dtype=bool)]
    assert seen and seen[0].images[0].get_clim() == (off.min(), off.max())


# ---------------------------------------------------------------- 8. untrained twins


def _twin_lines(ax) -> list:
    return [ln for ln in ax.lines if BASELINE_LABEL in str(ln.get_label())]


def test_untrained_twin_is_drawn_grey_dashed_and_written(tmp_path, drawn):
    runs = [run("v4", "vit", 4, baseline=True), run("d4", "deepvit", 4, baseline=True), run("v8", "vit", 8)]
    fj.fig3a([runs[0]], runs, tmp_path / "fig3a", ("png",), 0.9, title="t")
    ax = next(a for a in drawn["fig3a"].axes if a.lines)
    twin, = _twin_lines(ax)
    assert twin.get_linestyle() == "--" and twin.get_color() == "0.55"
    np.testing.assert_array_equal(twin.get_ydata(), runs[0].baseline.attention["probs"].neighbor(1))
    rows = read_csv(tmp_path / "fig3a.csv")
    assert {x["model"] for x in rows} == {"v4", "v4 (untrained twin)"}

    fj.fig3a(runs[:2], runs, tmp_path / "fig8", ("png",), 0.9, ks=(1,))
    probs_ax, mixed_ax = [a for a in drawn["fig8"].axes if a.lines]
    assert [ln.get_label() for ln in _twin_lines(mixed_ax)] == ["untrained twin"]  # in its kind's panel, alone
    np.testing.assert_array_equal(_twin_lines(mixed_ax)[0].get_ydata(), runs[1].baseline.attention["mixed"]
                                  .neighbor(1))
    assert [ln.get_label() for ln in _twin_lines(probs_ax)] == ["v4: untrained twin", "d4: untrained twin"]

    fj.fig3b(runs, tmp_path / "fig3b", ("png",), 0.9)
    ax = next(a for a in drawn["fig3b"].axes if a.get_title().endswith("reduction: mean"))
    hollow = [ln for ln in ax.lines if BASELINE_LABEL in ln.get_label()]
    assert [ln.get_label() for ln in hollow] == ["vit: untrained twin", "deepvit: untrained twin"]
    assert all(ln.get_markerfacecolor() == "none" and ln.get_linestyle() == "None" for ln in hollow)
    assert hollow[0].get_xdata().tolist() == [4]  # v8 has no twin
    assert hollow[0].get_ydata().tolist() == [runs[0].baseline.summary("probs", 0.9)["count"] / 4]
    assert "v4 (untrained twin)" in {x["model"] for x in read_csv(tmp_path / "fig3b.csv")}

    fj.fig3c(runs, runs, tmp_path / "fig3c", ("png",))
    probs_ax, mixed_ax = drawn["fig3c"].axes
    assert len(_twin_lines(probs_ax)) == 2 and all(ln.get_linestyle() == "--" for ln in _twin_lines(probs_ax))
    assert [ln.get_label() for ln in _twin_lines(mixed_ax)] == ["untrained twin"]
    rows = read_csv(tmp_path / "fig3c.csv")
    assert {(x["model"], x["kind"], x["applied"]) for x in rows if "twin" in x["model"]} == {
        ("v4 (untrained twin)", "probs", "1"), ("d4 (untrained twin)", "probs", "0"),
        ("d4 (untrained twin)", "mixed", "1")}

    fj.fig4(runs[0], tmp_path / "fig4", ("png",))
    axes = drawn["fig4"].axes
    assert len(_twin_lines(axes[0])) == 1 and len(_twin_lines(axes[2])) == 1
    np.testing.assert_array_equal(_twin_lines(axes[0])[0].get_ydata(), runs[0].baseline.features.similarity[:, -1])

    fj.summary(runs, tmp_path / "summary.csv", 0.9)
    assert [x["model"] for x in read_csv(tmp_path / "summary.csv")] == [
        "v4", "v4 (untrained twin)", "v8", "d4", "d4 (untrained twin)"]


def test_no_baseline_no_twin_anywhere(tmp_path, drawn):
    runs = [run("v4", "vit", 4), run("d4", "deepvit", 4)]
    assert all(r.baseline is None for r in runs)  # the field's default
    for name, job in plan_figures(runs)[0]:
        job(tmp_path, ("png",))
    for fig in drawn.values():
        assert not any(_twin_lines(a) for a in fig.axes)
    for csv in tmp_path.glob("*.csv"):  # no twin row (the verdict column may say that none was measured)
        assert "(untrained twin)" not in csv.read_text()


def test_cross_head_reference_only_on_the_softmax_panel():
    from collapse_probe.plots import plot_cross_head_by_kind

    probs_ax, mixed_ax = plot_cross_head_by_kind({"v": make_result([0.5, 0.6]),
                                                  "d": deep_result([0.9, 0.9], [0.1, 0.2])})
    assert _legend(probs_ax) == ["v (probs)", "d (probs, before Θ)", "paper: below 0.3 (softmax maps)"]
    assert _legend(mixed_ax) == ["d (mixed)"] and not _threshold_lines(mixed_ax, 0.3)
    assert MIXED_NOTE in _notes(mixed_ax) and not probs_ax.texts


def test_measure_checkpoint_reads_size_seed_and_recreates_theta_init(tmp_path):
    from collapse_probe.loading.save import save_checkpoint
    from collapse_probe.reports.figures import measure_checkpoint
    from collapse_probe.train.config import resolve_config
    from collapse_probe.train.engine import build_model
    from collapse_probe.train.state import seed_everything

    cfg = resolve_config("digits", model="deepvit_micro", model_args={"depth": 2, "patch_size": 8}, seed=3)
    seed_everything(cfg.seed)
    model = build_model(cfg, 10)
    init = ThetaWeights.from_state_dict(model.state_dict())
    with torch.no_grad():  # "training": Θ moves by a known amount
        for blk in model.blocks:
            blk.attn.theta.weight.add_(0.01)
    path = tmp_path / "deepvit_micro_d2.safetensors"
    save_checkpoint(model, path, extra={"eval": {"top1": 50.0, "val_images": 40}, "train_config": cfg.to_dict()})
    r = measure_checkpoint(path, "d2", num_images=2, progress=False)
    assert (r.top1, r.val_images, r.val_images_source, r.seed) == (50.0, 40, "metadata eval.val_images", 3)
    np.testing.assert_allclose(r.theta_init.weight, init.weight, atol=1e-7)
    np.testing.assert_allclose(r.theta.weight - r.theta_init.weight, 0.01, atol=1e-6)
    assert r.maps["mixed"].first_image.shape == (2, 4, 17, 17)
    assert r.baseline is not None  # probe's default, as the commands': the untrained twin is measured


def test_threshold_sweep_plots_each_model_and_its_twin_from_the_verdict_rows():
    from collapse_probe.plots.depth import plot_threshold_sweep

    rows = [{"threshold": t, "count_mean": c, "twin_count_mean": tc, "count_ratio": 0, "twin_count_ratio": None}
            for t, c, tc in ((0.8, 5, 7), (0.9, 3, 6), (0.98, 1, 2))]
    ax = plot_threshold_sweep({"m": rows}, "mean")
    solid, dashed = ax.lines
    assert list(solid.get_ydata()) == [5, 3, 1] and list(dashed.get_ydata()) == [7, 6, 2]
    assert dashed.get_linestyle() == "--" and "untrained twin" in dashed.get_label()
    assert len(plot_threshold_sweep({"m": rows}, "ratio").lines) == 1  # no twin numbers: no twin line


def test_measures_figure_draws_the_twin_beside_each_measure_with_1_based_blocks():
    import timm

    import collapse_probe.models  # noqa: F401
    from collapse_probe.plots.measures import PANELS, plot_measures_figure
    from collapse_probe.probing.run import probe

    r = probe(timm.create_model("vit_micro", depth=3), torch.randn(3, 3, 32, 32), progress=False, baseline=True)
    axes = plot_measures_figure(r)
    assert len(axes) == len(PANELS)
    entropy = axes[[k for k, _ in PANELS].index("entropy")]
    trained, twin = entropy.lines
    assert list(trained.get_xdata()) == [1, 2, 3] and twin.get_label() == "untrained twin"
    np.testing.assert_allclose(twin.get_ydata(), r.baseline.attention["probs"].entropy)


# ---------------------------------------------------------------- 9. one rule for every figure (plots.kinds, style)


def _rendered(fig):
    """Lay ``fig`` out and draw it (Agg), so that window extents are final; returns the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _overlap(a, b) -> float:
    """Area (px²) of the intersection of two display boxes."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def _data_axes(fig) -> list:
    return [a for a in fig.axes if a.get_visible() and (a.lines or a.images or a.collections)]


def assert_legends_off_the_data(fig) -> int:
    """Every legend (an axes' or the figure's) lies inside the figure and covers no axes that draws data; returns
    how many legends there are."""
    r = _rendered(fig)
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None] + list(fig.legends)
    fig_box = fig.bbox
    for leg in legends:
        box = leg.get_window_extent(r)
        assert box.x0 >= fig_box.x0 - 1 and box.x1 <= fig_box.x1 + 1 and box.y0 >= fig_box.y0 - 1, "legend clipped"
        for ax in _data_axes(fig):
            assert _overlap(box, ax.get_window_extent(r)) < 1.0, (
                f"legend {[t.get_text() for t in leg.get_texts()]} covers the data of '{ax.get_title()}'")
    return len(legends)


def assert_block_ticks(ax, last: int, axis: str = "x") -> None:
    """Ticks on a block axis: 1-based integer positions 1..``last`` starting at block 1, labelled with their number;
    the axis does not reach block 0."""
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    labels = [t.get_text() for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())]
    assert list(ticks) == [int(t) for t in ticks] and ticks[0] == 1 and ticks[-1] <= last, list(ticks)
    assert all(lab in ("", str(int(t))) for lab, t in zip(labels, ticks)), labels
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    assert lo > 0 and hi < last + 1


def _panel_kind(ax) -> str:
    """The kind a panel is titled with (``plots.kinds.PANEL_TITLES``), else "other"."""
    from collapse_probe.plots.kinds import PANEL_TITLES

    return next((k for k, t in PANEL_TITLES.items() if t in ax.get_title()), "other")


def assert_one_kind_per_panel(axes, threshold: float | None = 0.9) -> None:
    """Each panel holds curves of its own kind only (gid), the threshold line only on the softmax panel, a note on
    the mixed one."""
    for ax in axes:
        kind = _panel_kind(ax)
        if kind == "other":
            continue
        curves = {ln.get_gid() for ln in ax.lines if ln.get_gid() != "threshold"}
        assert curves == {kind}, (ax.get_title(), curves)
        thresholds = [ln for ln in ax.lines if ln.get_gid() == "threshold"]
        if kind == "mixed":
            assert not thresholds and MIXED_NOTE in _notes(ax)
        elif threshold is not None:
            assert [float(ln.get_ydata()[0]) for ln in thresholds] == [threshold]


def _deep32(seed: int = 0):
    return deep_result([0.99] * 31, [0.05 * (-1) ** i for i in range(31)], seed=seed)


def test_block_numbers_are_1_based_and_readable_at_32_blocks():
    from collapse_probe.plots.style import block_numbers

    assert block_numbers(8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert block_numbers(16) == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    assert block_numbers(32) == [1, 4, 8, 12, 16, 20, 24, 28, 32]
    assert block_numbers(24) == [1, 4, 8, 12, 16, 20, 24] and block_numbers(1) == [1]


def test_kind_panels_legends_and_ticks_of_the_curve_figures():
    from collapse_probe.plots import plot_cross_head_by_kind
    from collapse_probe.plots.report import plot_block_curves, plot_rank, plot_relative_depth

    vit = make_result([0.5 + i / 80 for i in range(31)])
    deep = _deep32()
    twins = {"vit": make_result([0.9] * 31, seed=7), "deepvit": deep_result([0.97] * 31, [0.01] * 31, seed=8)}
    figures = {
        "neighbour": plot_neighbor_similarity_by_kind({"vit": vit, "deepvit": deep}, baselines=twins),
        "cross-head": plot_cross_head_by_kind({"vit": vit, "deepvit": deep}, baselines=twins),
        "compare": plot_relative_depth({"vit": vit, "deepvit": deep}, threshold=0.9),
    }
    deep.baseline = twins["deepvit"]
    figures["audit curves"] = plot_block_curves(deep, threshold=0.9)
    for name, axes in figures.items():
        assert [_panel_kind(a) for a in axes][:2] == ["probs", "mixed"], name  # softmax first, then mixed
        assert_one_kind_per_panel(axes, threshold=0.3 if name == "cross-head" else 0.9)
        assert assert_legends_off_the_data(axes[0].figure) == len(axes), name  # one legend per panel, outside
        for ax in axes:
            assert_block_ticks(ax, 32)
    rank = plot_rank(deep)
    assert assert_legends_off_the_data(rank.figure) == 1
    assert_block_ticks(rank, 32)
    probs_ax = figures["neighbour"][0]  # a Re-attention model's softmax maps sit beside ViT's, named as such
    assert [t for t in _legend(probs_ax) if t.endswith("k=1")][:2] == ["vit (probs), k=1",
                                                                        "deepvit (probs, before Θ), k=1"]


def test_feature_figure_labels_every_curve_in_one_legend_under_the_panels():
    from collapse_probe.plots import plot_feature_figure

    res = make_result([0.5 + i / 80 for i in range(31)])
    axes = plot_feature_figure(res, baseline=make_result([0.9] * 31, seed=3), title="t")
    fig = axes[0].figure
    assert assert_legends_off_the_data(fig) == 1 and len(fig.legends) == 1
    texts = [t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts()]
    assert "token features, trained" in texts and "untrained twin" in texts  # the curve that had no label
    for ax in axes[:3:2]:
        assert all(not ln.get_label().startswith("_") and ln.get_label() in texts for ln in ax.lines)
        assert_block_ticks(ax, 32)
    assert_block_ticks(axes[1], 32)
    assert_block_ticks(axes[1], 32, axis="y")


def test_map_grid_one_scale_one_colour_bar_and_a_near_uniform_map_looks_pale():
    n = 17
    rng = np.random.default_rng(0)
    near = np.full((n, n), 1 / n) * (1 + 0.07 * rng.choice([-1.0, 1.0], size=(n, n)))  # uniform ±7 %
    sharp = np.full((n, n), 0.2 / (n - 1))
    sharp[:, 3] = 0.8  # every query on one key: rows still sum to 1
    axes = plot_attention_maps(MeanMaps("probs", list(range(32)), np.stack([near, sharp] * 16), 4))
    fig = axes[0].figure
    bars = [a for a in fig.axes if a not in list(axes) and a.get_visible()]
    assert len(bars) == 1  # one colour bar for the grid
    label = bars[0].get_xlabel().replace("\n", " ")
    assert "one scale for all blocks" in label and f"1/N = 1/{n}" in label
    norm = axes[0].images[0].norm
    assert all(ax.images[0].norm is norm for ax in axes) and norm.vmin == 0 and norm.vmax == pytest.approx(0.8)
    assert np.abs(norm(near) - 0.5).max() < 0.04  # ±7 % around uniform: pale, close to white
    assert norm(sharp).max() == pytest.approx(1.0)  # the sharp map reaches the end of the scale
    assert [ax.get_title() for ax in axes[:2]] == ["block 1", "block 2"]
    signed = rng.normal(size=(8, n, n))
    axes = plot_attention_maps(MeanMaps("mixed", list(range(8)), signed, 4))
    lo, hi = axes[0].images[0].get_clim()
    assert lo == -hi and hi == pytest.approx(np.percentile(np.abs(signed), 99))  # diverging around 0, shared
    assert all(ax.images[0].get_clim() == (lo, hi) for ax in axes)
    bar, = [a for a in axes[0].figure.axes if a not in list(axes) and a.get_visible()]
    assert "white = 0" in bar.get_xlabel().replace("\n", " ")


def test_every_job_follows_the_rule(tmp_path, drawn):
    """Every figure of the plan: curves labelled and in a legend, legends off the data, one kind per kind panel,
    one colour bar per map grid, 1-based block ticks."""
    runs = [run("v4", "vit", 4, 80.0, baseline=True), run("v8", "vit", 8, 82.0),
            run("d4", "deepvit", 4, 90.0, baseline=True), run("d8", "deepvit", 8, 91.0, baseline=True)]
    for name, job in plan_figures(runs)[0]:
        job(tmp_path, ("png",))
    assert {"fig1_accuracy_vs_depth", "fig3b_similar_blocks_vs_depth", "threshold_sweep",
            "fig3c_cross_head_similarity", "fig8_similarity_vit_vs_deepvit_d8"} <= set(drawn)
    for stem, fig in drawn.items():
        assert_legends_off_the_data(fig)
        legend_texts = {t.get_text().replace("\n", " ") for leg in [a.get_legend() for a in fig.axes]
                        + list(fig.legends) if leg is not None for t in leg.get_texts()}
        for ax in fig.axes:
            if ax.images or len(ax.lines) < 2:  # map panels mark the class token with lines; one curve: its y label
                continue
            for ln in ax.lines:
                assert not ln.get_label().startswith("_") and ln.get_label() in legend_texts, (stem, ln.get_label())
        panels = [a for a in fig.axes if a.lines and _panel_kind(a) != "other"]
        assert_one_kind_per_panel(panels, threshold=None)
        for ax in panels:
            if _panel_kind(ax) == "mixed":
                assert not _threshold_lines(ax, 0.9) and not _threshold_lines(ax, 0.3), stem
        if stem.startswith("fig8_attention_maps"):
            grid = [a for a in fig.axes if a.images and a.get_title().startswith("block")]
            bars = [a for a in fig.axes if a.get_visible() and a not in grid]
            assert len(bars) == 1 and len({a.images[0].get_clim() for a in grid}) == 1, stem
        if stem.startswith(("fig3a", "fig8_similarity", "fig3c", "fig4", "block_measures")):
            last = max(r.depth for r in runs if stem.endswith(r.label)) if stem.startswith(("fig3a", "fig4",
                                                                                          "block_m")) else 8
            for ax in fig.axes:
                if ax.lines and ax.get_xlabel() in ("block", ""):
                    assert_block_ticks(ax, last)
