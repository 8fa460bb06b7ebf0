"""The verdict engine and what it stands on: bootstrap intervals, Wilson intervals, the untrained twin.

    PYTHONPATH=. pytest tests/test_verdict.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import collapse_probe.models  # noqa: F401  (registers our presets)
from collapse_probe.metrics import bootstrap
from collapse_probe.probing.baseline import recalibrate_bn, untrained_twin
from collapse_probe.probing.blocks import block_rows
from collapse_probe.probing.run import probe
from collapse_probe.probing.verdict import judge


def test_wilson_matches_the_closed_form():
    # successes 0 of n: the upper bound is z^2 / (n + z^2) exactly
    z = 1.959963984540054
    lo, hi = bootstrap.wilson(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z * z / (20 + z * z), rel=1e-9)
    lo, hi = bootstrap.wilson(50, 100)  # symmetric around 1/2, half-width z sqrt(1/4n + z^2/4n^2) / (1 + z^2/n)
    half = z * math.sqrt(0.25 / 100 + z * z / (4 * 100**2)) / (1 + z * z / 100)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-9)
    assert all(math.isnan(v) for v in bootstrap.wilson(0, 0))


def test_resampled_means_use_equal_image_weights_and_skip_missing_images():
    v = np.array([[1.0, np.nan], [3.0, 2.0], [5.0, 4.0]])
    w = np.array([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [0.0, 2.0, 1.0]])  # three draws of 3 images
    m = bootstrap.weighted_means(v, w)
    assert m[0].tolist() == [3.0, 3.0]  # the NaN image is left out of block 2 only
    assert m[1, 0] == 1.0 and math.isnan(m[1, 1])  # a draw of only the missing image: no number
    assert m[2].tolist() == pytest.approx([(2 * 3 + 5) / 3, (2 * 2 + 4) / 3])
    draws = bootstrap.resample_weights(7, n_boot=50, seed=3)
    assert draws.shape == (50, 7) and (draws.sum(1) == 7).all()
    assert (draws == bootstrap.resample_weights(7, n_boot=50, seed=3)).all()  # seedable


def test_count_interval_brackets_the_count_and_shrinks_with_agreement():
    rng = np.random.default_rng(0)
    # block 1: clearly above 0.9 in every image; block 2: right at the threshold (noisy); block 3: clearly below
    per_image = np.stack([0.97 + 0.01 * rng.standard_normal(200), 0.9 + 0.05 * rng.standard_normal(200),
                          0.5 + 0.01 * rng.standard_normal(200)], axis=1)
    w = bootstrap.resample_weights(200, 500, seed=1)
    lo, hi = bootstrap.interval(bootstrap.count_draws(per_image, w, 0.9))
    assert lo == 1 and hi == 2  # the borderline block is in some draws and not in others
    lo, hi = bootstrap.interval(bootstrap.count_draws(per_image[:, [0, 2]], w, 0.9))
    assert lo == hi == 1


class _BNOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def test_batchnorm_recalibration_is_the_mean_of_the_batch_statistics():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5) * s + m for s, m in ((1.0, 0.0), (2.0, 3.0), (0.5, -1.0))]
    model = _BNOnly().eval()
    used = recalibrate_bn(model, batches, torch.device("cpu"))
    assert used == 3 and not model.bn.training and model.bn.momentum == 0.1
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    vars_ = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(model.bn.running_mean, means, atol=1e-6)
    assert torch.allclose(model.bn.running_var, vars_, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_micro", "deepvit_micro"])
def test_untrained_twin_is_a_fresh_seeded_copy_that_leaves_the_callers_rng_alone(name):
    model = timm.create_model(name, depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained": far from any init
    state = torch.random.get_rng_state()
    twin, how = untrained_twin(model, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "timm init_weights" in how and "seed 5" in how and "N(0, 0.02" not in how  # every tensor re-drawn
    again, _ = untrained_twin(model, seed=5)
    other, _ = untrained_twin(model, seed=6)
    for (n, p), q, r, s in zip(model.named_parameters(), twin.parameters(), again.parameters(), other.parameters()):
        assert p.shape == q.shape and torch.equal(q, r), n
        if p.numel() > 8 and not n.endswith(("bias", "norm.weight", "norm1.weight", "norm2.weight")):
            assert not torch.equal(p, q) and not torch.equal(q, s), n
    assert next(model.parameters()).abs().mean() > 0.5  # the model itself is untouched


def test_probe_with_baseline_measures_the_twin_on_the_same_images():
    model = timm.create_model("deepvit_micro", depth=3)
    images = torch.randn(6, 3, 32, 32)
    result = probe(model, images, batch_size=4, progress=False, baseline=True, baseline_seed=2)
    twin = result.baseline
    assert twin is not None and twin.images == result.images and twin.baseline is None
    assert twin.settings["twin"]["seed"] == 2 and twin.settings["twin"]["batchnorm_batches"] == 2
    assert set(twin.attention) == set(result.attention) == {"probs", "mixed"}
    assert not np.allclose(twin.attention["mixed"].similarity, result.attention["mixed"].similarity)
    with pytest.raises(Exception, match="read twice"):
        probe(model, (b for b in images.split(3)), progress=False, baseline=True)


def test_every_command_names_the_same_similar_blocks_with_the_same_numbers(tmp_path):
    """(g): similarity, audit, compare and figures on one checkpoint: one list, one count, 1-based everywhere."""
    import csv
    import json

    from click.testing import CliRunner

    from collapse_probe.cli import main
    from collapse_probe.loading.save import save_checkpoint

    ckpt, twin = tmp_path / "m.safetensors", tmp_path / "copy.safetensors"
    save_checkpoint(timm.create_model("vit_micro", depth=6), ckpt)  # random init: near-uniform, many similar blocks
    twin.write_bytes(ckpt.read_bytes())
    common = ["--num-images", "4", "--batch-size", "4", "--no-progress", "--threshold", "0.9"]

    def run(*args: str) -> str:
        res = CliRunner().invoke(main, [*args, *common])
        assert res.exit_code == 0, res.output
        return res.stdout

    sim = json.loads(run("similarity", str(ckpt), "--format", "json"))["summary"]
    run("audit", str(ckpt), "-o", str(tmp_path / "audit"), "--no-baseline", "--no-intervene")
    aud = json.loads((tmp_path / "audit" / "metrics.json").read_text())["summary"]
    cmp_ = json.loads(run("compare", str(ckpt), str(twin), "--format", "json", "--no-baseline",
                          "--no-intervene"))["summary"][0]
    run("figures", str(ckpt), "-o", str(tmp_path / "figs"), "--no-pdf", "--no-baseline", "--no-intervene")
    fig = next(csv.DictReader((tmp_path / "figs" / "summary.csv").open()))
    expected = sim["similar_blocks"]
    assert expected and min(expected) >= 2  # block 1 has no previous block: 1-based numbers
    assert aud["similar_blocks"] == cmp_["similar_blocks"] == expected
    assert [int(b) for b in fig["similar_block_numbers"].split()] == expected
    assert aud["count"] == int(fig["similar_blocks"]) == len(expected) == sim["count"]
    headline = run("similarity", str(ckpt)).splitlines()
    assert any(f"{len(expected)} of 6 blocks similar" in line for line in headline)
    assert headline[0] == sim["verdict"]  # similarity measures the twin and the redundancy by default ...
    assert "(measured)" in sim["verdict"] and "untrained twin 5/6 = uniform attention" in sim["verdict"]
    # ... the others were asked not to: the same line, predicted from the maps, in audit, compare and figures
    assert aud["verdict"] == cmp_["verdict"] == fig["verdict"]
    assert "predicted redundant from the maps" in aud["verdict"] and "untrained twin" not in aud["verdict"]


# ------------------------------------------------------------------- planted ground truth through the real collector


def _collect(maps: list[torch.Tensor], prefix: int = 1):
    """A ProbeResult from planted softmax maps [B, H, N, N] per block, through CollapseCollector as a probe feeds it."""
    from collapse_probe.hooks.capture import Site
    from collapse_probe.probing.collector import CollapseCollector

    sites = [Site(f"blocks.{i}.attn.probs", "probs", i) for i in range(len(maps))]
    col = CollapseCollector(sites, threshold=0.9, num_heads=maps[0].shape[1], prefix_tokens=prefix)
    for site, m in zip(sites, maps):
        col(site, m)
    col.end_batch()
    result = col.result()
    result.model.depth, result.images.count, result.images.source = len(maps), maps[0].shape[0], "planted"
    result.settings = {"threshold": 0.9, "entry_threshold": 0.9, "neighbors": 1, "reduction": "mean"}
    return result


def _rows_alike(logits: torch.Tensor, B: int, H: int, N: int) -> torch.Tensor:
    """[N] logits -> [B, H, N, N] maps whose every row is softmax(logits): rank one, every query attends alike."""
    return logits.softmax(-1).expand(B, H, N, N).clone()


def test_a_rank_one_maps_on_disjoint_keys_are_token_uniform_not_redundant():
    B, H, N, L = 4, 2, 17, 4
    maps = []
    for layer in range(L):  # block l attends to keys 4l+1 ... 4l+4 only: consecutive blocks share no key
        logits = torch.full((N,), -8.0)
        logits[1 + 4 * layer: 5 + 4 * layer] = 0.0
        maps.append(_rows_alike(logits, B, H, N))
    vd = judge(_collect(maps))
    rows = {r["block"]: r for r in block_rows(_collect(maps))}
    for b in range(2, L + 1):
        assert rows[b]["sim_prev"] == pytest.approx(1.0, abs=1e-6)  # Eq. 3's blind spot: constant columns
        assert rows[b]["row_cosine_prev"] < 0.01 and rows[b]["rank1_residual"] == pytest.approx(0.0, abs=1e-5)
    assert vd["similar_blocks"] == [2, 3, 4]  # the paper's criterion is fooled ...
    assert vd["regimes"]["token-uniform"] == [1, 2, 3, 4] and vd["regimes"]["repeating"] == []  # ... the verdict not
    text = " ".join(vd["text"])
    assert "token-uniform" in text and "reuse" not in text


def test_b_uniform_maps_read_as_uniform_attention():
    B, H, N = 3, 2, 17
    vd = judge(_collect([torch.full((B, H, N, N), 1.0 / N) for _ in range(3)]))
    assert vd["regimes"]["uniform"] == [1, 2, 3] and vd["regimes"]["repeating"] == []
    rows = block_rows(_collect([torch.full((B, H, N, N), 1.0 / N)] * 3))
    assert all(r["entropy"] == pytest.approx(1.0, abs=1e-6) and r["tv_uniform"] == pytest.approx(0.0, abs=1e-6)
               for r in rows)
    assert "attend near-uniformly" in " ".join(vd["text"])


def _sharp(B: int, H: int, N: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    return (scale * torch.randn(B, H, N, N, generator=gen)).softmax(-1)


def test_d_planted_redundancy_is_collapse_beyond_the_twin_exactly_where_planted():
    B, H, N, L, k = 8, 2, 17, 6, 3  # blocks k+1 ... L (1-based) repeat block k's sharp pattern
    gen = torch.Generator().manual_seed(0)
    trained = [_sharp(B, H, N, gen, 4.0) for _ in range(k)]
    trained += [trained[-1].clone() for _ in range(L - k)]
    twin = [_sharp(B, H, N, gen, 0.3) for _ in range(L)]  # an untrained model: near-uniform, unrelated blocks
    result = _collect(trained)
    result.baseline = _collect(twin)
    vd = judge(result)
    rows = {r["block"]: r for r in block_rows(result)}
    for b in range(k + 1, L + 1):
        assert rows[b]["pearson_prev"] == pytest.approx(1.0, abs=1e-5)
    assert vd["collapsed_beyond_twin"] == list(range(k + 1, L + 1))
    assert vd["regimes"]["repeating"] == list(range(k + 1, L + 1))
    assert vd["interchangeable"] == list(range(k + 1, L + 1))  # identical maps: row JSD 0; the sharp others far apart
    assert vd["verdict"].startswith(f"VERDICT: blocks {k + 1}-{L} predicted redundant from the maps ({L - k} of {L};")
    result.baseline = None  # the same maps without the twin: the map rule needs none
    alone = judge(result)
    assert alone["regimes"]["repeating"] == list(range(k + 1, L + 1)) and alone["interchangeable"] == vd[
        "interchangeable"] and "untrained twin" not in alone["verdict"]
    assert vd["count_interval"] is not None and vd["baseline"]["count_interval"] is not None


def test_c_an_untrained_model_is_not_collapsed_beyond_its_twin():
    torch.manual_seed(1)  # another seed than the twin's
    model = timm.create_model("vit_micro", depth=32)
    result = probe(model, torch.randn(8, 3, 32, 32), batch_size=8, progress=False, baseline=True)
    vd = judge(result)
    assert vd["count"] >= 20  # the paper's metric calls it collapsed ...
    assert vd["collapsed_beyond_twin"] == [] and vd["regimes"]["repeating"] == []  # ... beyond its twin it is not
    assert vd["baseline"]["uniform"] and "not a separate baseline" in " ".join(vd["text"])  # the twin is uniform
    # near-uniform maps are interchangeable: the map rule predicts every block with a previous one redundant
    assert vd["interchangeable"] == list(range(2, 33)) and vd["near_uniform"] == list(range(1, 33))


def test_audit_measures_redundancy_by_default_exactly_where_planted(tmp_path):
    """Blocks whose attention branch writes nothing (output projection zeroed) change no output whatever map they
    use: they are redundant by measurement, and the verdict, metrics.json and the report say so."""
    from collapse_probe.loading.save import save_checkpoint
    from collapse_probe.reports.audit import audit

    torch.manual_seed(0)
    model = timm.create_model("vit_micro", depth=5, num_classes=10)
    with torch.no_grad():
        for b in (3, 4):  # modules 3, 4 = blocks 4, 5 (1-based): the last run, two blocks long
            model.blocks[b].attn.proj.weight.zero_()
            model.blocks[b].attn.proj.bias.zero_()
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(model, ckpt)
    metrics = audit(ckpt, tmp_path / "rep", baseline=False, num_images=6, batch_size=6, progress=False,
                    device="cpu", images="builtin:digits")
    red = metrics["summary"]["redundancy"]
    rows = {r["block"]: r for r in red["per_block"]}
    assert sorted(rows) == [2, 3, 4, 5]  # block 1 has no previous block
    for b in (4, 5):
        assert rows[b]["changed"] == 0 and rows[b]["kl"] == pytest.approx(0.0, abs=1e-12) and rows[b]["redundant"]
    assert {4, 5} <= set(red["blocks"])
    assert all(r["redundant"] == (r["changed"] < 0.01 and r["kl"] < 0.01) for r in rows.values())  # the rule
    assert red["sharing"] is not None and red["sharing"]["blocks"][1] == 5 and red["sharing"]["changed"] == 0
    assert "(measured)" in metrics["summary"]["verdict"]
    assert "reuse_changed" in (tmp_path / "rep" / "report.md").read_text()
    skipped = audit(ckpt, tmp_path / "maps", baseline=False, intervene=False, num_images=6, batch_size=6,
                    progress=False, device="cpu", images="builtin:digits")
    assert skipped["summary"]["redundancy"] is None and "(measured)" not in skipped["summary"]["verdict"]


@pytest.mark.heavy  # four commands on the two bundled 32-block checkpoints (~2 min on 2 busy cores)
def test_bundled_pair_headlines_agree_across_commands_and_name_their_maps(tmp_path):
    import csv
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from collapse_probe.cli import main

    root = Path(__file__).resolve().parents[1] / "checkpoints"
    pair = [root / "vit_micro_d32.safetensors", root / "deepvit_micro_d32.safetensors"]
    common = ["--num-images", "32", "--batch-size", "16", "--no-progress", "--no-baseline"]

    def run(*args: str) -> str:
        res = CliRunner().invoke(main, [*args, *common])
        assert res.exit_code == 0, res.output
        return res.stdout

    cmp_ = {r["checkpoint"]: r for r in json.loads(run("compare", *map(str, pair), "--format", "json"))["summary"]}
    run("figures", *map(str, pair), "-o", str(tmp_path / "figs"), "--no-pdf")
    figs = {r["model"]: r for r in csv.DictReader((tmp_path / "figs" / "summary.csv").open())}
    for ckpt, kind, words in ((pair[0], "probs", "softmax maps"), (pair[1], "mixed", "the maps that multiply V")):
        sim = json.loads(run("similarity", str(ckpt), "--format", "json"))["summary"]
        run("audit", str(ckpt), "-o", str(tmp_path / ckpt.stem))
        aud = json.loads((tmp_path / ckpt.stem / "metrics.json").read_text())["summary"]
        assert sim["kind"] == aud["kind"] == cmp_[ckpt.name]["kind"] == figs[ckpt.stem]["kind"] == kind
        assert sim["similar_blocks"] == aud["similar_blocks"] == cmp_[ckpt.name]["similar_blocks"]
        assert [int(b) for b in figs[ckpt.stem]["similar_block_numbers"].split()] == sim["similar_blocks"]
        assert words in sim["headline"] and sim["headline"] == aud["headline"]
