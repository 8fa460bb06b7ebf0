"""Checkpoint ingestion: layouts x formats, prefixes, --key, architecture inference (with the heads source), HF and
timm folders, normalisation, mismatch errors, refused pickles and broken files.

    PYTHONPATH=. pytest tests/test_ingest.py -q
"""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from collapse_probe.errors import BadArgumentError, MalformedFileError, RefusedContentError, UnsupportedLayoutError
from collapse_probe.loading.build import build_model
from collapse_probe.loading.infer import GUESS, decide_heads, head_evidence, infer_architecture
from collapse_probe.loading.read import read_checkpoint
from collapse_probe.loading.save import model_metadata, save_checkpoint

from .family_models import FLAT_LAYOUTS, INFERRED, LAYOUTS, example_input, logits, make, save_folder, save_weights


def _load(path, **kw):
    key = kw.pop("key", None)
    return build_model(read_checkpoint(path, key=key), **kw)


# a safetensors file holds one flat dict of tensors: only the flat layouts exist in that format
@pytest.mark.parametrize("layout,fmt", [(lay, "torch") for lay in LAYOUTS] + [(lay, "safetensors")
                                                                               for lay in FLAT_LAYOUTS])
def test_layouts_and_formats_round_trip(tmp_path, layout, fmt):
    model = make("timm-vit-reg-qknorm-ls")
    path = save_weights(model.state_dict(), tmp_path / "w.bin", layout, fmt)  # extension deliberately neutral
    ckpt = read_checkpoint(path)
    assert ckpt.format == ("safetensors" if fmt == "safetensors" else "torch-zip")
    expected_key = {"teacher_student": "teacher", "lightning": "state_dict", "ddp_compile": "model"}.get(layout)
    if layout in ("state_dict", "state_dict_ema", "model", "model_ema"):
        expected_key = layout
    assert ckpt.key == expected_key
    assert set(ckpt.state_dict) == set(model.state_dict())  # every wrapper prefix stripped
    rebuilt, info = build_model(ckpt)
    x = example_input("timm-vit-reg-qknorm-ls")
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))
    assert info.architecture_source == "inferred from weight shapes"


def test_key_chooses_the_entry(tmp_path):
    model = make("timm-vit")
    path = save_weights(model.state_dict(), tmp_path / "w.pt", "teacher_student", "torch")
    x = example_input("timm-vit")
    teacher, _ = _load(path)
    student, info = _load(path, key="student")
    torch.testing.assert_close(logits(teacher, x), logits(model, x))
    assert info.key == "student" and not torch.allclose(logits(student, x), logits(model, x))
    with pytest.raises(UnsupportedLayoutError, match="no entry 'ema'.*teacher"):
        read_checkpoint(path, key="ema")


@pytest.mark.parametrize("name", list(INFERRED))
def test_architecture_inferred_from_shapes_with_heads_source(tmp_path, name):
    model = make(name)
    path = save_weights(model.state_dict(), tmp_path / "w.pt", "state_dict", "torch")
    source, num_heads = INFERRED[name]
    rebuilt, info = _load(path, num_heads=num_heads)
    assert source in info.heads_source
    assert info.num_heads == (3 if "width->heads" in source else 4)  # the families use width 192 or 4 heads
    x = example_input(name)
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))
    assert info.input_size == [3, 32, 32]


def test_heads_rule_order():
    assert decide_heads(768, None, None) == (12, f"standard width->heads table (width 768); {GUESS}")
    assert decide_heads(384, None, None, 3.0)[0] == 12 and "DeepViT paper" in decide_heads(384, None, None, 3.0)[1]
    assert decide_heads(384, None, None, 4.0)[0] == 6 and decide_heads(384, None, None)[0] == 6
    assert all("guess" in decide_heads(d, None, None, r)[1] for d, r in ((384, 3.0), (384, 4.0), (192, 4.0)))
    assert decide_heads(1152, None, None)[0] == 16  # SigLIP so400m: head size 72, not 64
    assert decide_heads(768, None, 6) == (6, "--num-heads")
    assert decide_heads(768, (8, "q/k-norm shape"), None) == (8, "q/k-norm shape")
    with pytest.raises(BadArgumentError, match="contradicts"):
        decide_heads(768, (8, "q/k-norm shape"), 12)
    with pytest.raises(BadArgumentError, match="does not divide"):
        decide_heads(768, None, 7)
    with pytest.raises(UnsupportedLayoutError, match="--num-heads"):
        decide_heads(576, None, None)  # not in the table: no guess


