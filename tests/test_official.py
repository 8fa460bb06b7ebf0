"""Official DeepViT checkpoints (zhoudaquan/dvit_repo layout): recognised from their keys alone, mapped onto our
models, and computing what the official model computes.

The state dicts here are written from the layout described in /work/shared/paper-notes.md ("Official checkpoint
layout"), not from our model, and ``official_forward`` is an independent functional forward of the official
semantics, so a renaming or scale mistake in ``loading.official`` shows up as a logit mismatch.

    PYTHONPATH=. pytest tests/test_official.py -q
"""
from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import collapse_probe.models  # noqa: F401  (registers our presets)
from collapse_probe.errors import UnsupportedLayoutError
from collapse_probe.loading import official
from collapse_probe.loading.build import build_model, instantiate
from collapse_probe.loading.infer import infer_architecture
from collapse_probe.loading.read import read_checkpoint

# name -> (depth, dim, Re-attention blocks, CNN stem, scale_adjustment, transform_scale, image size), from the notes
PAPER = {
    "deepvit_patch16_224_re_attn_16b": (16, 384, list(range(16)), False, 1.0, False, 224),
    "deepvit_patch16_224_re_attn_24b": (24, 384, list(range(24)), False, 1.0, False, 224),
    "deepvit_patch16_224_re_attn_32b": (32, 384, list(range(32)), False, 1.0, False, 224),
    "deepvit_S": (16, 396, list(range(11, 16)), True, 0.5, True, 224),
    "deepvit_L": (32, 420, list(range(20, 32)), True, 0.5, False, 224),
    "deepvit_L_384": (32, 420, list(range(20, 32)), True, 0.5, False, 384),
}
HEADS, TINY_DIM, STEM_CHS = 12, 24, 64
TINY_IMG = {"deepvit_L_384": 48}  # tiny stand-ins: 32 px (2 x 2 patches), L_384 larger, as 384 is to 224


