"""Old library layouts read from the file alone, and models of any channel count on every image set.

    PYTHONPATH=. pytest tests/test_old_layouts.py -q

vit-pytorch's ViT as the library wrote it in late 2020 and in 2021 is reproduced here (key names and forward, written
for this test from the facts of its history: ``patch_to_embedding``, Residual(PreNorm(...)), the softmax scale of the
model width until 2021-01-21, ``to_patch_embedding`` = Rearrange then Linear, PreNorm blocks, ``dim_head``); our loader
must build a model whose logits and maps equal these models'. Then a 1-channel torchvision ViT and a 1-channel timm ViT
(MNIST-style) run on builtin:digits and builtin:photos.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from PIL import Image
from torch import nn

from collapse_probe.hooks.capture import capture
from collapse_probe.loading.build import load_model
from collapse_probe.loading.images import ProbeImages, for_channels, image_loader

from .conftest import run_cli

FAST = ["--num-images", "4", "--batch-size", "4", "--no-progress"]


# ---- vit-pytorch ViT, 2020 and 2021 ----------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class OldAttention(nn.Module):
    """q, k, v of width heads * dim_head (dim_head = dim // heads before Dec 2020); ``scale`` given by the era."""

    def __init__(self, dim, heads, dim_head, scale, project_out=True):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, scale
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0)) if project_out else nn.Identity()
        self.maps = None

    def forward(self, x):
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(dim=-1)
        self.maps = attn  # what the model itself computed, kept for the comparison
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class ViT2020(nn.Module):
    """patch_to_embedding, Residual(PreNorm) blocks, scale dim ** -0.5 of the model width; ``long_head``: the
    mlp_head of Oct-Dec 2020 (LayerNorm, Linear(dim, mlp_dim), GELU, Dropout, Linear)."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, dim_head=None,
                 channels=3, long_head=False):
        super().__init__()
        dim_head = dim_head or dim // heads
        self.patch_size = patch_size
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, dim))
        self.patch_to_embedding = nn.Linear(channels * patch_size ** 2, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList([nn.ModuleList([
            Residual(PreNorm(dim, OldAttention(dim, heads, dim_head, dim ** -0.5))),
            Residual(PreNorm(dim, FeedForward(dim, mlp_dim)))]) for _ in range(depth)])
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0),
                                      nn.Linear(mlp_dim, num_classes)) if long_head else \
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        p = self.patch_size
        x = self.patch_to_embedding(rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p))
        b, n, _ = x.shape
        x = torch.cat((repeat(self.cls_token, "() n d -> b n d", b=b), x), dim=1) + self.pos_embedding[:, :n + 1]
        for attn, ff in self.transformer.layers:
            x = ff(attn(x))
        return self.mlp_head(x[:, 0])


class ViT2021(nn.Module):
    """to_patch_embedding = Rearrange then Linear, PreNorm blocks with the residual outside, dim_head 64 (no output
    projection for one head of the model's width)."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, dim_head=64, channels=3):
        super().__init__()
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.Linear(channels * patch_size ** 2, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList([nn.ModuleList([
            PreNorm(dim, OldAttention(dim, heads, dim_head, dim_head ** -0.5, not (heads == 1 and dim_head == dim))),
            PreNorm(dim, FeedForward(dim, mlp_dim))]) for _ in range(depth)])
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat((repeat(self.cls_token, "() n d -> b n d", b=b), x), dim=1) + self.pos_embedding[:, :n + 1]
        for attn, ff in self.transformer.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.mlp_head(x[:, 0])


OLD = {
    "2020": lambda: ViT2020(image_size=32, patch_size=8, num_classes=10, dim=128, depth=3, heads=2, mlp_dim=96),
    "2020-long-head-dim-head": lambda: ViT2020(image_size=32, patch_size=8, num_classes=10, dim=96, depth=2, heads=2,
                                               mlp_dim=64, dim_head=64, long_head=True),
    "2021": lambda: ViT2021(image_size=32, patch_size=8, num_classes=10, dim=96, depth=3, heads=2, mlp_dim=64),
    "2021-grey": lambda: ViT2021(image_size=28, patch_size=7, num_classes=10, dim=64, depth=2, heads=1, mlp_dim=64,
                                 channels=1),
}


def _old_maps(model: nn.Module) -> list[torch.Tensor]:
    return [m.maps for m in model.modules() if isinstance(m, OldAttention)]


@pytest.mark.parametrize("name", list(OLD))
def test_old_vit_pytorch_layouts_read_without_model_code(tmp_path, name):
    torch.manual_seed(0)
    model = OLD[name]().eval()
    torch.save(model.state_dict(), tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    info = loaded.info
    assert info.architecture.startswith(f"vit-pytorch:ViT-{name[:4]}(")
    assert info.family == "vit-pytorch" and info.depth == len(_old_maps(model))
    chans = 1 if "grey" in name else 3
    size = 28 if "grey" in name else 32
    assert info.input_size == [chans, size, size]
    x = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        with capture(loaded.model) as cap:
            got = loaded.model(x)
    torch.testing.assert_close(got, expected)
    want = _old_maps(model)
    for ours, theirs in zip(cap.kind("probs"), want, strict=True):
        torch.testing.assert_close(ours, theirs)
    if name.startswith("2020"):  # the model-width scale is what makes these maps: with dim_head's they differ
        assert any("dim ** -0.5 of the model width" in a for a in info.adjustments)
        attn, dim = model.transformer.layers[0][0].fn.fn, model.pos_embedding.shape[-1]
        assert attn.scale == dim ** -0.5 != (attn.to_qkv.weight.shape[0] // 3 // attn.heads) ** -0.5


def test_old_layout_on_the_command_line(tmp_path):
    torch.manual_seed(0)
    torch.save(OLD["2021-grey"]().state_dict(), tmp_path / "grey2021.pth")
    res = run_cli("similarity", tmp_path / "grey2021.pth", "--images", "builtin:digits", *FAST,
                  "-o", tmp_path / "out.json")
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["model"]["input_size"] == [1, 28, 28] and len(doc["attention"]["probs"]["blocks"]) == 2


# ---- grey models -----------------------------------------------------------------------------------------------------

def _grey_torchvision() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=384,
                              num_classes=10)
    model.conv_proj = nn.Conv2d(1, 192, kernel_size=7, stride=7)  # how MNIST users adapt it
    return model.eval()


def test_one_channel_torchvision_file(tmp_path):
    model = _grey_torchvision()
    torch.save(model.state_dict(), tmp_path / "tv_grey.pt")
    loaded = load_model(tmp_path / "tv_grey.pt")
    assert loaded.info.input_size == [1, 28, 28] and loaded.info.num_heads == 3
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        with capture(loaded.model) as cap:
            got = loaded.model(x)
    torch.testing.assert_close(got, expected)
    # recompute block 1's map from q and k: its input is the embedded patches plus the class token and positions
    with torch.no_grad():
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(2, -1, -1), tokens], 1) + model.encoder.pos_embedding
        layer = model.encoder.layers[0]
        h = layer.ln_1(tokens)
        w, b = layer.self_attention.in_proj_weight, layer.self_attention.in_proj_bias
        q, k = (rearrange(h @ w[i * 192:(i + 1) * 192].T + b[i * 192:(i + 1) * 192], "b n (h d) -> b h n d", h=3)
                for i in (0, 1))
        ref = torch.softmax(q @ k.transpose(-2, -1) / 64 ** 0.5, -1)
    torch.testing.assert_close(cap.kind("probs")[0], ref, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def grey_timm(tmp_path_factory):
    """An MNIST-style timm ViT: 1 input channel, 28 px, patch 4, saved as a bare state dict."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=28, patch_size=4,
                              depth=3, num_classes=10)
    path = tmp_path_factory.mktemp("grey") / "mnist_vit.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("images", ["builtin:digits", "builtin:photos"])
def test_one_channel_timm_model_runs_on_builtin_sets(tmp_path, grey_timm, images):
    res = run_cli("similarity", grey_timm, "--images", images, *FAST, "-o", tmp_path / "x.json")
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "x.json").read_text())
    assert doc["images"]["input_size"] == [1, 28, 28] and len(doc["images"]["mean"]) == 1
    assert len(doc["attention"]["probs"]["blocks"]) == 3
    if images == "builtin:photos":
        res = run_cli("audit", grey_timm, "--images", images, *FAST, "--mean", "0.1307", "--std", "0.3081",
                      "-o", tmp_path / "audit")
        assert res.returncode == 0, res.stderr
        assert json.loads((tmp_path / "audit" / "metrics.json").read_text())["model"]["mean"] == [0.1307]
        res = run_cli("similarity", grey_timm, *FAST, "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2")
        assert res.returncode == 2 and "model takes 1 channels" in res.stderr


def test_a_timm_name_with_model_args(grey_timm):
    from collapse_probe.errors import BadArgumentError

    args = {"in_chans": 1, "img_size": 28, "patch_size": 4, "depth": 3, "num_classes": 10}
    loaded = load_model(grey_timm, "vit_tiny_patch16_224", model_args=json.dumps(args))
    assert loaded.info.input_size == [1, 28, 28] and loaded.info.model_args == args
    with pytest.raises(BadArgumentError, match="--model-args needs --model"):
        load_model(grey_timm, model_args=args)


def test_images_are_converted_to_the_models_channels(tmp_path):
    rgb = Image.new("RGB", (8, 8), (200, 100, 50))
    grey = Image.new("L", (8, 8), 90)
    rgb.save(tmp_path / "rgb.png")
    grey.save(tmp_path / "grey.png")
    to_tensor = for_channels(lambda im: torch.from_numpy(__import__("numpy").asarray(im, dtype="float32")), 1)
    luminance = (200 * 299 + 100 * 587 + 50 * 114) / 1000  # ITU-R 601-2, PIL's "L"
    one = ProbeImages([tmp_path / "rgb.png"], to_tensor, channels=1)[0]
    assert one.shape == (8, 8) and abs(float(one[0, 0]) - luminance) <= 0.5
    three = ProbeImages([tmp_path / "grey.png"], lambda im: im, channels=3)[0]
    assert three.mode == "RGB" and three.getpixel((0, 0)) == (90, 90, 90)  # grey repeated
    for chans in (1, 2, 3):
        model = timm.create_model("vit_tiny_patch16_224", in_chans=chans, img_size=16, patch_size=8, depth=1)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (chans, 16, 16), "mean": (0.5,) * chans,
                                "std": (0.5,) * chans}
        loader, info = image_loader(model, tmp_path, batch_size=2)
        batch = next(iter(loader))
        assert batch.shape == (2, chans, 16, 16) and info.input_size == [chans, 16, 16]
        if chans == 2:  # neither grey nor RGB: the grey channel repeated
            torch.testing.assert_close(batch[:, 0], batch[:, 1])