def test_num_heads_that_contradicts_the_file_is_refused(tmp_path):
    path = save_weights(make("timm-beit").state_dict(), tmp_path / "w.pt", "bare", "torch")
    with pytest.raises(BadArgumentError, match="relative-position"):
        _load(path, num_heads=8)


@pytest.mark.parametrize("name", ["hf-vit", "hf-deit", "hf-dinov2"])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_huggingface_folder(tmp_path, name, weights):
    model = make(name)
    folder = save_folder(name, model, tmp_path / "hf", weights)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    ckpt = read_checkpoint(folder)
    assert ckpt.format == "hf-folder"
    rebuilt, info = build_model(ckpt)
    assert info.architecture == f"transformers:{type(model).__name__}"
    assert info.mean == [0.5] * 3 and info.input_size == [3, 32, 32]
    assert info.family == "transformers" and info.num_heads == 4
    x = example_input(name)
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))


@pytest.mark.parametrize("name", ["timm-eva", "timm-cait"])
def test_timm_folder(tmp_path, name):
    model = make(name)
    folder = save_folder(name, model, tmp_path / "timm")
    rebuilt, info = build_model(read_checkpoint(folder))
    assert info.format == "timm-folder" and info.architecture_source == "timm config.json"
    assert info.mean == [0.5] * 3 and info.std == [0.25] * 3 and info.data_source == "checkpoint metadata"
    x = example_input(name)
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(BadArgumentError, match="without config.json"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UnsupportedLayoutError, match="no model.safetensors"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MalformedFileError, match="not valid JSON"):
        read_checkpoint(tmp_path)


def test_ours_in_a_torch_training_checkpoint_and_precedence_of_model_flag(tmp_path):
    model = make("ours")
    sd = model.state_dict()
    path = tmp_path / "train.pt"
    torch.save({"state_dict": sd, "collapse_probe": model_metadata(model), "arch": "vit_micro"}, path)
    rebuilt, info = _load(path)
    assert info.architecture == "deepvit_micro" and info.architecture_source == "checkpoint metadata"
    x = example_input("ours")
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))
    # --model wins over the metadata: vit_micro has no re-attention weights, so the mismatch is reported
    with pytest.raises(UnsupportedLayoutError, match="unexpected keys"):
        _load(path, model_name="vit_micro")


def test_timm_arch_entry(tmp_path):
    import timm

    model = timm.create_model("vit_micro", depth=8).eval()  # vit_micro's default depth: "arch" alone suffices
    path = tmp_path / "timm_train.pth.tar"
    torch.save({"arch": "vit_micro", "state_dict": model.state_dict(), "epoch": 2}, path)
    rebuilt, info = _load(path)
    assert info.architecture_source == "timm checkpoint 'arch' entry"
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = dict(make("timm-vit").state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    path = save_weights(sd, tmp_path / "w.safetensors", "bare", "safetensors")
    with pytest.raises(UnsupportedLayoutError) as e:
        _load(path)
    msg = str(e.value)
    assert "1 missing keys" in msg and "blocks.1.mlp.fc2.bias" in msg and "blocks.0.attn.extra" in msg


def test_unknown_layout_and_hf_state_dict_errors():
    with pytest.raises(UnsupportedLayoutError, match="--model-code my_vit.py --model MyViT"):  # not a timm name
        infer_architecture({"encoder.weight": torch.zeros(2, 2)})
    hf_sd = {k: v for k, v in make("hf-vit").state_dict().items()}
    with pytest.raises(UnsupportedLayoutError, match="model folder"):
        infer_architecture(hf_sd)


def test_mean_std_override_and_validation(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(make("ours"), path)
    _, info = _load(path, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert info.mean == [0.1, 0.2, 0.3] and info.std == [0.4, 0.5, 0.6] and info.data_source == "--mean/--std"
    with pytest.raises(BadArgumentError, match="together"):
        _load(path, mean=(0.1, 0.2, 0.3))


class _Payload:
    """Unpickling this calls pathlib.Path.touch on the marker file: code execution we must never allow."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": make("timm-vit").state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(RefusedContentError) as e:
        read_checkpoint(path)
    assert "touch" in str(e.value) or "pathlib" in str(e.value)  # the offending global is named
    assert "--trust-pickle" in str(e.value)
    assert not marker.exists()


def test_whole_pickled_model_needs_trust_pickle(tmp_path):
    model = make("timm-vit")
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(RefusedContentError):
        read_checkpoint(path)
    rebuilt, _ = build_model(read_checkpoint(path, trust_pickle=True))
    x = example_input("timm-vit")
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated-safetensors", "truncated-zip"])
def test_broken_files_give_one_line_errors(tmp_path, case):
    path = tmp_path / f"{case}.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 100)
    else:
        sd = make("timm-vit").state_dict()
        fmt = "safetensors" if case.endswith("safetensors") else "torch"
        data = save_weights(sd, tmp_path / "full", "bare", fmt).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MalformedFileError) as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def _save_bare(model, tmp_path, fmt="torch"):
    return save_weights(model.state_dict(), tmp_path / "w.bin", "bare", fmt)


@pytest.mark.parametrize("name,heads,family", [("vit_16b", 12, "DeepViT paper"),
                                               ("vit_small_patch16_224", 6, "ViT-S")])
def test_width_384_heads_follow_the_mlp_ratio(tmp_path, name, heads, family):
    """Same width, different families: the paper's ViT-16B (MLP 3, 12 heads) and timm ViT-S (MLP 4, 6 heads).

    Our vit_16b saved without metadata used to come back with 6 heads from the width table.
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, depth=2, img_size=32, num_classes=10).eval()
    rebuilt, info = _load(_save_bare(model, tmp_path))
    assert info.num_heads == heads and family in info.heads_source and "guess" in info.heads_source
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))
    wrong = timm.create_model(name, depth=2, img_size=32, num_classes=10, num_heads=18 - heads).eval()
    wrong.load_state_dict(model.state_dict())
    assert not torch.allclose(logits(wrong, x), logits(model, x), atol=1e-4)  # the other count would be wrong