def official_state_dict(name: str, dim: int | None = None, img: int | None = None, classes: int = 10,
                        device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes (real depth and Re-attention pattern of ``name``)."""
    depth, paper_dim, reattn, conv, _, _, paper_img = PAPER[name]
    d, img = dim or paper_dim, img or paper_img
    g = torch.Generator().manual_seed(seed)

    def w(*shape, fan_in=None, center=0.0, kind="normal"):
        if device == "meta":
            return torch.empty(shape, device="meta")
        if kind == "var":  # BatchNorm running variance: positive
            return 0.5 + torch.rand(shape, generator=g)
        std = 1.0 / math.sqrt(fan_in) if fan_in else 0.1
        return center + std * torch.randn(shape, generator=g)

    def bn(pre, c):
        return {f"{pre}.weight": w(c, center=1.0), f"{pre}.bias": w(c), f"{pre}.running_mean": w(c),
                f"{pre}.running_var": w(c, kind="var"), f"{pre}.num_batches_tracked": torch.tensor(100)}

    tokens = (img // 16) ** 2 + 1
    sd = {"cls_token": w(1, 1, d, center=0.0), "pos_embed": w(1, tokens, d)}
    if conv:
        sd.update({"patch_embed.conv1.weight": w(STEM_CHS, 3, 7, 7, fan_in=3 * 49), **bn("patch_embed.bn1", STEM_CHS),
                   "patch_embed.conv2.weight": w(STEM_CHS, STEM_CHS, 3, 3, fan_in=STEM_CHS * 9),
                   **bn("patch_embed.bn2", STEM_CHS), "patch_embed.proj.weight": w(d, STEM_CHS, 8, 8,
                                                                                   fan_in=STEM_CHS * 64),
                   "patch_embed.proj.bias": w(d)})
    else:
        sd.update({"patch_embed.proj.weight": w(d, 3, 16, 16, fan_in=3 * 256), "patch_embed.proj.bias": w(d)})
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({f"{b}norm1.weight": w(d, center=1.0), f"{b}norm1.bias": w(d),
                   f"{b}attn.qkv.weight": w(3 * d, d, fan_in=d / 4), f"{b}attn.qkv.bias": w(3 * d),
                   f"{b}attn.proj.weight": w(d, d, fan_in=d), f"{b}attn.proj.bias": w(d),
                   f"{b}norm2.weight": w(d, center=1.0), f"{b}norm2.bias": w(d),
                   f"{b}mlp.fc1.weight": w(3 * d, d, fan_in=d), f"{b}mlp.fc1.bias": w(3 * d),
                   f"{b}mlp.fc2.weight": w(d, 3 * d, fan_in=3 * d), f"{b}mlp.fc2.bias": w(d)})
        if i in reattn:
            sd.update({f"{b}attn.reatten_matrix.weight": w(HEADS, HEADS, 1, 1, fan_in=HEADS),
                       f"{b}attn.reatten_matrix.bias": w(HEADS), **bn(f"{b}attn.var_norm", HEADS)})
    sd.update({"norm.weight": w(d, center=1.0), "norm.bias": w(d), "head.weight": w(classes, d, fan_in=d),
               "head.bias": w(classes)})
    return sd


def _bn(x: torch.Tensor, sd: dict, pre: str) -> torch.Tensor:
    """Eval-mode BatchNorm2d over dim 1 (eps 1e-5, PyTorch's default), written out."""
    shape = (1, -1, 1, 1)
    inv = (sd[f"{pre}.running_var"] + 1e-5).rsqrt().view(shape)
    return (x - sd[f"{pre}.running_mean"].view(shape)) * inv * sd[f"{pre}.weight"].view(shape) + \
        sd[f"{pre}.bias"].view(shape)


def _ln(x: torch.Tensor, sd: dict, pre: str) -> torch.Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * sd[f"{pre}.weight"] + sd[f"{pre}.bias"]


def _lin(x: torch.Tensor, sd: dict, pre: str) -> torch.Tensor:
    return x @ sd[f"{pre}.weight"].T + sd[f"{pre}.bias"]


def _embed(sd: dict, x: torch.Tensor) -> torch.Tensor:
    if "patch_embed.conv1.weight" in sd:
        # "same" padding (3, then 1): the only one that keeps 224 px at 14 x 14 tokens, as pos_embed [1, 197, d] says
        x = F.relu(_bn(F.conv2d(x, sd["patch_embed.conv1.weight"], stride=2, padding=3), sd, "patch_embed.bn1"))
        x = F.relu(_bn(F.conv2d(x, sd["patch_embed.conv2.weight"], padding=1), sd, "patch_embed.bn2"))
    # the last conv is non-overlapping (kernel = stride): 8 after the stem's stride 2, else 16 (4 in our micro preset)
    proj = sd["patch_embed.proj.weight"]
    x = F.conv2d(x, proj, sd["patch_embed.proj.bias"], stride=proj.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    return torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]


def _attention(sd: dict, b: str, x: torch.Tensor, heads: int, transform_scale: bool) -> torch.Tensor:
    B, N, C = x.shape
    hd = C // heads
    q, k, v = _lin(x, sd, f"{b}attn.qkv").view(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) * hd ** -0.5, -1)
    if f"{b}attn.reatten_matrix.weight" in sd:  # Θ as a 1x1 conv over heads, BatchNorm2d(H), then the scale
        theta = sd[f"{b}attn.reatten_matrix.weight"][:, :, 0, 0]
        attn = torch.einsum("gh,bhnm->bgnm", theta, attn) + sd[f"{b}attn.reatten_matrix.bias"].view(1, -1, 1, 1)
        attn = _bn(attn, sd, f"{b}attn.var_norm") * (hd ** -0.5 if transform_scale else 1.0)
    out = torch.einsum("bhnm,bhmd->bhnd", attn, v).transpose(1, 2).reshape(B, N, C)
    return _lin(out, sd, f"{b}attn.proj")


def official_forward(sd: dict, x: torch.Tensor, heads: int, s: float, transform_scale: bool) -> torch.Tensor:
    """Logits of the official DeepViT: x + attn(norm1(x * s)) / s, then x + mlp(norm2(x * s)) / s; class token."""
    x = _embed(sd, x)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        x = x + _attention(sd, b, _ln(x * s, sd, f"{b}norm1"), heads, transform_scale) / s
        hidden = F.gelu(_lin(_ln(x * s, sd, f"{b}norm2"), sd, f"{b}mlp.fc1"))
        x = x + _lin(hidden, sd, f"{b}mlp.fc2") / s
    return _lin(_ln(x, sd, "norm")[:, 0], sd, "head")


def _tiny(name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    img = TINY_IMG.get(name, 32)
    sd = official_state_dict(name, dim=TINY_DIM, img=img)
    return sd, torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))


