"""Plot functions render under Agg from synthetic results and draw exactly their inputs; the figures command works.

    PYTHONPATH=$PWD python -m pytest tests/test_plots.py -x -q
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from collapse_probe.cli import main  # noqa: E402
from collapse_probe.hooks.capture import capture  # noqa: E402
from collapse_probe.loading.save import save_checkpoint  # noqa: E402
from collapse_probe.plots import (  # noqa: E402
    MeanMaps,
    ThetaWeights,
    feature_attention_correlation,
    plot_accuracy_vs_depth,
    plot_attention_maps,
    plot_attention_vs_features,
    plot_cross_head,
    plot_feature_figure,
    plot_feature_heatmap,
    plot_feature_vs_last,
    plot_neighbor_similarity,
    plot_similar_blocks,
    plot_similarity_heatmap,
    plot_theta,
    save_figure,
    write_csv,
)
from collapse_probe.plots.style import read_csv  # noqa: E402
from collapse_probe.probing.result import AttentionStats, FeatureStats, ProbeResult  # noqa: E402


def _sim_from_neighbors(nb: list[float]) -> np.ndarray:
    """[L, L] symmetric matrix whose (i, i-1) entries are ``nb`` and the rest a distinct pattern."""
    L = len(nb) + 1
    m = np.fromfunction(lambda i, j: 0.5 / (1 + abs(i - j)), (L, L))
    np.fill_diagonal(m, 1.0)
    for i, v in enumerate(nb, start=1):
        m[i, i - 1] = m[i - 1, i] = v
    return m


def make_result(nb: list[float], heads: int = 3, kind: str = "probs", seed: int = 0, features: bool = True,
                depth: int | None = None) -> ProbeResult:
    rng = np.random.default_rng(seed)
    L = len(nb) + 1
    sim = _sim_from_neighbors(nb)
    st = AttentionStats(kind=kind, blocks=list(range(L)), names=[f"blocks.{i}.attn.{kind}" for i in range(L)],
                        threshold=0.9, similarity=sim, ratio=sim ** 2, head_similarity=rng.random((L, heads, heads)),
                        cross_head=rng.random(L), effective_rank=rng.random(L) * 10, energy_rank=rng.random(L) * 5)
    feats = None
    if features:
        f = rng.random((L, L))
        f = (f + f.T) / 2
        np.fill_diagonal(f, 1.0)
        feats = FeatureStats(list(range(L)), [f"blocks.{i}.out" for i in range(L)], f, rng.random(L))
    return ProbeResult(attention={kind: st}, features=feats, model={"depth": depth or L},
                       settings={"threshold": 0.9})


def _png_pdf(stem: Path) -> None:
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_save_figure_writes_png_and_pdf_and_nothing_else(tmp_path):
    ax = plot_neighbor_similarity({"m": make_result([0.2, 0.95, 0.97])})
    written = save_figure(ax.figure, tmp_path / "fig.anything")
    assert sorted(p.name for p in written) == ["fig.pdf", "fig.png"]
    _png_pdf(tmp_path / "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]  # no temp files left


def test_neighbor_similarity_draws_each_k_of_each_model(tmp_path):
    a, b = make_result([0.3, 0.6, 0.95, 0.99]), make_result([0.1, 0.2, 0.4, 0.5], seed=1)
    ax = plot_neighbor_similarity({"vit": a, "deepvit": b}, ks=(1, 2, 3), threshold=0.9)
    assert len(ax.lines) == 2 * 3 + 1  # 3 curves per model + threshold line
    for i, res in enumerate((a, b)):
        for j, k in enumerate((1, 2, 3)):
            line = ax.lines[3 * i + j]
            np.testing.assert_array_equal(line.get_xdata(), np.arange(5) + 1)
            np.testing.assert_array_equal(line.get_ydata(), res.attention["probs"].neighbor(k))
    assert ax.lines[0].get_ydata()[1:].tolist() == [0.3, 0.6, 0.95, 0.99]  # k=1: the planted neighbours
    assert np.isnan(ax.lines[2].get_ydata()[:3]).all()  # k=3 undefined for the first three blocks
    assert set(ax.lines[-1].get_ydata()) == {0.9}
    save_figure(ax.figure, tmp_path / "a")
    _png_pdf(tmp_path / "a")
    mixed = make_result([0.1, 0.2, 0.4, 0.5], kind="mixed", seed=1)
    ax = plot_neighbor_similarity({"deepvit": mixed}, ks=(1, 2, 3), threshold=0.9)
    assert len(ax.lines) == 3  # mixed maps alone: no softmax threshold
    with pytest.raises(ValueError, match="by_kind"):  # one axis never holds both kinds
        plot_neighbor_similarity({"vit": a, "deepvit": mixed})


def test_given_axes_are_used_and_returned():
    fig = Figure()
    ax = fig.add_subplot()
    res = make_result([0.5, 0.95])
    assert plot_neighbor_similarity({"m": res}, ks=(1,), ax=ax) is ax
    assert plot_cross_head({"m": res}, ax=ax) is ax
    assert len(fig.axes) == 1 and len(ax.lines) == 1 + 1 + 1 + 1  # curve, threshold, cross-head curve, reference
    new = plot_cross_head({"m": res})
    assert new is not ax and new.figure is not fig


def test_similarity_heatmap_shows_the_matrix(tmp_path):
    res = make_result([0.4, 0.8, 0.95])
    ax = plot_similarity_heatmap(res, reduction="ratio")
    np.testing.assert_array_equal(ax.images[0].get_array(), res.attention["probs"].ratio)
    ax = plot_similarity_heatmap(res)
    np.testing.assert_array_equal(ax.images[0].get_array(), res.attention["probs"].similarity)
    save_figure(ax.figure, tmp_path / "h")
    _png_pdf(tmp_path / "h")


def test_cross_head_draws_cross_head_per_block():
    res = make_result([0.5, 0.6, 0.7], kind="mixed")
    ax = plot_cross_head({"d": res}, reference=0.3)
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3, 4])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), res.attention["mixed"].cross_head)
    assert len(ax.lines) == 1  # the paper's 0.3 is stated for softmax maps: not drawn beside mixed curves alone
    assert ax.get_title().endswith("(mixed)")  # one model: the kind is named in the title
    assert any("not the same scale" in t.get_text() for t in ax.texts)
    probs = make_result([0.5, 0.6, 0.7])
    ax = plot_cross_head({"v": probs}, reference=0.3)
    assert set(ax.lines[1].get_ydata()) == {0.3} and not ax.texts


def test_similar_blocks_vs_depth_counts_and_ratios(tmp_path):
    # depth 4: blocks 3, 4 above 0.9 -> 2 similar; depth 6: 4 similar; deepvit: none
    vit = [make_result([0.5, 0.95, 0.96]), make_result([0.2, 0.5, 0.91, 0.95, 0.99])]
    deep = [make_result([0.1, 0.2, 0.3]), make_result([0.1, 0.2, 0.3, 0.4, 0.5])]
    fams = {"vit": vit[::-1], "deepvit": deep}  # order of results does not matter: sorted by depth
    ax = plot_similar_blocks(fams, "count", reference={16: 5, 32: 15})
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [4, 6])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [2, 3])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [0, 0])
    np.testing.assert_array_equal(ax.lines[2].get_ydata(), [5, 15])
    ax = plot_similar_blocks(fams, "ratio", reference={16: 5, 32: 15})
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [2 / 4, 3 / 6])
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [5 / 16, 15 / 32])
    with pytest.raises(ValueError):
        plot_similar_blocks(fams, "median")


def test_accuracy_vs_depth():
    ax = plot_accuracy_vs_depth({"vit": {16: 78.9, 8: 70.0}, "deepvit": {8: 71.0, 16: 79.1}})
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [8, 16])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [70.0, 78.9])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [71.0, 79.1])


def test_feature_figure_panels_and_correlation(tmp_path):
    res = make_result([0.5, 0.7, 0.9, 0.95])
    axes = plot_feature_figure(res, title="t")
    assert len(axes) == 3 and all(a.figure is axes[0].figure for a in axes)
    np.testing.assert_array_equal(axes[0].lines[0].get_ydata(), res.features.similarity[:, -1])
    np.testing.assert_array_equal(axes[1].images[0].get_array(), res.features.similarity)
    np.testing.assert_array_equal(axes[2].lines[0].get_ydata(), res.attention["probs"].neighbor(1))
    # independent Pearson r over the blocks where the attention curve is defined
    expected = np.corrcoef(res.features.similarity[1:, -1], [0.5, 0.7, 0.9, 0.95])[0, 1]
    r = feature_attention_correlation(res)
    assert r == pytest.approx(expected)
    assert f"{r:.2f}" in axes[2].get_title()
    save_figure(axes[0].figure, tmp_path / "f4")
    _png_pdf(tmp_path / "f4")
    for fn in (plot_feature_vs_last, plot_feature_heatmap, plot_attention_vs_features):
        fig = Figure()
        ax = fig.add_subplot()
        assert fn(res, ax=ax) is ax


def test_correlation_of_linearly_related_curves_is_one():
    res = make_result([0.2, 0.4, 0.6, 0.8])
    res.features.similarity[:, -1] = 3 * res.attention["probs"].similarity[:, 0] - 1  # anything at block 0
    res.features.similarity[1:, -1] = 2 * np.array([0.2, 0.4, 0.6, 0.8]) + 0.1
    assert feature_attention_correlation(res) == pytest.approx(1.0)
    res.features.similarity[1:, -1] = 0.5  # constant: undefined
    assert math.isnan(feature_attention_correlation(res))


def test_attention_maps_grid_one_panel_per_block(tmp_path):
    rng = np.random.default_rng(0)
    maps = MeanMaps("probs", [0, 1, 2, 3, 4], rng.random((5, 7, 7)), count=3)
    axes = plot_attention_maps(maps, title="x", ncols=3)
    assert len(axes) == 5
    top = max(maps.maps.max(), 2 / 7)
    for i, ax in enumerate(axes):
        np.testing.assert_array_equal(ax.images[0].get_array(), maps.maps[i])
        assert ax.images[0].norm is axes[0].images[0].norm  # default: one shared scale
        assert ax.images[0].get_clim() == pytest.approx((0.0, top))
        assert ax.get_title() == f"block {i + 1}"
    assert axes[0].images[0].norm.vcenter == pytest.approx(1 / 7)  # white = uniform attention
    assert sum(a.get_visible() and bool(a.images) for a in axes[0].figure.axes) == 5  # sixth grid cell hidden
    pct = plot_attention_maps(maps, scale="percentile")
    for i, ax in enumerate(pct):
        lo, hi = np.percentile(maps.maps[i], [1, 99])  # each panel its own 1st-99th percentile
        assert ax.images[0].get_clim() == pytest.approx((lo, hi))
        assert ax.get_title() == f"block {i + 1}: {lo:.3g}–{hi:.3g}"  # the range is printed
    own = plot_attention_maps(maps, scale="panel")
    assert [ax.images[0].get_clim() for ax in own] == [(m.min(), m.max()) for m in maps.maps]
    with pytest.raises(ValueError, match="scale"):
        plot_attention_maps(maps, scale="global")
    save_figure(axes[0].figure, tmp_path / "maps")
    _png_pdf(tmp_path / "maps")
    fig = Figure()
    given = fig.subplots(1, 5)
    assert list(plot_attention_maps(maps, axes=given)) == list(given)


def test_theta_from_state_dict_and_heatmaps(tmp_path):
    H = 4
    sd = {f"blocks.{b}.attn.theta.weight": torch.randn(H, H, 1, 1) for b in (1, 3)}
    sd |= {f"blocks.{b}.attn.theta.bias": torch.randn(H) for b in (1, 3)}
    sd["blocks.0.attn.qkv.weight"] = torch.randn(3, 3)
    th = ThetaWeights.from_state_dict(sd)
    assert th.blocks == [1, 3]
    np.testing.assert_allclose(th.weight[1], sd["blocks.3.attn.theta.weight"][:, :, 0, 0].double().numpy())
    np.testing.assert_allclose(th.bias[0], sd["blocks.1.attn.theta.bias"].double().numpy())
    assert ThetaWeights.from_state_dict({"blocks.0.attn.qkv.weight": torch.ones(1)}) is None
    axes = plot_theta(th)
    for i, ax in enumerate(axes):
        np.testing.assert_array_equal(ax.images[0].get_array(), th.weight[i])
        lo, hi = ax.images[0].get_clim()
        assert lo == -hi == -np.abs(th.weight).max()  # one symmetric scale for all blocks
    save_figure(axes[0].figure, tmp_path / "theta")
    _png_pdf(tmp_path / "theta")


def test_csv_round_trip(tmp_path):
    rows = [("a", 1, 0.1234567891234), ("b", 2, math.nan)]
    write_csv(tmp_path / "x.csv", ["model", "block_number", "v"], rows)
    back = read_csv(tmp_path / "x.csv")
    assert back[0] == {"model": "a", "block_number": "1", "v": "0.1234567891234"}
    assert back[1]["v"] == ""


def test_map_accumulator_equals_mean_of_captured_maps():
    from collapse_probe.reports.figures import MapAccumulator

    torch.manual_seed(0)
    model = timm.create_model("deepvit_micro", depth=2).eval()
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)
    acc = MapAccumulator()
    kept: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for x in (x1, x2):
            with capture(model, ("probs", "mixed"), callback=acc, store=True) as cap:
                model(x)
            for name, t in cap.maps.items():
                kept.setdefault(name, []).append(t)
    out = acc.result()
    assert set(out) == {"probs", "mixed"} and out["probs"].blocks == [0, 1] and out["probs"].count == 5
    for kind in ("probs", "mixed"):
        for i in range(2):
            full = torch.cat(kept[f"blocks.{i}.attn.{kind}"])  # [5, H, N, N]
            np.testing.assert_allclose(out[kind].maps[i], full.double().mean(dim=(0, 1)).numpy(), atol=1e-6)
    np.testing.assert_allclose(out["probs"].maps.sum(-1), 1.0, atol=1e-5)  # averaged softmax rows still sum to 1
    for kind in ("probs", "mixed"):  # the first image's per-head maps, kept beside the means: [L, H, N, N]
        first = np.stack([kept[f"blocks.{i}.attn.{kind}"][0][0].numpy() for i in range(2)])
        assert out[kind].first_image.shape == first.shape and first.shape[1] == model.blocks[0].attn.num_heads
        np.testing.assert_allclose(out[kind].first_image, first, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    for name, depth, top1 in (("deepvit_micro", 2, 61.5), ("deepvit_micro", 3, 64.0), ("vit_micro", 2, None)):
        extra = {"eval": {"top1": top1}} if top1 is not None else {}
        save_checkpoint(timm.create_model(name, depth=depth), d / f"{name}_d{depth}.safetensors", extra=extra)
    return d


@pytest.mark.heavy  # ~15 s of CPU, more on a busy machine: three checkpoints, a dozen figures
def test_figures_command_writes_every_figure_with_its_numbers(tiny_checkpoints, tmp_path):
    out = tmp_path / "figs"
    res = CliRunner().invoke(main, ["figures", "--checkpoints", str(tiny_checkpoints / "deepvit_micro_d2.safetensors"),
                                    str(tiny_checkpoints / "deepvit_micro_d3.safetensors"),
                                    str(tiny_checkpoints / "vit_micro_d2.safetensors"),
                                    "--output", str(out), "--num-images", "3", "--no-progress", "--no-pdf"])
    assert res.exit_code == 0, res.output
    stems = ["fig1_accuracy_vs_depth", "fig3b_similar_blocks_vs_depth", "fig3c_cross_head_similarity",
             "fig3a_neighbor_similarity_deepvit_micro_d3", "fig3a_neighbor_similarity_vit_micro_d2",
             "attention_similarity_deepvit_micro_d3", "fig4_feature_similarity_deepvit_micro_d3",
             "fig8_attention_maps_deepvit_micro_d3_probs", "fig8_attention_maps_deepvit_micro_d3_mixed",
             "fig8_attention_maps_vit_micro_d2_probs", "fig8_theta_deepvit_micro_d3",
             "fig8_similarity_vit_vs_deepvit_d2", "threshold_sweep"]
    for stem in stems:  # PDFs are checked by the unit tests above; --no-pdf keeps this test short
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" and not (out / f"{stem}.pdf").exists()
        assert (out / f"{stem}.csv").stat().st_size > 0
    assert not (out / "fig8_theta_vit_micro_d2.png").exists()  # plain ViT has no Theta
    assert not list(tmp_path.glob(".figs.tmp-*"))  # the staging folder is gone
    # the CSV numbers equal the probe results written next to them
    results = {p.stem: ProbeResult.from_json(p.read_text()) for p in (out / "results").glob("*.json")}
    assert set(results) == {"deepvit_micro_d2", "deepvit_micro_d3", "vit_micro_d2"}
    d3 = results["deepvit_micro_d3"]
    rows = [r for r in read_csv(out / "fig3a_neighbor_similarity_deepvit_micro_d3.csv")
            if r["k"] == "1" and r["model"] == "deepvit_micro_d3"]  # the untrained twin's rows follow
    assert [(r["kind"], r["applied"]) for r in rows] == [("probs", "0")] * 3 + [("mixed", "1")] * 3
    got = [float(r["similarity"]) if r["similarity"] else math.nan for r in rows if r["kind"] == "mixed"]
    np.testing.assert_allclose(got, d3.attention["mixed"].neighbor(1), equal_nan=True, rtol=1e-12)
    fig3b = read_csv(out / "fig3b_similar_blocks_vs_depth.csv")
    for label, r in results.items():
        kind = "mixed" if label.startswith("deep") else "probs"
        for reduction in ("mean", "ratio"):
            row, = [x for x in fig3b if (x["model"], x["kind"], x["reduction"]) == (label, kind, reduction)]
            assert int(row["similar_blocks"]) == r.summary(kind, 0.9, 1, reduction)["count"]
            assert int(row["depth"]) == r.depth
    assert {x["reduction"] for x in fig3b if x["family"].startswith("paper")} == {"unpublished"}
    acc = read_csv(out / "fig1_accuracy_vs_depth.csv")
    assert [(r["models"], float(r["top1"]), r["seeds"]) for r in acc] == [("deepvit_micro_d2", 61.5, "1"),
                                                                          ("deepvit_micro_d3", 64.0, "1")]
    fig8 = read_csv(out / "fig8_similarity_vit_vs_deepvit_d2.csv")
    assert sorted({(r["model"], r["kind"]) for r in fig8 if "twin" not in r["model"]}) == [
        ("deepvit_micro_d2", "mixed"), ("deepvit_micro_d2", "probs"), ("vit_micro_d2", "probs")]
    assert {r["model"] for r in fig8 if "twin" in r["model"]} == {"deepvit_micro_d2 (untrained twin)",
                                                                  "vit_micro_d2 (untrained twin)"}  # by default
    theta = read_csv(out / "fig8_theta_deepvit_micro_d3.csv")
    assert len(theta) == 3 * 4 * (4 + 1) and {r["block_number"] for r in theta} == {"1", "2", "3"}  # + bias rows
    assert all(r["init"] == "" for r in theta)  # no seed recorded in these files: final only
    summary = {r["model"]: r for r in read_csv(out / "summary.csv")}
    assert summary["vit_micro_d2"]["family"] == "vit" and summary["deepvit_micro_d3"]["depth"] == "3"
    json.loads((out / "results" / "vit_micro_d2.json").read_text())


def test_figures_from_a_folder_skips_what_it_cannot_draw(tiny_checkpoints, tmp_path):
    only = tmp_path / "in"
    only.mkdir()
    (only / "deepvit_micro_d2.safetensors").write_bytes((tiny_checkpoints / "vit_micro_d2.safetensors").read_bytes())
    out = tmp_path / "figs"
    res = CliRunner().invoke(main, ["figures", "--checkpoints", str(only), "-o", str(out), "--num-images", "2",
                                    "--no-pdf", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "Fig. 1 skipped" in res.output and "ViT-vs-DeepViT similarity skipped" in res.output
    assert "Fig. 3(b) skipped" in res.output and "depth 2" in res.output  # one depth: no "vs depth" figure
    assert (out / "fig3c_cross_head_similarity.png").exists() and not list(out.glob("*.pdf"))
    assert not (out / "fig1_accuracy_vs_depth.png").exists()
    assert not (out / "fig3b_similar_blocks_vs_depth.png").exists()


def test_figures_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "figs"
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["figures", "--checkpoints", str(empty), "-o", str(out)])
    assert res.exit_code == 2 and "no checkpoint files" in res.output and not out.exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    res = CliRunner().invoke(main, ["figures", "--checkpoints", str(bad), "-o", str(out), "--no-progress"])
    assert res.exit_code == 4 and res.output.startswith("error: ") and res.output.count("\n") == 1
    assert not out.exists()
    res = CliRunner().invoke(main, ["figures", "-o", str(out)])
    assert res.exit_code == 2


def test_interrupted_rendering_keeps_previous_files(tiny_checkpoints, tmp_path, monkeypatch):
    from collapse_probe.reports import figure_jobs, figures

    ckpt = tiny_checkpoints / "deepvit_micro_d2.safetensors"
    out = tmp_path / "figs"
    figures.make_figures([ckpt], out, num_images=2, progress=False, formats=("png",))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(figure_jobs, "fig3c", boom)
    with pytest.raises(KeyboardInterrupt):
        figures.make_figures([ckpt], out, num_images=2, progress=False, formats=("png",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs"]  # staging folder removed
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_figures_refuse_a_folder_they_did_not_write(tiny_checkpoints, tmp_path):
    from collapse_probe.errors import BadArgumentError
    from collapse_probe.reports.figures import make_figures

    out = tmp_path / "figs"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    with pytest.raises(BadArgumentError, match="did not write .*README.md"):
        make_figures([tiny_checkpoints / "deepvit_micro_d2.safetensors"], out, num_images=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"] and (out / "README.md").read_text() == "keep me"


def _run(label: str, family: str, depth: int, top1: float | None = None):
    from collapse_probe.reports.figures import ModelRun

    res = make_result([0.5] * (depth - 1), kind="mixed" if family == "deepvit" else "probs", depth=depth)
    maps = {"probs": MeanMaps("probs", list(range(depth)), np.ones((depth, 3, 3)) / 3, 1)}
    theta = ThetaWeights(list(range(depth)), np.ones((depth, 2, 2))) if family == "deepvit" else None
    return ModelRun(label, Path(f"{label}.safetensors"), f"{family}_micro", family, depth, res, maps, theta, top1)


def test_plan_featured_models_and_per_model():
    from collapse_probe.reports.figures import plan_figures

    runs = [_run("v4", "vit", 4, 80.0), _run("v8", "vit", 8, 82.0), _run("d4", "deepvit", 4), _run("d8", "deepvit", 8),
            _run("d16", "deepvit", 16)]
    names, notes = plan_figures(runs)
    names = [n for n, _ in names]
    assert "fig1" in names and not notes
    assert {n.split()[1] for n in names if n.startswith("fig3a")} == {"v8", "d16"}  # deepest of each family
    assert [n for n in names if n.startswith("fig8 d")] == ["fig8 d8"]  # deepest depth both families have
    assert "theta d16" in names and "theta v8" not in names
    names = [n for n, _ in plan_figures(runs, per_model=True)[0]]
    assert {n.split()[1] for n in names if n.startswith("fig3a")} == {"v4", "v8", "d4", "d8", "d16"}
    assert [n for n in names if n.startswith("fig8 d")] == ["fig8 d4", "fig8 d8"]
    jobs, notes = plan_figures([_run("d4", "deepvit", 4)])
    assert len(notes) == 3  # no accuracy, one depth only (no Fig. 3(b)), no ViT/DeepViT pair
    assert not {"fig1", "fig3b"} & {n for n, _ in jobs}
    jobs, notes = plan_figures([_run("v4", "vit", 4, 80.0), _run("d4", "deepvit", 4, 90.0)])  # accuracy, one depth
    assert not {"fig1", "fig3b"} & {n for n, _ in jobs} and "fig8 d4" in {n for n, _ in jobs}
    assert sum("skipped" in n and "depth 4" in n for n in notes) == 2


def test_report_figures_plot_their_inputs():
    from collapse_probe.plots.report import (
        figure_png,
        plot_block_curves,
        plot_rank,
        plot_relative_depth,
    )

    res = make_result([0.5, 0.95, 0.97])
    st = res.attention["probs"]
    ax, tokens = plot_block_curves(res, threshold=0.9)  # the softmax panel, then the token-feature panel
    np.testing.assert_allclose(ax.lines[0].get_ydata()[1:], [0.5, 0.95, 0.97])  # similarity with the previous block
    np.testing.assert_allclose(ax.lines[1].get_ydata(), st.cross_head)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 2, 3, 4])  # blocks numbered from 1, as everywhere
    np.testing.assert_allclose(tokens.lines[0].get_ydata()[1:], np.diag(res.features.similarity, -1))
    np.testing.assert_allclose(plot_similarity_heatmap(res).images[0].get_array(), st.similarity)  # the one heatmap
    np.testing.assert_allclose(plot_cross_head({"a": res}, reference=None).lines[0].get_ydata(), st.cross_head)
    ax = plot_rank(res)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), st.effective_rank)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), st.energy_rank)
    deep = make_result([0.9] * 7, seed=1)
    ax, = plot_relative_depth({"a": res, "b": deep}, threshold=0.9)  # one kind: one panel
    assert [line.get_label() for line in ax.lines[:2]] == ["a (probs)", "b (probs)"]  # each names its map kind
    np.testing.assert_allclose(ax.lines[1].get_xdata(), np.arange(8) / 7)  # 0 = first block, 1 = last
    ax, = plot_relative_depth({"a": res, "c": make_result([0.2, 0.3, 0.4], seed=2)})  # one depth: block numbers
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [1, 2, 3, 4])
    assert ax.get_xlabel() == "block"
    given = Figure().add_subplot()
    assert plot_rank(res, ax=given) is given
    assert figure_png(given.figure)[:8] == b"\x89PNG\r\n\x1a\n"
