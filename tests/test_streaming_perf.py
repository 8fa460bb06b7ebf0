"""The optimised streaming probe: equal to the pure functions, batch-split invariant, bounded memory, half-precision
storage within its documented error bound, ``--max-memory`` batch fitting, and NaN/Inf reported, not averaged in."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.errors import BadArgumentError
from collapse_probe.hooks.capture import capture
from collapse_probe.metrics import functional as MF
from collapse_probe.metrics.columns import ColumnAccumulator
from collapse_probe.metrics.rows import RowAccumulator
from collapse_probe.metrics.streaming import CrossLayerAccumulator, FeatureAccumulator, unit_columns
from collapse_probe.probing.collector import CollapseCollector
from collapse_probe.probing.memory import estimate_bytes_per_image, fit_batch, parse_bytes
from collapse_probe.probing.result import ProbeResult
from collapse_probe.probing.run import probe
from collapse_probe.reports.text import render

KINDS = ("probs", "mixed", "out")


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = timm.create_model("deepvit_micro", depth=4).eval()
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, images


def _reference(model, images):
    """Every metric from the pure functions on all maps at once (the naive way)."""
    with torch.inference_mode(), capture(model, KINDS) as cap:
        model(images)
    ref = {}
    for kind in ("probs", "mixed"):
        maps = cap.stack(kind)
        S, R = MF.cross_layer_similarity(maps, 0.9)
        ranks = [MF.singular_value_ranks(a) for a in maps]
        ref[kind] = dict(S=S, R=R, cross_head=[MF.cross_head_similarity(a) for a in maps],
                         erank=[float(e.double().mean()) for e, _ in ranks], energy=[float(r.double().mean())
                                                                                  for _, r in ranks])
    feats = cap.stack("out")
    ref["features"] = MF.token_feature_similarity(feats)
    ref["residual"] = MF.residual_norm_ratio(feats).double().mean(1)
    return ref


def _check(result: ProbeResult, ref, atol=1e-5):
    for kind in ("probs", "mixed"):
        st = result.attention[kind]
        np.testing.assert_allclose(st.similarity, ref[kind]["S"].numpy(), atol=atol, rtol=0)
        np.testing.assert_allclose(st.ratio, ref[kind]["R"].numpy(), atol=1e-12, rtol=0)
        np.testing.assert_allclose(st.cross_head, ref[kind]["cross_head"], atol=atol, rtol=0)
        np.testing.assert_allclose(st.effective_rank, ref[kind]["erank"], rtol=1e-5)
        np.testing.assert_allclose(st.energy_rank, ref[kind]["energy"], rtol=1e-12)
    np.testing.assert_allclose(result.features.similarity, ref["features"].numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(result.features.residual, ref["residual"].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("split", [[7], [1, 6], [3, 3, 1]])
def test_streaming_probe_equals_functions_for_any_batch_split(model_and_images, split):
    model, images = model_and_images
    batches = list(images.split(split))
    _check(probe(model, batches, progress=False), _reference(model, images))


def test_max_memory_splits_batches_without_changing_results(model_and_images):
    model, images = model_and_images
    small = fit_batch(model, images, KINDS, "8MiB")
    large = fit_batch(model, images, KINDS, "1GiB")
    assert 1 <= small < 7 < large
    result = probe(model, [images], max_memory="8MiB", progress=False)
    assert result.settings["max_batch"] == small
    _check(result, _reference(model, images))
    with pytest.raises(BadArgumentError, match="too small"):
        fit_batch(model, images, KINDS, "100KiB")


def test_estimate_counts_every_stored_map():
    shapes = {"a.probs": (1, 4, 10, 10), "b.probs": (1, 4, 10, 10), "a.out": (1, 10, 8)}
    fp32, fp16 = estimate_bytes_per_image(shapes, torch.float32), estimate_bytes_per_image(shapes, torch.float16)
    assert fp32 - fp16 == 2 * 2 * 4 * 10 * 10 * 2  # two maps stored as columns and rows, 2 bytes saved per entry
    assert fp32 == 2 * (2 * 400 * 4 + 4 * 10 * 8) + (10 * 8 + 10 * 10) * 4 + 11 * 400 * 4 + 12 * 80 * 4


@pytest.mark.parametrize("text,expected", [("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("1.5g", int(1.5 * 2**30)),
                                           (1234, 1234), ("64", 64)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "2 parsecs", "", "-1GB"])
def test_parse_bytes_rejects_garbage(bad):
    with pytest.raises(BadArgumentError):
        parse_bytes(bad)


def test_buffers_depend_on_batch_size_not_on_image_count(model_and_images):
    """Peak accumulator memory is the same for 7 and 14 images at batch 7: a batch's buffers are reused by the next,
    never added to, and released when the probe ends."""
    model, images = model_and_images
    peaks = []
    for n_batches in (1, 2):
        peak = {ColumnAccumulator: 0, RowAccumulator: 0}
        origs = {cls: cls.end_batch for cls in peak}

        def spy(self, _peak=peak, _origs=origs):
            held = self.buffer_bytes()
            _peak[type(self)] = max(_peak[type(self)], held)
            _origs[type(self)](self)
            assert self.buffer_bytes() <= held  # kept for the next batch, not grown

        releases, orig_release = [], CollapseCollector.release

        def release(self, _orig=orig_release, _releases=releases):
            _orig(self)
            _releases.append([a.buffer_bytes() for a in (*self.columns.values(), *self.rows.values())])

        CollapseCollector.release = release

        for cls in peak:
            cls.end_batch = spy
        try:
            probe(model, [images] * n_batches, progress=False, baseline=False)  # one probe, no twin
        finally:
            for cls, orig in origs.items():
                cls.end_batch = orig
            CollapseCollector.release = orig_release
        assert releases == [[0, 0, 0, 0]]  # probs and mixed, columns and rows: nothing held after the probe
        peaks.append(peak)
    B, H, N, L = 7, 4, 65, 4
    # columns: B*N rows x L*H columns x N entries, plus each column's mean; rows: L blocks x B*H*N*N entries
    assert peaks[0] == peaks[1] == {ColumnAccumulator: (B * N * L * H * N + B * N * L * H) * 4,
                                    RowAccumulator: L * B * H * N * N * 4}


@pytest.mark.parametrize("dtype,unit", [(torch.float16, 2**-11), (torch.bfloat16, 2**-8)])
def test_half_storage_error_within_documented_bound(model_and_images, dtype, unit):
    """Stored unit columns rounded to dtype (relative error u per entry, so |error vector| <= u) move each cosine by at
    most 2u + u^2; the mean cosine therefore too, and the ratio only through cosines that close to the threshold."""
    model, images = model_and_images
    with torch.inference_mode(), capture(model, ("probs",)) as cap:
        model(images)
    maps = cap.stack("probs")
    exact, half = CrossLayerAccumulator(4, 0.9), CrossLayerAccumulator(4, 0.9, storage_dtype=dtype)
    for blk in range(4):
        exact.add(blk, maps[blk])
        half.add(blk, maps[blk])
    exact.end_batch()
    half.end_batch()
    bound = 2 * unit + unit**2
    err = (exact.similarity() - half.similarity()).abs().max().item()
    assert err <= bound
    cols = unit_columns(maps.flatten(0, 1))[0]
    cos = torch.einsum("lbhti,mbhti->lmbht", *(cols.view(4, 7, 4, 65, 65),) * 2)
    near = ((cos - 0.9).abs() <= bound).double().mean(dim=(2, 3, 4))
    assert ((exact.ratio() - half.ratio()).abs() <= near + 1e-12).all()


def test_nan_images_are_excluded_and_reported(model_and_images):
    model, images = model_and_images
    bad = images.clone()
    bad[2, 0, 5, 5] = math.nan  # one poisoned pixel: every map and output of image 2 is non-finite
    result = probe(model, [bad[:4], bad[4:]], progress=False)
    clean = torch.cat([images[:2], images[3:]])
    _check(result, _reference(model, clean))
    assert len(result.findings) == 4 * 3  # every block, every kind
    assert all(f["images"] == 1 and f["nonfinite_values"] > 0 for f in result.findings)
    probs0 = next(f for f in result.findings if f["name"] == "blocks.0.attn.probs")
    assert probs0["nonfinite_values"] == 4 * 65 * 65 and probs0["kind"] == "probs" and probs0["block"] == 1
    assert probs0["index"] == 0  # block 1-based, index 0-based
    back = ProbeResult.from_json(result.to_json())
    assert back.findings == result.findings
    table = render(result, "table")
    assert "WARNING blocks.0.attn.probs (probs, block 1)" in table


def test_poisoned_block_reported_and_earlier_blocks_intact(model_and_images):
    model, images = model_and_images
    torch.manual_seed(0)
    poisoned = timm.create_model("deepvit_micro", depth=4).eval()
    poisoned.load_state_dict(model.state_dict())
    with torch.no_grad():
        poisoned.blocks[2].attn.qkv.weight[0, 0] = math.inf
    result = probe(poisoned, [images], progress=False)
    names = {f["name"] for f in result.findings}
    assert "blocks.2.attn.probs" in names and "blocks.3.out" in names
    assert not any(n.startswith(("blocks.0.", "blocks.1.")) for n in names)
    st, ref = result.attention["probs"], _reference(model, images)["probs"]
    np.testing.assert_allclose(st.similarity[:2, :2], ref["S"][:2, :2].numpy(), atol=1e-6)
    assert np.isnan(st.similarity[2:, :]).all() and np.isnan(st.cross_head[2:]).all()
    assert "null" in result.to_json()  # NaN numbers are written as null, never as averages


def test_feature_accumulator_invalid_rows_not_counted():
    feats = torch.randn(3, 2, 5, 4)
    acc = FeatureAccumulator(3)
    valid = torch.tensor([True, False])
    for blk in range(3):
        acc.add(blk, feats[blk], valid)
    acc.end_batch()
    torch.testing.assert_close(acc.similarity(), MF.token_feature_similarity(feats[:, :1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(acc.residual(), MF.residual_norm_ratio(feats[:, :1]).double().mean(1), atol=1e-6, rtol=0)
