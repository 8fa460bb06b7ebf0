"""The probe pipeline equals the pure functions on stored maps, whatever the batch size; images load as documented."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.errors import BadArgumentError
from collapse_probe.hooks.capture import capture
from collapse_probe.loading.images import image_loader, list_images, sample_photographs
from collapse_probe.metrics import functional as MF
from collapse_probe.probing.result import ProbeResult
from collapse_probe.probing.run import probe


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = timm.create_model("deepvit_micro", depth=4).eval()
    return model, torch.randn(10, 3, 32, 32)


def test_probe_equals_functions_on_stored_maps(model_and_images):
    model, x = model_and_images
    with torch.no_grad(), capture(model, kinds=("probs", "mixed", "out")) as cap:
        model(x)
    result = probe(model, DataLoader(TensorDataset(x), batch_size=3), threshold=0.8, progress=False)
    for kind in ("probs", "mixed"):
        maps = cap.stack(kind)
        S, R = MF.cross_layer_similarity(maps, threshold=0.8)
        stats = result.attention[kind]
        np.testing.assert_allclose(stats.similarity, S.numpy(), atol=1e-5)
        np.testing.assert_allclose(stats.ratio, R.numpy())
        np.testing.assert_allclose(stats.cross_head, [MF.cross_head_similarity(m) for m in maps], atol=1e-5)
        np.testing.assert_allclose(stats.effective_rank, [MF.singular_value_ranks(m)[0].mean() for m in maps],
                                   rtol=1e-5)
    feats = torch.stack(cap.kind("out"))
    np.testing.assert_allclose(result.features.similarity, MF.token_feature_similarity(feats).numpy(), atol=1e-5)


def test_batch_size_does_not_change_results(model_and_images):
    model, x = model_and_images
    a = probe(model, DataLoader(TensorDataset(x), batch_size=10), progress=False)
    b = probe(model, DataLoader(TensorDataset(x), batch_size=4), progress=False)
    for kind in ("probs", "mixed"):
        np.testing.assert_allclose(a.attention[kind].similarity, b.attention[kind].similarity, atol=1e-5)
        np.testing.assert_allclose(a.attention[kind].energy_rank, b.attention[kind].energy_rank)


def test_probe_restores_training_mode_and_json_round_trip(model_and_images):
    model, x = model_and_images
    model.train()
    result = probe(model, [x[:2]], progress=False)
    assert model.training
    model.eval()
    back = ProbeResult.from_json(result.to_json())
    np.testing.assert_allclose(back.attention["probs"].similarity, result.attention["probs"].similarity)
    assert back.attention["probs"].similar_blocks(0.5) == result.attention["probs"].similar_blocks(0.5)
    assert np.isnan(back.attention["probs"].neighbor(1)[0])  # the first block has no previous block


def test_sample_photographs_are_real_and_offline():
    photos = sample_photographs()
    assert len(photos) == 17
    assert all(img.mode == "RGB" and min(img.size) >= 64 for _, img in photos)
    assert len({np.asarray(img).tobytes()[:4096] for _, img in photos}) == 17  # all distinct


def test_image_loader_uses_model_preprocessing_and_crops(model_and_images):
    model, _ = model_and_images
    loader, info = image_loader(model, num_images=20, batch_size=8)
    batches = list(loader)
    assert [b.shape[0] for b in batches] == [8, 8, 4] and batches[0].shape[1:] == (3, 32, 32)
    assert info.count == 20 and "crops" in info.source and info.mean == [0.5, 0.5, 0.5]
    # mean = std = 0.5 maps [0, 1] pixels to [-1, 1]
    assert batches[0].min() >= -1.0 - 1e-6 and batches[0].max() <= 1.0 + 1e-6
    again = list(image_loader(model, num_images=20, batch_size=8)[0])
    assert torch.equal(batches[2], again[2])  # seeded crops: reproducible


def test_image_folder_errors(tmp_path, model_and_images):
    model, _ = model_and_images
    with pytest.raises(BadArgumentError, match="no images"):
        list_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BadArgumentError, match="not a folder"):
        list_images(tmp_path / "notes.txt")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "sub_ok.png")
    loader, info = image_loader(model, tmp_path, batch_size=1)
    assert info.count == 2
    with pytest.raises(BadArgumentError, match="cannot read image .*bad.png"):
        list(loader)


def test_builtin_image_sets(model_and_images):
    model, _ = model_and_images
    loader, info = image_loader(model, "builtin:digits", num_images=5, batch_size=5)
    assert info.count == 5 and "digits" in info.source
    batch = next(iter(loader))
    assert batch.shape == (5, 3, 32, 32)
    assert torch.equal(batch[:, 0], batch[:, 1])  # grey digits as RGB
    assert image_loader(model, "builtin:digits")[1].count == 360  # the 20 % validation split
    photos = next(iter(image_loader(model, "builtin:photos", num_images=2, batch_size=2)[0]))
    assert torch.equal(photos, next(iter(image_loader(model, None, num_images=2, batch_size=2)[0])))
    with pytest.raises(BadArgumentError, match="unknown built-in"):
        image_loader(model, "builtin:cifar")


def test_observers_see_every_capture_without_changing_results(model_and_images):
    model, x = model_and_images
    seen = []
    loader = DataLoader(TensorDataset(x), batch_size=4)
    with_obs = probe(model, loader, progress=False, observers=[lambda site, t: seen.append((site.name, t.shape[0]))])
    plain = probe(model, loader, progress=False)
    np.testing.assert_array_equal(with_obs.attention["probs"].similarity, plain.attention["probs"].similarity)
    names = {n for n, _ in seen}
    assert names == {f"blocks.{i}.attn.{k}" for i in range(4) for k in ("probs", "mixed")} | \
        {f"blocks.{i}.out" for i in range(4)}
    assert sum(b for n, b in seen if n == "blocks.0.attn.probs") == 10  # every image, once