def test_reattention_theta_decides_heads_in_our_bare_state_dict(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deepvit_s", embed_dim=48, img_size=32, num_classes=10).eval()  # Θ in blocks 11-15
    rebuilt, info = _load(_save_bare(model, tmp_path, "safetensors"))
    assert info.num_heads == 12 and "re-attention matrix" in info.heads_source and "guess" not in info.heads_source
    assert info.reattn_blocks == list(range(11, 16)) and info.architecture_source == "inferred from weight shapes"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x))


def test_head_evidence_in_every_layout():
    """Planted per-head shapes: each names the count; a full-width q-norm says nothing; disagreement is an error."""
    import timm

    cait = make("timm-cait").state_dict()  # talking heads proj_l / proj_w [4, 4]
    assert head_evidence(cait, 32)[0] == 4 and "talking-heads" in head_evidence(cait, 32)[1]
    with torch.device("meta"):
        relpos = timm.create_model("vit_relpos_small_patch16_224").state_dict()  # rel_pos MLP emits 6 biases
    assert head_evidence(relpos, 384)[0] == 6
    assert head_evidence({"blocks.0.attn.reatten_matrix.weight": torch.zeros(12, 12, 1, 1)}, 384)[0] == 12
    assert head_evidence({"blocks.0.attn.relative_position_bias_table": torch.zeros(732, 8)}, 512)[0] == 8
    assert head_evidence({"blocks.0.attn.q_norm.weight": torch.zeros(32)}, 384)[0] == 12  # head size 32
    assert head_evidence({"blocks.0.attn.q_norm.weight": torch.zeros(384)}, 384) is None  # a norm over the width
    with pytest.raises(UnsupportedLayoutError, match="disagree"):
        head_evidence({"blocks.0.attn.q_norm.weight": torch.zeros(64), "blocks.3.attn.theta.weight":
                       torch.zeros(12, 12, 1, 1)}, 384)


def test_vit_pytorch_head_guess_is_visible_and_overridable(tmp_path):
    """dim_head=32, heads=6 (dim 192): the default head size 64 says 3; the guess must show on every report."""
    from vit_pytorch import ViT

    from collapse_probe.probing.run import probe
    from collapse_probe.reports.audit import verdict
    from collapse_probe.reports.text import render

    torch.manual_seed(0)
    model = ViT(image_size=32, patch_size=8, num_classes=10, dim=192, depth=2, heads=6, mlp_dim=384,
                dim_head=32).eval()
    path = _save_bare(model, tmp_path)
    _, info = _load(path)
    assert info.num_heads == 3 and "guess" in info.heads_source
    result = probe(path, images=torch.randn(2, 3, 32, 32), progress=False)
    lines = render(result, "table").splitlines()
    assert lines[0].startswith("VERDICT: ")  # the answer first, then the model line with the warning
    model_line = next(line for line in lines if line.startswith("model"))
    assert "HEADS GUESSED" in model_line and "3 heads" in model_line
    assert "is a guess" in verdict(result)["text"][1] and "--num-heads" in verdict(result)["text"][1]
    right, info6 = _load(path, num_heads=6)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(right, x), logits(model, x))
    assert info6.heads_source == "--num-heads" and not any("guess" in t for t in verdict(
        probe(path, num_heads=6, images=x, progress=False))["text"])
