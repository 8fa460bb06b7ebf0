"""Checkpoint reading: formats by content, layouts, prefixes, metadata, and refusal of code-carrying pickles."""
from __future__ import annotations

import os
import pickle

import pytest
import timm
import torch

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.errors import BadArgumentError, MalformedFileError, RefusedContentError, UnsupportedLayoutError
from collapse_probe.loading.build import build_model
from collapse_probe.loading.read import extract_state_dict, read_checkpoint, strip_prefixes
from collapse_probe.loading.save import save_checkpoint


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip_carries_config(tmp_path):
    model = timm.create_model("deepvit_micro", depth=2, mix_norm="ln")
    save_checkpoint(model, tmp_path / "m.bin", extra={"eval": {"top1": 0.5}})  # extension does not matter
    ckpt = read_checkpoint(tmp_path / "m.bin")
    assert ckpt.format == "safetensors" and ckpt.metadata["eval"] == {"top1": 0.5}
    loaded, info = build_model(ckpt)
    assert info.architecture == "deepvit_micro" and info.architecture_source == "checkpoint metadata"
    assert info.depth == 2 and info.reattn_blocks == [0, 1]
    assert same_weights(model, loaded)
    assert not loaded.training


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model_ema", "ddp", "compiled+lightning"])
def test_torch_layouts(tmp_path, layout):
    model = timm.create_model("vit_micro")
    sd = model.state_dict()
    obj = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model_ema": {"model_ema": sd, "optimizer": {"lr": 1.0}},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compiled+lightning": {"state_dict": {f"model._orig_mod.{k}": v for k, v in sd.items()}},
    }[layout]
    torch.save(obj, tmp_path / "m.pt")
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt.format == "torch-zip"
    loaded, info = build_model(ckpt, "vit_micro")
    assert info.architecture_source == "--model"
    assert set(loaded.state_dict()) == set(sd) and all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)


def test_key_option_and_missing_key(tmp_path):
    sd = timm.create_model("vit_micro", depth=1).state_dict()
    torch.save({"student": sd, "teacher": {k: v + 1 for k, v in sd.items()}}, tmp_path / "m.pt")
    assert read_checkpoint(tmp_path / "m.pt").key == "teacher" or read_checkpoint(tmp_path / "m.pt").key == "student"
    ckpt = read_checkpoint(tmp_path / "m.pt", key="teacher")
    assert torch.equal(ckpt.state_dict["head.bias"], sd["head.bias"] + 1)
    with pytest.raises(UnsupportedLayoutError, match="no entry 'ema'"):
        read_checkpoint(tmp_path / "m.pt", key="ema")


def test_strip_prefixes_repeatedly():
    t = torch.zeros(1)
    assert strip_prefixes({"module._orig_mod.module.a": t, "module._orig_mod.module.b": t}) == {"a": t, "b": t}
    assert list(strip_prefixes({"module.a": t, "b": t})) == ["module.a", "b"]  # not shared by all: untouched


def test_no_state_dict_found():
    with pytest.raises(UnsupportedLayoutError, match="--key"):
        extract_state_dict({"epoch": 3, "optimizer": {}})


def test_architecture_mismatch_is_one_clear_error(tmp_path):
    save_checkpoint(timm.create_model("vit_micro", depth=2), tmp_path / "m.safetensors")
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(UnsupportedLayoutError, match="missing keys.*theta"):
        build_model(ckpt, "deepvit_micro")  # depth 8 expected: blocks 2..7 missing, theta missing
    torch.save(timm.create_model("vit_micro").state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UnsupportedLayoutError, match="--model"):
        build_model(read_checkpoint(tmp_path / "plain.pt"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil_legacy.pt", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    for name in ("evil.pt", "evil_legacy.pt"):
        with pytest.raises((RefusedContentError, MalformedFileError)) as e:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(RefusedContentError, match="system.*--trust-pickle"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


class Box(dict):
    """A harmless custom class: weights_only refuses it like any unknown global."""


def test_trust_pickle_is_an_explicit_opt_in(tmp_path):
    torch.save({"state_dict": Box(w=torch.ones(2))}, tmp_path / "custom.pt")
    with pytest.raises(RefusedContentError, match="Box"):
        read_checkpoint(tmp_path / "custom.pt")
    ckpt = read_checkpoint(tmp_path / "custom.pt", trust_pickle=True)
    assert torch.equal(ckpt.state_dict["w"], torch.ones(2))


@pytest.mark.parametrize("content, error", [
    (b"", MalformedFileError),
    (b"hello world, not a checkpoint", MalformedFileError),
])
def test_bad_files(tmp_path, content, error):
    (tmp_path / "f.pt").write_bytes(content)
    with pytest.raises(error):
        read_checkpoint(tmp_path / "f.pt")


def test_truncated_files(tmp_path):
    model = timm.create_model("vit_micro", depth=1)
    save_checkpoint(model, tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(MalformedFileError):
            read_checkpoint(tmp_path / f"cut_{name}")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(BadArgumentError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(BadArgumentError, match="folder"):
        read_checkpoint(tmp_path)


def test_readme_digits_table_is_generated_from_the_committed_files():
    """Every number in the README's digits table comes from the checkpoints' metadata and figures/digits/summary.csv
    (``python checkpoints/summarize.py --readme`` writes it); a hand-edited or stale table fails here."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("summarize", root / "checkpoints" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    text = (root / "README.md").read_text()
    block = text[text.index(summarize.START) + len(summarize.START):text.index(summarize.END)].strip()
    assert block == summarize.readme_table()
    for row in summarize.rows():  # the metadata itself: top-1 as recorded by the trainer
        assert f"| {row['depth']} | {row['seed']} | {row['params']:,} | {row['epochs']} | {row['top1']:.1f} (" in block
    text = (root / "figures" / "README.md").read_text()
    block = text[text.index(summarize.START) + len(summarize.START):text.index(summarize.END)].strip()
    assert block == summarize.figures_table()


def test_figures_verdicts_and_the_calibration_measure_the_same_redundant_blocks():
    """Two roads to the same measurement on the committed files: the verdict of `collapse-probe figures`
    (figures/digits/summary.csv, probing.redundancy) and figures/calibrate.py (reports.calibration, its own
    interventions and batch size) must name the same redundant blocks for every bundled model."""
    import csv
    import importlib.util
    import re
    from pathlib import Path

    from collapse_probe.probing.spans import blocks_text

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("summarize", root / "checkpoints" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    with open(summarize.CALIBRATION_BLOCKS, newline="") as f:
        blocks: dict[str, list[int]] = {}
        for r in csv.DictReader(f):
            if r["role"] == "trained" and r["redundant"] == "True":
                blocks.setdefault(r["model"], []).append(int(r["block"]))
    with open(summarize.FIGURES_SUMMARY, newline="") as f:
        verdicts = {r["model"]: r["verdict"] for r in csv.DictReader(f) if r["verdict"]}
    assert set(verdicts) == {r["name"] for r in summarize.rows()}
    for model, line in verdicts.items():
        found = sorted(blocks.get(model, []))
        if found:
            assert line.startswith(f"VERDICT: {blocks_text(found)} redundant ({len(found)} of "), (model, line)
        else:
            assert re.match(r"VERDICT: no redundant block \(0 of \d+\)", line), (model, line)
