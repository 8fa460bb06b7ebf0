"""Hugging Face Hub ids as users type them (``timm/NAME``, ``hf-hub:timm/NAME``, ``org/name``), read offline from a
local cache in huggingface_hub's own layout; no network anywhere.

    PYTHONPATH=. pytest tests/test_hub.py -q

Each test builds ``models--ORG--NAME/{refs/main, snapshots/REV/, blobs/}`` (snapshot files are links into blobs/, as
huggingface_hub writes them) under a temporary cache and sets ``HF_HUB_OFFLINE=1``; the one test that goes "online"
points ``HF_ENDPOINT`` at a closed local port.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from collapse_probe.errors import BadArgumentError, RefusedContentError
from collapse_probe.loading.build import load_model
from collapse_probe.loading.hub import hub_id

from .conftest import run_cli
from .family_models import make, save_folder

TIMM_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2}


def _timm_model(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(depth)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**TIMM_ARGS, "depth": depth}).eval()


def _timm_folder(folder: Path, model: torch.nn.Module, depth: int = 2, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 10,
           "model_args": {**TIMM_ARGS, "depth": depth, **(extra or {})}}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def cache_repo(cache: Path, repo: str, files: Path) -> Path:
    """``files`` (a model folder) put into ``cache`` as huggingface_hub stores repository ``repo`` at revision main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    rev = hashlib.sha1(repo.encode()).hexdigest()
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    for f in files.iterdir():
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_as_typed():
    assert hub_id("timm/vit_tiny_patch16_224.augreg_in21k") == "timm/vit_tiny_patch16_224.augreg_in21k"
    assert hub_id("hf-hub:timm/vit_small_patch16_224") == "timm/vit_small_patch16_224"
    assert hub_id("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    for not_an_id in ("ckpts/model.pt", "run/best.safetensors", "a/b/c", "model.pt", "../x"):
        assert hub_id(not_an_id) is None, not_an_id
    with pytest.raises(BadArgumentError, match="not a Hugging Face Hub repository id"):
        hub_id("hf-hub:only-a-name")


def test_timm_id_from_the_cache_on_the_command_line(tmp_path, cache):
    cache_repo(cache, "timm/tiny-test", _timm_folder(tmp_path / "src", _timm_model()))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for name in ("timm/tiny-test", "hf-hub:timm/tiny-test"):
        res = run_cli("similarity", name, "--num-images", "2", "--batch-size", "2", "--no-progress",
                      "-o", tmp_path / "out.json", env=env)
        assert res.returncode == 0, res.stderr
        model = json.loads((tmp_path / "out.json").read_text())["model"]
        assert model["checkpoint"] == "timm/tiny-test" and model["format"] == "timm-folder" and model["depth"] == 2
        assert any(n.startswith("Hugging Face Hub id timm/tiny-test") and "HF_HUB_OFFLINE=1" in n
                   for n in model["notes"])
    res = run_cli("similarity", "timm/not-cached", "--no-progress", env=env)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local cache" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0], res.stderr


def test_the_cached_model_is_the_saved_one(tmp_path, cache):
    model = _timm_model()
    cache_repo(cache, "timm/tiny-test", _timm_folder(tmp_path / "src", model))
    loaded = load_model("hf-hub:timm/tiny-test")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_transformers_org_name_id_and_a_pickle_only_repository(tmp_path, cache):
    hf = make("hf-vit")
    cache_repo(cache, "someorg/tiny-vit", save_folder("hf-vit", hf, tmp_path / "hf-src"))
    loaded = load_model("someorg/tiny-vit")
    assert loaded.info.format == "hf-folder" and loaded.info.checkpoint == "someorg/tiny-vit"
    cache_repo(cache, "someorg/tiny-vit-bin", save_folder("hf-vit", hf, tmp_path / "bin-src", "pytorch_model.bin"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model("someorg/tiny-vit-bin").model(x).logits, hf(x).logits)


def test_every_safety_check_applies_to_a_cached_folder(tmp_path, cache):
    bad = _timm_folder(tmp_path / "src", _timm_model(), extra={"checkpoint_path": "/etc/passwd"})
    cache_repo(cache, "evil/steering", bad)
    with pytest.raises(RefusedContentError, match="checkpoint_path"):
        load_model("evil/steering")


def test_a_local_path_that_exists_wins(tmp_path, cache, monkeypatch):
    cache_repo(cache, "timm/tiny-test", _timm_folder(tmp_path / "src", _timm_model(depth=2)))
    _timm_folder(tmp_path / "work" / "timm" / "tiny-test", _timm_model(depth=1), depth=1)
    monkeypatch.chdir(tmp_path / "work")
    loaded = load_model("timm/tiny-test")
    assert loaded.info.depth == 1 and loaded.info.checkpoint == "timm/tiny-test" and not any(
        "Hub id" in n for n in loaded.info.notes)
    monkeypatch.chdir(tmp_path)
    assert load_model("timm/tiny-test").info.depth == 2


def test_unreachable_hub_is_one_line(tmp_path, cache, monkeypatch):
    """Online mode on a machine without a connection (the Hub endpoint a closed local port): one line, exit 2; a
    cached repository still loads."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(BadArgumentError, match="could not be fetched .*nor found in the local cache"):
        load_model("timm/not-cached")
    cache_repo(cache, "timm/tiny-test", _timm_folder(tmp_path / "src", _timm_model()))
    assert load_model("timm/tiny-test").info.depth == 2
