"""Checkpoints as their ecosystems save them (issue 12): a named timm model saved at another size (DINOv2 with
registers, EVA-02), bare timm CaiT / EVA-02 / Swin / XCiT state dicts, and Lightning files with loss buffers or a
``net.`` prefix. Every case ends in maps equal to an independent reference (q/k recomputed from the original
model's own modules) or in a one-line refusal with exit code 5 that says why.

    PYTHONPATH=. pytest tests/test_ingest_families.py -q
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner

import collapse_probe.models  # noqa: F401  (registers our presets)
from collapse_probe.cli import main
from collapse_probe.errors import BadArgumentError, UnsupportedLayoutError
from collapse_probe.hooks.capture import capture
from collapse_probe.loading.build import load_model
from collapse_probe.probing.run import probe

from .family_models import CAIT_ARGS, TIMM_SMALL
from .test_capture_families import _record, _softmax_qk, _split_qkv

COMMON = ["--images", "builtin:photos", "--num-images", "2", "--batch-size", "2", "--no-progress"]


def _qk_maps(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q_norm(q) k_norm(k)^T * scale) per block, from the qkv outputs of the model's own timm ``Attention``
    modules (the norms are Identity without qk_norm)."""
    def maps(o: torch.Tensor, m: torch.nn.Module) -> torch.Tensor:
        q, k = _split_qkv(o, m.num_heads)
        return _softmax_qk(m.q_norm(q), m.k_norm(k), m.scale)

    specs = [(b.attn.qkv, lambda a, kw, o, m=b.attn: maps(o, m)) for b in model.blocks]
    return [r[0] for r in _record(model, lambda: model(x), specs)]


def _captured(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), capture(model) as cap:
        model(x)
    return cap.kind("probs")


def _assert_maps(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def _cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def _refused(code: int, err: str, *needles: str) -> None:
    assert code == 5, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- 1. a named model whose default grid differs from the file's ---------------------------------------------------

@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """timm DINOv2 ViT-S/14 with 4 registers, built at 56 px (a 4x4 grid instead of the name's 37x37), torch.save."""
    torch.manual_seed(0)
    original = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56).eval()
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_reg4_56px.pth"
    torch.save(original.state_dict(), path)
    return original, path


def test_named_model_is_built_at_the_files_grid_with_maps_of_the_saved_model(dinov2_file):
    original, path = dinov2_file
    assert original.no_embed_class and original.num_prefix_tokens == 5  # class + 4 registers, none in pos_embed
    loaded = load_model(path, "vit_small_patch14_reg4_dinov2")
    info = loaded.info
    assert info.input_size == [3, 56, 56] and info.tokens == 16 + 5 and info.num_heads == 6
    assert len(info.adjustments) == 1 and "4x4 patch grid (img_size 56)" in info.adjustments[0]
    assert "defaults to 37x37 (518 px)" in info.adjustments[0] and "not resampled" in info.adjustments[0]
    assert info.architecture_source == f"--model; {info.adjustments[0]}"
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    _assert_maps(_captured(loaded.model, x), _qk_maps(original, x))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x))


def test_grid_choice_is_shown_in_the_table_header_json_and_audit(dinov2_file, tmp_path):
    _, path = dinov2_file
    code, out, err = _cli("similarity", path, "--model", "vit_small_patch14_reg4_dinov2", *COMMON)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("model "))  # after the verdict line
    assert header.startswith("model    vit_small_patch14_reg4_dinov2 (--model; built at the file's 4x4 patch grid")
    code, out, err = _cli("similarity", path, "--model", "vit_small_patch14_reg4_dinov2", "--format", "json", *COMMON)
    assert code == 0, err
    model = json.loads(out)["model"]
    assert model["input_size"] == [3, 56, 56] and "4x4 patch grid" in model["adjustments"][0]
    code, _, err = _cli("audit", path, "--model", "vit_small_patch14_reg4_dinov2", "-o", tmp_path / "r", *COMMON)
    assert code == 0, err
    row = next(ln for ln in (tmp_path / "r" / "report.md").read_text().splitlines() if "architecture" in ln)
    assert "vit_small_patch14_reg4_dinov2 (source: --model; built at the file's 4x4 patch grid" in row