def _reference(name: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    _, _, _, _, s, transform, _ = PAPER[name]
    with torch.no_grad():
        return official_forward(sd, x, HEADS, s, transform)


def save(sd: dict, path, fmt: str, name: str):
    """``fmt``: "torch" (bare torch.save), "safetensors", or "timm-train" (timm 0.3 train.py's dict, DDP prefix)."""
    sd = {k: v.contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif fmt == "torch":
        torch.save(sd, path)
    else:
        args = argparse.Namespace(model=name, lr=5e-4, epochs=300, mean=None, opt_betas=None, sched="cosine",
                                  smoothing=0.1, mixup=0.8, amp=False, img_size=None, crop_pct=None)
        ddp = {f"module.{k}": v for k, v in sd.items()}
        torch.save({"epoch": 299, "arch": name, "state_dict": ddp, "optimizer": {"state": {}, "param_groups": [
            {"lr": 1e-5, "params": [0, 1]}]}, "version": 2, "args": args, "state_dict_ema": ddp, "metric": 80.9},
            path)
    return path


@pytest.mark.parametrize("name", list(PAPER))
def test_real_size_layout_is_recognised_from_keys_alone(name):
    """Real-size key layouts on the meta device: architecture, depth, heads, Re-attention, stem and input size."""
    depth, dim, reattn, conv, s, transform, img = PAPER[name]
    sd = official_state_dict(name, device="meta", classes=1000)
    assert official.is_official(sd)
    spec = infer_architecture(sd)
    kw = spec.kwargs
    assert (kw["depth"], kw["embed_dim"], spec.heads, kw["reattn_blocks"], kw["img_size"]) == (depth, dim, HEADS,
                                                                                               reattn, img)
    assert kw["stem"] == ("conv" if conv else "patch") and spec.input_size == (3, img, img)
    assert kw["res_scale"] == 1 / s and kw["reattn_scale"] == ("head_dim" if transform else 1.0)
    assert "re-attention matrix" in spec.heads_source and "guess" not in spec.heads_source
    with torch.device("meta"):
        model = instantiate(spec)
    ours = official.to_ours(sd)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.mark.parametrize("name,params", [("deepvit_S", 27_312_632), ("deepvit_patch16_224_re_attn_16b", 24_426_664)])
def test_parameter_counts_match_the_official_ones(name, params):
    """Planted ground truth from the notes: parameter counts of the official models (running stats excluded)."""
    with torch.device("meta"):
        model = instantiate(infer_architecture(official_state_dict(name, device="meta", classes=1000)))
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "timm-train"])
@pytest.mark.parametrize("name", list(PAPER))
def test_logits_equal_an_independent_official_forward(tmp_path, name, fmt):
    sd, x = _tiny(name)
    path = save(sd, tmp_path / "ckpt.bin", fmt, name)
    model, info = build_model(read_checkpoint(path))
    depth, _, reattn, _, _, _, _ = PAPER[name]
    assert (info.depth, info.num_heads, info.reattn_blocks) == (depth, HEADS, reattn)
    assert info.input_size == [3, x.shape[-1], x.shape[-1]] and info.layout == official.LAYOUT
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _reference(name, sd, x), atol=1e-5, rtol=1e-4)
    if fmt == "timm-train":
        assert info.key == "state_dict" and "(official DeepViT)" in info.architecture_source


def test_arch_as_lowered_class_name_falls_back_to_args_model(tmp_path):
    """timm writes ``arch`` as the class name lowered in some versions; args.model names the registered model."""
    sd, x = _tiny("deepvit_S")
    path = tmp_path / "train.pth.tar"
    torch.save({"arch": "deepvisiontransformer", "state_dict": sd, "args": argparse.Namespace(model="deepvit_S")},
               path)
    model, info = build_model(read_checkpoint(path))
    assert info.architecture_source == "timm checkpoint args.model (official DeepViT)"
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference("deepvit_S", sd, x), atol=1e-5, rtol=1e-4)


