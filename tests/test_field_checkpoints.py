"""Checkpoints as researchers hold them: from-scratch ViTs run with their own code (``--model-code``), training dicts
that wrap the weights, and the errors that lead somewhere.

    PYTHONPATH=. pytest tests/test_field_checkpoints.py -q

The models below are written the way a student writes them (own module names, nn.MultiheadAttention blocks, an
nn.TransformerEncoder, per-head nn.Linear q/k/v modules), trained a few steps, saved as their authors would, and this
very file is the ``--model-code`` that builds them again: it has no relative imports, so it imports on its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
HERE = str(Path(__file__).resolve())
FAST = ["--num-images", "4", "--batch-size", "4", "--no-progress"]
ARGS = {"image_size": 16, "patch": 4, "dim": 32, "depth": 3, "heads": 4, "num_classes": 10}


# ---- the researcher's models ---------------------------------------------------------------------------------------

class MhaBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.ln1(x)
        out, _ = self.attn(h, h, h)  # the default call: averaged weights that nobody uses
        x = x + out
        return x + self.mlp(self.ln2(x))


class MhaViT(nn.Module):
    def __init__(self, image_size=16, patch=4, dim=32, depth=3, heads=4, num_classes=10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([MhaBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class EncoderViT(nn.Module):
    """Post-norm nn.TransformerEncoder (norm_first=False, PyTorch's default)."""

    def __init__(self, image_size=16, patch=4, dim=32, depth=3, heads=4, num_classes=10):
        super().__init__()
        self.image_size = image_size
        self.patchify = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.positions = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patchify(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.positions
        return self.classifier(self.transformer(x)[:, 0])


class Head(nn.Module):
    def __init__(self, dim, head_dim):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, head_dim) for _ in range(3))
        self.scale = head_dim ** -0.5

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) * self.scale, dim=-1)
        return att @ self.v(x)


class HeadwiseViT(MhaViT):
    """Per-head nn.Linear q/k/v modules and a hand-written softmax (no attention module any library knows)."""

    def __init__(self, image_size=16, patch=4, dim=32, depth=3, heads=4, num_classes=10):
        super().__init__(image_size, patch, dim, depth, heads, num_classes)
        for blk in self.blocks:
            blk.attn = HeadwiseAttention(dim, heads)


class HeadwiseAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = nn.ModuleList([Head(dim, dim // heads) for _ in range(heads)])
        self.proj = nn.Linear(dim, dim)

    def forward(self, q, k, v):
        return self.proj(torch.cat([h(q) for h in self.heads], -1)), None


def vit_from_function(depth=3, **kw):
    """A factory function, as some training scripts have."""
    return MhaViT(depth=depth, **kw)


# ---- helpers ---------------------------------------------------------------------------------------------------------

def trained(cls, steps: int = 3, seed: int = 0, **kw) -> nn.Module:
    """A model after a few SGD steps on random images (its weights are no longer its initialisation)."""
    torch.manual_seed(seed)
    model = cls(**{**ARGS, **kw})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save(model: nn.Module, path: Path, wrapped: bool = False) -> Path:
    sd = model.state_dict()
    torch.save({"model_state": sd, "config": dict(ARGS), "epoch": 3} if wrapped else sd, path)
    return path


def cli(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    full.pop("COLLAPSE_PROBE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "collapse_probe", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=full, cwd=cwd)


def one_line(res: subprocess.CompletedProcess, code: int) -> str:
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], res.stderr
    assert res.stdout == ""
    return lines[0]


def code_args(name: str, **kw) -> list[str]:
    return ["--model-code", HERE, "--model", name, "--model-args", json.dumps({**ARGS, **kw})]


def reference_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q k^T / sqrt(d)) per head, recomputed from each nn.MultiheadAttention's in_proj and its input (caught
    with our own hooks on a plain forward: no capture involved)."""
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    seen: dict[int, torch.Tensor] = {}
    # (the loaded model's classes come from this file imported again, under another module name: duck typing)
    parents = [m for m in model.modules() if any(isinstance(c, nn.MultiheadAttention) for c in m.children())]
    # the attention's query input: ln1's output (pre-norm block) or the layer's input (post-norm encoder layer)
    handles = [(p.ln1.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o)) if hasattr(p, "ln1")
                else p.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0])))
               for i, p in enumerate(parents)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = []
    for i, mha in enumerate(mhas):
        h, d, n = seen[i], mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        q, k = h @ w[:d].T + b[:d], h @ w[d:2 * d].T + b[d:2 * d]
        split = lambda t: t.reshape(t.shape[0], t.shape[1], n, d // n).transpose(1, 2)  # noqa: E731
        out.append(torch.softmax(split(q) @ split(k).transpose(-2, -1) / (d // n) ** 0.5, dim=-1))
    return out


# ---- acceptance ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [MhaViT, EncoderViT])
def test_captured_maps_equal_a_recomputation_from_q_and_k(tmp_path, cls):
    import collapse_probe as cp

    model = trained(cls)
    path = save(model, tmp_path / "bare.pt")
    loaded = cp.load_model(path, cls.__name__, model_code=HERE, model_args=ARGS)
    assert loaded.info.architecture == f"{Path(HERE).name}:{cls.__name__}" and loaded.info.model_args == ARGS
    assert loaded.info.input_size == [3, 16, 16] and loaded.info.depth == 3 and loaded.info.num_heads == 4
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = loaded.model(x)
        torch.testing.assert_close(plain, model(x))  # strict load: the trained model, exactly
        with cp.capture(loaded.model) as cap:
            captured = loaded.model(x)
    torch.testing.assert_close(captured, plain)  # capture changes nothing
    maps = cap.kind("probs")
    ref = reference_maps(loaded.model, x)
    assert len(maps) == len(ref) == 3
    for got, want in zip(maps, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_headwise_linear_qkv_model_is_probed(tmp_path):
    import collapse_probe as cp

    path = save(trained(HeadwiseViT), tmp_path / "heads.pt")
    result = cp.probe(path, torch.randn(4, 3, 16, 16), model_code=HERE, model_name="HeadwiseViT", model_args=ARGS,
                      progress=False)
    assert len(result.attention["probs"].blocks) == 3


def test_headwise_model_loads_strictly(tmp_path):
    import collapse_probe as cp

    model = trained(HeadwiseViT)
    loaded = cp.load_model(save(model, tmp_path / "heads.pt"), "HeadwiseViT", model_code=HERE, model_args=ARGS)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_cli_similarity_json_and_audit_with_model_code(tmp_path):
    bare = save(trained(MhaViT), tmp_path / "mha.pt")
    wrapped = save(trained(EncoderViT), tmp_path / "encoder.pt", wrapped=True)
    res = cli("similarity", bare, *code_args("MhaViT"), *FAST, "-o", tmp_path / "sim.json")
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "sim.json").read_text())
    assert doc["model"]["architecture"].endswith(":MhaViT") and doc["model"]["num_heads"] == 4
    assert len(doc["attention"]["probs"]["blocks"]) == 3
    res = cli("audit", wrapped, *code_args("EncoderViT"), *FAST, "-o", tmp_path / "audit")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "audit" / "metrics.json").read_text())
    assert metrics["model"]["key"] == "model_state"
    assert any("'model_state'" in n and "only entry" in n for n in metrics["model"]["notes"])
    assert "own initialisation" in metrics["baseline"]["settings"]["twin"]["init"]


def test_intervene_and_compare_take_model_code(tmp_path):
    a, b = save(trained(MhaViT), tmp_path / "a.pt"), save(trained(MhaViT, seed=1), tmp_path / "b.pt", wrapped=True)
    res = cli("intervene", a, *code_args("MhaViT"), "--mode", "skip", "--blocks", "2", "--format", "json", *FAST)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["outcomes"][0]["images"] == 4
    res = cli("compare", a, b, *code_args("MhaViT"), "--no-baseline", "--format", "json", *FAST)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    rows = doc["summary"]
    assert len(rows) == 2 and all(r["architecture"].endswith(":MhaViT") and r["depth"] == 3 for r in rows)


def test_probe_api_with_model_code_and_the_twin_from_the_factory(tmp_path):
    import collapse_probe as cp
    from collapse_probe.probing.baseline import untrained_twin

    path = save(trained(MhaViT), tmp_path / "w.pt", wrapped=True)
    result = cp.probe(path, "builtin:photos", model_code=HERE, model_name="vit_from_function", model_args=ARGS,
                      num_images=4, batch_size=4, progress=False, baseline=True, baseline_seed=7)
    assert result.model.architecture.endswith(":vit_from_function") and result.baseline is not None
    loaded = cp.load_model(path, "vit_from_function", model_code=HERE, model_args=ARGS)
    twin, how = untrained_twin(loaded.model, 7, loaded.factory)
    torch.manual_seed(7)
    fresh = vit_from_function(**ARGS)  # the factory called again under the twin's seed
    for (name, a), (_, b) in zip(twin.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert "own initialisation" in how and "seed 7" in how
    assert not torch.equal(twin.head.weight, loaded.model.head.weight)


def test_readme_example_command(tmp_path):
    """The README's "Your own model" command (tests/test_readme.py runs the README block itself), here against a
    checkpoint of tests/examples/my_vit.py saved where this test chooses."""
    sys.path.insert(0, str(REPO / "tests" / "examples"))
    try:
        from my_vit import MyViT
    finally:
        sys.path.remove(str(REPO / "tests" / "examples"))
    torch.manual_seed(0)
    model = MyViT(image_size=32, patch=4, dim=64, depth=6, heads=4, num_classes=10)
    model.fc.weight.data.normal_()  # "trained": no longer its initialisation
    torch.save(model.state_dict(), tmp_path / "my_vit.pt")
    res = cli("similarity", tmp_path / "my_vit.pt", "--model-code", "tests/examples/my_vit.py", "--model", "MyViT",
              "--model-args", '{"image_size": 32, "patch": 4, "dim": 64, "depth": 6, "heads": 4, "num_classes": 10}',
              "--images", "builtin:digits", *FAST, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "my_vit.py:MyViT" in res.stdout and "depth 6" in res.stdout


def test_without_model_code_the_error_names_what_was_recognised(tmp_path):
    for cls, what, key in ((MhaViT, "nn.MultiheadAttention", "blocks.N.attn.in_proj_weight"),
                           (EncoderViT, "nn.TransformerEncoder", "transformer.layers.N.self_attn.in_proj_weight"),
                           (HeadwiseViT, "per-head query/key/value", "blocks.N.attn.heads.N.q.weight")):
        path = save(trained(cls, steps=1), tmp_path / f"{cls.__name__}.pt", wrapped=cls is EncoderViT)
        line = one_line(cli("similarity", path, *FAST), 5)
        assert what in line and key in line and "--model-code" in line and "timm name" not in line, line


def test_strict_loading_names_missing_unexpected_keys_and_shapes(tmp_path):
    path = save(trained(MhaViT, steps=1), tmp_path / "w.pt")
    line = one_line(cli("similarity", path, *code_args("MhaViT", depth=2), *FAST), 5)
    assert "unexpected keys" in line and "blocks.2." in line and "(96, 32)" in line, line
    line = one_line(cli("similarity", path, *code_args("MhaViT", dim=48), *FAST), 5)
    assert "shape mismatch" in line and "cls_token (1, 1, 32) vs (1, 1, 48)" in line, line


def _user_code_error(tmp_path: Path, source: str, *args: str) -> str:
    from click.testing import CliRunner

    from collapse_probe.cli import main

    code = tmp_path / "lab_model.py"
    code.write_text(source)
    ckpt = save(trained(MhaViT, steps=1), tmp_path / "w.pt")
    res = CliRunner().invoke(main, ["similarity", str(ckpt), "--model-code", str(code), *args, *FAST])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], res.output
    return lines[0]


def test_errors_in_the_users_code_are_one_line_with_file_and_line(tmp_path):
    line = _user_code_error(tmp_path, "import torch\ndef broken(:\n    pass\n", "--model", "X")
    assert "SyntaxError" in line and "lab_model.py:2" in line
    line = _user_code_error(tmp_path, "import torch\nimport no_such_module_for_sure\n", "--model", "X")
    assert "ModuleNotFoundError" in line and "lab_model.py:2" in line
    boom = "from torch import nn\n\nclass Boom(nn.Module):\n    def __init__(self, depth=3):\n" \
           "        super().__init__()\n        raise ValueError('depth must be even')\n"
    line = _user_code_error(tmp_path, boom, "--model", "Boom")
    assert "ValueError: depth must be even" in line and "lab_model.py:6" in line
    line = _user_code_error(tmp_path, boom, "--model", "Nope")
    assert "no class or function" in line and "found: Boom" in line
    line = _user_code_error(tmp_path, boom)  # --model missing: say what there is
    assert "needs --model NAME" in line and "Boom" in line
    line = _user_code_error(tmp_path, boom, "--model", "Boom", "--model-args", "{depth: 6}")
    assert "not valid JSON" in line
    line = _user_code_error(tmp_path, boom, "--model", "Boom", "--model-args", "[6]")
    assert "JSON object" in line


def test_model_code_as_a_module_name_and_a_timm_registered_name(tmp_path, monkeypatch):
    import collapse_probe as cp

    (tmp_path / "lab_registry.py").write_text(
        "from timm.models import register_model\nfrom timm.models.vision_transformer import VisionTransformer\n\n"
        "@register_model\ndef lab_vit_grey_t1(pretrained=False, **kw):\n"
        "    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2,\n"
        "                             num_classes=10, **kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from lab_registry import lab_vit_grey_t1

    torch.manual_seed(0)
    model = lab_vit_grey_t1().eval()
    torch.save(model.state_dict(), tmp_path / "grey.pt")
    loaded = cp.load_model(tmp_path / "grey.pt", "lab_vit_grey_t1", model_code="lab_registry")
    assert loaded.info.input_size == [1, 28, 28] and loaded.info.architecture.startswith("timm:lab_vit_grey_t1")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_wrapped_training_dicts(tmp_path):
    from collapse_probe.errors import BadArgumentError
    from collapse_probe.loading.read import read_checkpoint

    sd = trained(MhaViT, steps=1).state_dict()
    other = MhaViT()
    opt = torch.optim.AdamW(other.parameters())
    other(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()  # an optimizer state next to the weights: dicts of tensors too, but without module paths
    nested = {"train": {"model_state": sd, "epoch": 3}, "optimizer": opt.state_dict(), "class_to_idx": {"a": 0},
              "image_size": 224}
    torch.save(nested, tmp_path / "nested.pt")
    ckpt = read_checkpoint(tmp_path / "nested.pt")
    assert ckpt.key == "train.model_state" and set(ckpt.state_dict) == set(sd)
    assert "train.model_state" in ckpt.notes[0] and "--key train.model_state" in ckpt.notes[0]
    assert read_checkpoint(tmp_path / "nested.pt", key="train.model_state").notes == []
    torch.save({"model_state": sd, "ema_state": sd, "config": {}}, tmp_path / "two.pt")
    with pytest.raises(BadArgumentError, match=r"several entries hold weights: model_state \(\d+ tensors\), "
                                               r"ema_state.*--key"):
        read_checkpoint(tmp_path / "two.pt")
    assert read_checkpoint(tmp_path / "two.pt", key="ema_state").key == "ema_state"