def test_named_model_at_its_own_grid_has_no_adjustment(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32)  # the name's model at another grid
    torch.save(model.state_dict(), tmp_path / "a.pt")
    info = load_model(tmp_path / "a.pt", "vit_tiny_patch16_224").info
    assert info.input_size == [3, 32, 32] and "2x2 patch grid" in info.adjustments[0]
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp_path / "b.pt")
    info = load_model(tmp_path / "b.pt", "vit_tiny_patch16_224").info
    assert info.adjustments == [] and info.architecture_source == "--model" and info.input_size == [3, 224, 224]


# --- 6. bare timm CaiT and EVA-02 state dicts ------------------------------------------------------------------------

def test_bare_timm_cait_is_inferred_as_cait_with_talking_heads_heads(tmp_path):
    torch.manual_seed(0)
    original = timm.create_model("cait_xxs24_224", **CAIT_ARGS).eval()
    torch.save(original.state_dict(), tmp_path / "cait.pth")
    loaded = load_model(tmp_path / "cait.pth")
    info = loaded.info
    assert type(loaded.model).__name__ == "Cait" and info.architecture.startswith("timm:Cait(")
    assert info.num_heads == 4 and "talking-heads matrix shape (4, 4)" in info.heads_source
    assert info.depth == CAIT_ARGS["depth"]  # class-attention blocks (blocks_token_only) are not token-to-token maps
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x))

    def talking_heads(o, m):  # timm TalkingHeadAttn: proj_l mixes heads before the softmax
        q, k = _split_qkv(o, m.num_heads)
        return m.proj_l(((q * m.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)

    specs = [(b.attn.qkv, lambda a, kw, o, m=b.attn: talking_heads(o, m)) for b in original.blocks]
    _assert_maps(_captured(loaded.model, x), [r[0] for r in _record(original, lambda: original(x), specs)])


@pytest.fixture(scope="module")
def eva02_file(tmp_path_factory):
    """timm EVA-02 tiny (rotary position embedding, SwiGLU) built at 28 px, saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    original = timm.create_model("eva02_tiny_patch14_224", img_size=28).eval()
    path = tmp_path_factory.mktemp("eva02") / "eva02_tiny_28px.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    return original, path


def test_bare_eva02_is_refused_with_the_reason_and_the_way_out(eva02_file):
    _, path = eva02_file
    with pytest.raises(UnsupportedLayoutError, match="EVA-02.*rotary position embedding.*pass --model NAME") as e:
        load_model(path)
    assert "Beit" not in str(e.value)
    code, _, err = _cli("similarity", path, *COMMON)
    _refused(code, err, "EVA-02", "--model NAME")


def test_eva02_with_model_name_keeps_the_names_rope_at_the_files_grid(eva02_file):
    from timm.layers import apply_rot_embed_cat

    original, path = eva02_file
    loaded = load_model(path, "eva02_tiny_patch14_224")
    assert "2x2 patch grid (img_size 28)" in loaded.info.adjustments[0] and loaded.info.num_heads == 3
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    ropes, qs, ks = [], [], []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, kw: ropes.append(kw.get("rope")), with_kwargs=True)
             for b in original.blocks]
    hooks += [b.attn.q_norm.register_forward_hook(lambda m, a, o: qs.append(o)) for b in original.blocks]
    hooks += [b.attn.k_norm.register_forward_hook(lambda m, a, o: ks.append(o)) for b in original.blocks]
    with torch.no_grad():
        original(x)
    for h in hooks:
        h.remove()
    want = []
    for b, rope, q, k in zip(original.blocks, ropes, qs, ks, strict=True):
        n, half = b.attn.num_prefix_tokens, getattr(b.attn, "rotate_half", False)
        q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)], dim=2)
        want.append(_softmax_qk(q, k, b.attn.scale))
    _assert_maps(_captured(loaded.model, x), want)


# --- 7. Swin and XCiT: refused with the reason, with and without --model ---------------------------------------------

@pytest.mark.parametrize("name,kw,why", [
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 16,
                                      "depths": (1, 1), "num_heads": (2, 2), "num_classes": 10},
     "windowed attention is not supported"),
    ("xcit_nano_12_p16_224", {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 4, "num_classes": 10},
     "cross-covariance attention is over channels, not tokens"),
])
def test_swin_and_xcit_state_dicts_are_refused_on_the_command_line(tmp_path, name, kw, why):
    torch.save(timm.create_model(name, **kw).state_dict(), tmp_path / "w.pth")
    for extra in ((), ("--model", name)):
        code, _, err = _cli("similarity", tmp_path / "w.pth", *extra, *COMMON)
        _refused(code, err, why)


# --- 5. Lightning files and --prefix ---------------------------------------------------------------------------------

def _lightning(sd: dict, attr: str = "model") -> dict:
    """What Lightning's ModelCheckpoint writes for a LightningModule with ``self.<attr> = vit`` and a weighted loss."""
    return {"state_dict": {**{f"{attr}.{k}": v for k, v in sd.items()}, "criterion.weight": torch.rand(10)},
            "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.1.0",
            "hyper_parameters": {"lr": 1e-3, "num_classes": 10}, "optimizer_states": [], "lr_schedulers": []}


@pytest.mark.parametrize("attr", ["model", "net"])
def test_lightning_model_keys_are_the_models_not_the_loss_buffers(tmp_path, attr):
    torch.manual_seed(0)
    original = timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TIMM_SMALL).eval()
    torch.save(_lightning(original.state_dict(), attr), tmp_path / "last.ckpt")
    loaded = load_model(tmp_path / "last.ckpt")
    info = loaded.info
    assert info.key == "state_dict" and info.prefix == f"{attr}." and info.num_heads == 4
    assert any("left out 1 key(s) outside it: criterion.weight" in n for n in info.notes)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x))
    _assert_maps(_captured(loaded.model, x), _qk_maps(original, x))