def test_model_flag_takes_an_official_name(tmp_path):
    """The name decides what the weights cannot show: a CNN-stem model off both fingerprints needs it."""
    sd, x = _tiny("deepvit_L")
    off_pattern = {k: v for k, v in sd.items() if not k.startswith(("blocks.31.", "blocks.30."))}  # 30 blocks
    path = save(off_pattern, tmp_path / "w.pt", "torch", "deepvit_L")
    with pytest.raises(UnsupportedLayoutError, match="--model deepvit_S or --model deepvit_L"):
        build_model(read_checkpoint(path))
    for name in ("deepvit_S", "deepvit_L"):
        model, info = build_model(read_checkpoint(path), model_name=name)
        assert info.depth == 30 and any("shapes differ" in n for n in info.notes)
        with torch.no_grad():
            torch.testing.assert_close(model(x), _reference(name, off_pattern, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["deepvit_micro", "deepvit_s", "deepvit_16b"])
def test_our_models_round_trip_through_the_official_layout(tmp_path, preset):
    small = {"deepvit_micro": dict(depth=3), "deepvit_s": dict(embed_dim=TINY_DIM, img_size=32),
             "deepvit_16b": dict(embed_dim=TINY_DIM, img_size=32, depth=4)}[preset]
    torch.manual_seed(0)
    ours = timm.create_model(preset, **small).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a swapped running_mean / var would show
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    off = official.to_official(ours.state_dict())
    assert official.is_official(off) and not any(".theta." in k or ".mix_norm." in k for k in off)
    assert official.to_ours(off).keys() == ours.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    args = ours.collapse_probe_args["model_args"]
    s = 1.0 / args.get("res_scale", 1.0)
    with torch.no_grad():
        want = official_forward({k: v.float() for k, v in off.items()}, x, args["num_heads"], s,
                                args.get("reattn_scale") == "head_dim")
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-4)
    model, _ = build_model(read_checkpoint(save(off, tmp_path / "o.safetensors", "safetensors", preset)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=1e-5, rtol=1e-4)


def test_layer_norm_variant_cannot_be_written_in_the_official_layout():
    sd = timm.create_model("deepvit_micro", depth=2, mix_norm="ln").state_dict()
    with pytest.raises(UnsupportedLayoutError, match="official DeepViT layout"):
        official.to_official(sd)


FORMATS = ("torch", "safetensors", "timm-train")
# every (architecture, format) pair runs through both commands; one format per architecture (each format twice)
# stays in the quick suite, the other twelve pairs are heavy (about 10 s each on one CPU core)
CLI_CASES = [pytest.param(name, fmt, marks=() if fmt == FORMATS[i % 3] else pytest.mark.heavy)
             for i, name in enumerate(PAPER) for fmt in FORMATS]


@pytest.mark.parametrize("name,fmt", CLI_CASES)
def test_similarity_and_audit_commands_without_model_or_trust_pickle(tmp_path, name, fmt):
    """Acceptance: an official state dict as torch.save / safetensors / timm training file (argparse.Namespace args)
    runs through ``collapse-probe similarity`` and ``audit`` with no --model and no --trust-pickle."""
    import json

    from click.testing import CliRunner

    from collapse_probe.cli import main

    sd, x = _tiny(name)
    path = save(sd, tmp_path / "ckpt.pth", fmt, name)
    depth, _, reattn, _, _, _, _ = PAPER[name]
    common = ["--images", "builtin:photos", "--num-images", "2", "--no-progress"]
    res = CliRunner().invoke(main, ["similarity", str(path), "--format", "json", *common])
    assert res.exit_code == 0, res.output
    model = json.loads(res.output)["model"]
    res = CliRunner().invoke(main, ["audit", str(path), "-o", str(tmp_path / "report"), *common])
    assert res.exit_code == 0, res.output
    audited = json.loads((tmp_path / "report" / "metrics.json").read_text())["model"]
    for m in (model, audited):
        assert (m["depth"], m["num_heads"], m["reattn_blocks"]) == (depth, HEADS, reattn)
        assert m["input_size"] == [3, x.shape[-1], x.shape[-1]] and m["layout"] == official.LAYOUT


def test_namespace_allowed_but_what_it_holds_still_scanned(tmp_path):
    """argparse.Namespace is plain data; a Namespace smuggling another global is refused as before."""
    import pathlib

    from collapse_probe.errors import RefusedContentError

    sd, _ = _tiny("deepvit_S")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "args": argparse.Namespace(model="deepvit_S", output=pathlib.PurePosixPath("/x"))},
               path)
    with pytest.raises(RefusedContentError, match="PurePosixPath"):
        read_checkpoint(path)
    assert read_checkpoint(save(sd, tmp_path / "ok.pth", "timm-train", "deepvit_S")).args_model == "deepvit_S"
    import torch.serialization as ts

    assert argparse.Namespace not in ts.get_safe_globals()  # scoped to our loads, not added process-wide