def test_prefix_selects_the_model_where_nothing_else_can(tmp_path):
    """A distillation file holds two models: no rule can pick one; --prefix can, in the library and the CLI."""
    torch.manual_seed(0)
    student = timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TIMM_SMALL).eval()
    teacher = timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TIMM_SMALL).eval()
    sd = {**{f"student.{k}": v for k, v in student.state_dict().items()},
          **{f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    torch.save(_lightning({}, "model") | {"state_dict": sd}, tmp_path / "distill.ckpt")
    with pytest.raises(UnsupportedLayoutError, match="cannot infer the architecture"):
        load_model(tmp_path / "distill.ckpt")
    loaded = load_model(tmp_path / "distill.ckpt", prefix="teacher")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), teacher(x))
    assert loaded.info.prefix == "teacher." and "--prefix" in loaded.info.notes[0]
    result = probe(tmp_path / "distill.ckpt", x, prefix="teacher.", progress=False, device="cpu")
    assert result.model.prefix == "teacher." and result.depth == 2
    code, out, err = _cli("similarity", tmp_path / "distill.ckpt", "--prefix", "student", "--format", "json", *COMMON)
    assert code == 0, err
    assert json.loads(out)["model"]["prefix"] == "student."
    code, _, err = _cli("similarity", tmp_path / "distill.ckpt", "--prefix", "ema", *COMMON)
    assert code == 2 and "no key starts with 'ema.'" in err and "student, teacher" in err
    with pytest.raises(BadArgumentError, match="non-empty prefix"):
        load_model(tmp_path / "distill.ckpt", prefix=".")


def test_lightning_module_that_is_the_model_keeps_its_keys(tmp_path):
    """A LightningModule whose own attributes are the ViT's parts: no first-level name is a wrapper, nothing is cut."""
    torch.manual_seed(0)
    original = timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TIMM_SMALL).eval()
    torch.save({"state_dict": original.state_dict(), "pytorch-lightning_version": "2.1.0"}, tmp_path / "m.ckpt")
    loaded = load_model(tmp_path / "m.ckpt")
    assert loaded.info.prefix is None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x))


def test_bare_siglip_state_dict_is_inferred_with_its_attention_pool_head(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_siglip_224", depth=2, embed_dim=64, num_heads=4, img_size=64,
                              num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / "siglip.pth")
    loaded = load_model(tmp_path / "siglip.pth", num_heads=4)
    assert "attn_pool" in " ".join(loaded.info.notes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), model(x))  # MAP head read, not dropped
    result = probe(loaded, x, progress=False)
    assert result.attention["probs"].similarity.shape == (2, 2)  # the pool's one-query map is not a block


def test_bare_rope_vit_is_refused_with_the_reason_and_the_way_out(tmp_path):
    model = timm.create_model("vit_base_patch16_rope_reg1_gap_256", depth=2, embed_dim=64, num_heads=4, img_size=64)
    torch.save(model.state_dict(), tmp_path / "rope.pth")
    res = CliRunner().invoke(main, ["similarity", str(tmp_path / "rope.pth"), "--num-heads", "4", "--num-images", "2",
                                    "--no-progress"])
    assert res.exit_code == 5 and "rotary position embedding" in res.stderr and "--model" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
