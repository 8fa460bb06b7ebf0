"""The universal route: ViTs written from scratch (as a student would, in this file) are captured without an adapter.

Each model's maps are compared with softmax(q k^T * scale (+ mask)) computed here by hand from the module's own weights
and the input the module received (recorded with a plain hook of our own); outputs with capture on equal outputs with
capture off; hooks, the torch-function mode and torch's MHA fast-path flag are gone/restored afterwards.

    PYTHONPATH=. pytest tests/test_capture_universal.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from collapse_probe.errors import UnsupportedModelError
from collapse_probe.hooks.capture import attention_plans, capture
from collapse_probe.hooks.intervene import intervene, intervention_blocks

DIM, HEADS, DEPTH, IMG, PATCH = 32, 4, 3, 16, 4
TOKENS = (IMG // PATCH) ** 2 + 1


# ---------------------------------------------------------------------------------------------- models, student style
class Embed(nn.Module):
    """Conv patches + class token + learned positions -> [B, N, D]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)

    def forward(self, img):
        x = self.proj(img).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos


def mlp():
    return nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))


class Classifier(nn.Module):
    def __init__(self, blocks: nn.Module, attr: str = "blocks"):
        super().__init__()
        self.embed = Embed()
        setattr(self, attr, blocks)
        self.attr = attr
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 10)

    def run_blocks(self, x):
        blocks = getattr(self, self.attr)
        if isinstance(blocks, nn.ModuleList):
            for blk in blocks:
                x = blk(x)
            return x
        return blocks(x)

    def forward(self, img):
        return self.head(self.norm(self.run_blocks(self.embed(img)))[:, 0])


# (a) nn.MultiheadAttention in a pre-norm block of our own
class MhaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2, self.mlp = nn.LayerNorm(DIM), nn.LayerNorm(DIM), mlp()
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


# (b) nn.TransformerEncoder, post-norm, batch_first
class TorchEncoderViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = Embed()
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=True)
        self.head = nn.Linear(DIM, 10)

    def forward(self, img, pad=None):
        return self.head(self.encoder(self.embed(img), src_key_padding_mask=pad)[:, 0])


# (c) hand-written softmax attention, own names: encoder.layers.N.self_attention, masked_fill then .softmax(-1)
class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_heads = HEADS
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        g = torch.Generator().manual_seed(5)
        self.register_buffer("allowed", (torch.rand(TOKENS, TOKENS, generator=g) > 0.3) | torch.eye(TOKENS).bool())

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1) / (C // self.n_heads) ** 0.5
        attn = scores.masked_fill(~self.allowed, float("-inf")).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, N, C))


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_a, self.self_attention, self.norm_b, self.feed_forward = nn.LayerNorm(DIM), SelfAttention(), \
            nn.LayerNorm(DIM), mlp()

    def forward(self, x):
        x = x + self.self_attention(self.norm_a(x))
        return x + self.feed_forward(self.norm_b(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer() for _ in range(DEPTH)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# (c') vit-pytorch style: layers.N = [PreNorm(Attention), PreNorm(FeedForward)], nn.Softmax module, bmm-folded heads
class PreNorm(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(DIM), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class FoldedAttention(nn.Module):
    """q, k, v as [B*H, N, d] and torch.bmm, the pre-2020 way; separate q/k/v Linears."""

    def __init__(self):
        super().__init__()
        self.heads = HEADS
        self.to_q, self.to_k, self.to_v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.attend = nn.Softmax(dim=-1)
        self.to_out = nn.Linear(DIM, DIM)

    def split(self, t):
        B, N, C = t.shape
        return t.view(B, N, self.heads, C // self.heads).transpose(1, 2).reshape(B * self.heads, N, C // self.heads)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.split(self.to_q(x)), self.split(self.to_k(x)), self.split(self.to_v(x))
        attn = self.attend(torch.bmm(q, k.transpose(1, 2)) * (C // self.heads) ** -0.5)
        out = torch.bmm(attn, v).view(B, self.heads, N, C // self.heads).transpose(1, 2).reshape(B, N, C)
        return self.to_out(out)


class PreNormStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([PreNorm(FoldedAttention()), PreNorm(mlp())])
                                     for _ in range(DEPTH)])

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


# (d) per-head modules: MultiHeadAttention holds a ModuleList of Head, each making one [B, N, N] map
class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM // HEADS) for _ in range(3))

    def forward(self, x):
        w = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) * (DIM // HEADS) ** -0.5, dim=-1)
        return w @ self.v(x)


class MultiHeadAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([Head() for _ in range(HEADS)])
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.proj(torch.cat([h(x) for h in self.heads], dim=-1))


# (e) F.scaled_dot_product_attention, optionally with a float bias mask and a scale, or a boolean mask
class SdpaAttention(nn.Module):
    def __init__(self, mask: str | None = None, scale: float | None = None):
        super().__init__()
        self.qkv, self.proj, self.mask, self.scale = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM), mask, scale
        self.bias = nn.Parameter(torch.randn(HEADS, TOKENS, TOKENS)) if mask == "float" else None
        keep = (torch.rand(TOKENS, TOKENS, generator=torch.Generator().manual_seed(9)) > 0.4) | torch.eye(TOKENS).bool()
        self.register_buffer("keep", keep if mask == "bool" else None)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        mask = self.bias if self.mask == "float" else self.keep
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(DIM), attn, nn.LayerNorm(DIM), mlp()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def trained(model: nn.Module, seed: int) -> nn.Module:
    """A few Adam steps on random images and labels, so maps are not near-uniform; returned in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.randn(16, 3, IMG, IMG), torch.randint(0, 10, (16,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mha":
        return trained(Classifier(nn.ModuleList([MhaBlock() for _ in range(DEPTH)])), 1)
    if kind == "torch-encoder":
        return trained(TorchEncoderViT(), 2)
    if kind == "hand-written":
        return trained(Classifier(Encoder(), "encoder"), 3)
    if kind == "prenorm-folded":
        return trained(Classifier(PreNormStack(), "transformer"), 4)
    if kind == "per-head":
        return trained(Classifier(nn.Sequential(*[Block(MultiHeadAttention()) for _ in range(DEPTH)]), "transformer"),
                       5)
    mask, scale = {"sdpa": (None, None), "sdpa-float-mask-scale": ("float", 0.3),
                   "sdpa-bool-mask": ("bool", None)}[kind]
    return trained(Classifier(nn.ModuleList([Block(SdpaAttention(mask, scale)) for _ in range(DEPTH)])), 6)


# ------------------------------------------------------------------------------ the reference: by hand, per module
def _softmax(q, k, scale, mask=None):
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s.softmax(-1)


def _heads(t):  # [B, N, C] -> [B, H, N, d]
    B, N, C = t.shape
    return t.view(B, N, HEADS, C // HEADS).transpose(1, 2)


def reference_map(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention map of ``module`` for its input ``x`` [B, N, D], from its weights."""
    d = DIM // HEADS
    if isinstance(module, nn.MultiheadAttention):
        q, k, _ = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
        return _softmax(_heads(q), _heads(k), d ** -0.5)
    if isinstance(module, (SelfAttention, SdpaAttention)):
        q, k, _ = module.qkv(x).chunk(3, dim=-1)
        mask = module.allowed if isinstance(module, SelfAttention) else (
            module.bias if module.mask == "float" else module.keep)
        scale = getattr(module, "scale", None)
        return _softmax(_heads(q), _heads(k), d ** -0.5 if scale is None else scale, mask)
    if isinstance(module, FoldedAttention):
        return _softmax(_heads(module.to_q(x)), _heads(module.to_k(x)), d ** -0.5)
    if isinstance(module, MultiHeadAttention):
        return torch.stack([_softmax(h.q(x), h.k(x), d ** -0.5) for h in module.heads], dim=1)
    raise AssertionError(type(module))


ATTENTION = (nn.MultiheadAttention, SelfAttention, SdpaAttention, FoldedAttention, MultiHeadAttention)


def reference(model: nn.Module, run) -> list[torch.Tensor]:
    """Per attention module, in execution order: its map recomputed from the input it received."""
    inputs, handles = [], []
    for m in model.modules():
        if isinstance(m, ATTENTION):
            handles.append(m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0]))))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [reference_map(mod, x) for mod, x in inputs]


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


EXPECTED = {  # kind -> (names of the probs sites, names of the out sites, family)
    "mha": ([f"blocks.{i}.attn" for i in range(3)], [f"blocks.{i}" for i in range(3)], "torch-mha"),
    "torch-encoder": ([f"encoder.layers.{i}.self_attn" for i in range(3)], [f"encoder.layers.{i}" for i in range(3)],
                      "torch-mha"),
    "hand-written": ([f"encoder.layers.{i}.self_attention" for i in range(3)],
                     [f"encoder.layers.{i}" for i in range(3)], "universal"),
    "prenorm-folded": ([f"transformer.layers.{i}.0.fn" for i in range(3)], [], "universal"),
    "per-head": ([f"transformer.{i}.attn" for i in range(3)], [f"transformer.{i}" for i in range(3)], "universal"),
    "sdpa": ([f"blocks.{i}.attn" for i in range(3)], [f"blocks.{i}" for i in range(3)], "universal"),
}
EXPECTED["sdpa-float-mask-scale"] = EXPECTED["sdpa-bool-mask"] = EXPECTED["sdpa"]
KINDS = list(EXPECTED)


def no_grad_forward(model, x, grad_mode, **kw):
    with grad_mode():
        return model(x, **kw)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", KINDS)
def test_maps_equal_a_recomputation_from_the_modules_weights(kind, grad_mode):
    model = build(kind)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))
    hooks, fast = n_hooks(model), torch.backends.mha.get_fastpath_enabled()
    y0 = no_grad_forward(model, x, grad_mode)
    with capture(model, kinds=("probs", "out"), example=x) as cap:
        y1 = no_grad_forward(model, x, grad_mode)
        # off while capturing a torch MHA: the fast path never calls self_attn.forward
        assert torch.backends.mha.get_fastpath_enabled() == (EXPECTED[kind][2] != "torch-mha")
    y2 = no_grad_forward(model, x, grad_mode)
    assert n_hooks(model) == hooks and torch._C._len_torch_function_stack() == 0
    assert torch.backends.mha.get_fastpath_enabled() == fast
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    if kind.startswith("sdpa") or kind in ("hand-written", "per-head", "prenorm-folded"):
        assert torch.equal(y1, y0)  # the universal route returns every call's own output (SDPA stays fused)
    assert torch.equal(y2, y0)

    names, outs, family = EXPECTED[kind]
    assert [s.name for s in cap.sites if s.kind == "probs"] == [f"{n}.probs" for n in names]
    assert [s.name for s in cap.sites if s.kind == "out"] == [f"{n}.out" for n in outs]
    assert {plan.family for _, _, plan in attention_plans(model)} == {family}
    want = reference(model, lambda: model(x))
    got = cap.kind("probs")
    assert len(got) == len(want) == DEPTH and cap.num_heads == HEADS
    for g, w in zip(got, want):
        assert g.shape == (2, HEADS, TOKENS, TOKENS)
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g.sum(-1), torch.ones(2, HEADS, TOKENS))
    assert not torch.allclose(got[-1], torch.full_like(got[-1], 1 / TOKENS), atol=1e-2)  # not uniform-ish
    for o in cap.kind("out"):
        assert o.shape == (2, TOKENS, DIM)


def test_guessed_example_finds_the_same_blocks_as_the_real_input():
    model = build("hand-written")
    plans = attention_plans(model)  # no example: guessed from the position embedding and the conv patch size
    assert [p for p, _, _ in plans] == [f"encoder.layers.{i}.self_attention" for i in range(3)]
    assert all(pl.num_heads == HEADS and pl.family == "universal" for _, _, pl in plans)


@pytest.mark.parametrize("pad", ["none", "unpadded-mask"])
def test_transformer_encoder_fast_and_nested_paths_do_not_hide_the_maps(pad):
    """Eval + no_grad: TransformerEncoderLayer's fused path and (with a padding mask) the nested-tensor path."""
    model = build("torch-encoder")
    x = torch.randn(2, 3, IMG, IMG)
    mask = torch.zeros(2, TOKENS, dtype=torch.bool) if pad != "none" else None
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        y0 = model(x, mask)
        with capture(model) as cap:
            y1 = model(x, mask)
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    assert torch.backends.mha.get_fastpath_enabled()
    want = reference(model, lambda: model(x))  # a mask that pads nothing changes no map
    assert len(cap.kind("probs")) == DEPTH
    for g, w in zip(cap.kind("probs"), want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


class Boom(Exception):
    pass


@pytest.mark.parametrize("kind", ["hand-written", "sdpa", "torch-encoder"])
def test_hooks_mode_and_flag_restored_when_the_body_or_the_forward_raises(kind):
    model = build(kind)
    x = torch.randn(1, 3, IMG, IMG)
    hooks, fast = n_hooks(model), torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(Boom):
        with capture(model, example=x):
            raise Boom
    last_mlp = [m for m in model.modules() if isinstance(m, nn.Linear)][-2]
    handle = last_mlp.register_forward_hook(lambda *_: (_ for _ in ()).throw(Boom()))  # the forward fails midway
    try:
        with pytest.raises(Boom), torch.no_grad(), capture(model, example=x):
            model(x)
    finally:
        handle.remove()
    assert n_hooks(model) == hooks and torch._C._len_torch_function_stack() == 0
    assert torch.backends.mha.get_fastpath_enabled() == fast

    seen = []  # afterwards no mode of ours is around the forward: SDPA is a plain (fused) call again
    handle = model.register_forward_pre_hook(lambda *_: seen.append(torch._C._len_torch_function_stack()))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [0]


def test_model_without_attention_is_one_line():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10), nn.Softmax(-1))
    model(torch.randn(1, 3, 16, 16))
    with pytest.raises(UnsupportedModelError) as e:
        with capture(model, example=torch.randn(1, 3, 16, 16)):
            pass
    assert "\n" not in str(e.value) and "softmax" in str(e.value) and "0 softmax/SDPA" in str(e.value)


def test_class_attention_and_channel_attention_are_not_token_maps():
    """One-query class attention ([B, H, 1, N]) and XCiT-style channel attention ([B, H, d, d]) are ignored."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(DIM, 3 * DIM)

        def forward(self, x):
            q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            chan = (q.transpose(-2, -1) @ k).softmax(-1)  # [B, H, d, d]: over channels
            cls = (q[:, :, :1] @ k.transpose(-2, -1)).softmax(-1)  # [B, H, 1, N]: one query
            tok = (q @ k.transpose(-2, -1)).softmax(-1)  # [B, H, N, N]
            return (tok @ v + cls @ v + v @ chan).transpose(1, 2).flatten(2)

    model = Classifier(nn.Sequential(Block(Mixed()), Block(Mixed())), "transformer").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad(), capture(model, example=x) as cap:
        model(x)
    assert [t.shape for t in cap.kind("probs")] == [(2, HEADS, TOKENS, TOKENS)] * 2


# ---------------------------------------------------------------------------------- the metrics pipeline, interventions
def _entropy(maps: torch.Tensor) -> float:
    """Mean row entropy / log N over images, heads and rows (0 log 0 = 0)."""
    return float((-torch.xlogy(maps, maps).sum(-1)).mean() / torch.log(torch.tensor(float(maps.shape[-1]))))


@pytest.mark.parametrize("kind", ["per-head", "sdpa-float-mask-scale", "hand-written"])
def test_probe_runs_the_whole_pipeline_on_a_model_in_memory(kind):
    from collapse_probe.probing.run import probe

    model = build(kind)
    images = torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    result = probe(model, images, batch_size=4, progress=False)
    assert (result.model.family, result.model.depth, result.model.num_heads) == ("universal", DEPTH, HEADS)
    stats = result.attention["probs"]
    assert stats.names == [f"{n}.probs" for n in EXPECTED[kind][0]] and stats.similarity.shape == (DEPTH, DEPTH)
    with torch.no_grad(), capture(model) as cap:
        model(images)
    want = [_entropy(m) for m in cap.kind("probs")]
    assert stats.entropy.tolist() == pytest.approx(want, abs=1e-4)  # the probe measured the maps we captured
    if EXPECTED[kind][1]:
        assert result.features is not None and len(result.features.names) == DEPTH


def _value_and_projection(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    if isinstance(module, SelfAttention):
        return module.qkv(x).chunk(3, dim=-1)[2], module.out
    if isinstance(module, SdpaAttention):
        return module.qkv(x).chunk(3, dim=-1)[2], module.proj
    return module.to_v(x), module.to_out


@pytest.mark.parametrize("kind", ["hand-written", "sdpa-bool-mask", "prenorm-folded"])
def test_uniform_attention_replaces_the_map_that_multiplies_v(kind):
    """Uniform attention in block 2: each query's output is the mean of V over all tokens, then the projection."""
    model = build(kind)
    x = torch.randn(2, 3, IMG, IMG)
    attn = [m for m in model.modules() if isinstance(m, ATTENTION)][1]
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    hooks = n_hooks(model)
    try:
        with torch.no_grad():
            y0 = model(x)
            with intervene(model, uniform=[1]) as blocks, capture(model, example=x) as cap:
                y1 = model(x)
            v, proj = _value_and_projection(attn, seen["x"])
            want, got = proj(v.mean(dim=1, keepdim=True).expand_as(v)), seen["out"]
            y2 = model(x)
    finally:
        handle.remove()
    assert [b.family for b in blocks] == ["universal"] * DEPTH and blocks[1].swap_refusal is None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cap.kind("probs")[1], torch.full((2, HEADS, TOKENS, TOKENS), 1 / TOKENS))
    assert not torch.allclose(y1, y0) and torch.equal(y2, y0)
    assert n_hooks(model) == hooks - 1 and torch._C._len_torch_function_stack() == 0


def test_reuse_hands_a_later_sdpa_block_the_earlier_blocks_map():
    model = build("sdpa")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad(), intervene(model, reuse={2: 0}, example=x), capture(model, example=x) as cap:
        model(x)
    maps = cap.kind("probs")
    torch.testing.assert_close(maps[2], maps[0])
    assert not torch.allclose(maps[1], maps[0])


def test_per_head_blocks_refuse_map_replacement_in_one_line_but_can_be_skipped():
    model = build("per-head")
    x = torch.randn(2, 3, IMG, IMG)
    blocks = intervention_blocks(model)
    assert blocks[0].swap is None and "separate softmax" in blocks[0].swap_refusal
    with pytest.raises(UnsupportedModelError) as e:
        with intervene(model, uniform=[0]):
            pass
    assert "\n" not in str(e.value) and "block 1 (transformer.0.attn)" in str(e.value)
    seen = {}  # block 2's input and block 3's input (= block 2's output, after the intervention's own hook)
    handles = [model.transformer[i].register_forward_pre_hook(lambda m, args, i=i: seen.update({i: args[0]}))
               for i in (1, 2)]
    with torch.no_grad(), intervene(model, skip=[1]):
        model(x)
    for h in handles:
        h.remove()
    assert torch.equal(seen[2], seen[1])


def test_prenorm_layers_without_a_block_module_refuse_skipping():
    model = build("prenorm-folded")
    blocks = intervention_blocks(model)
    assert blocks[0].skip_refusal == "universal: no block module around transformer.layers.0.0.fn to skip"
    with pytest.raises(UnsupportedModelError, match="no block module"):
        with intervene(model, skip=[0]):
            pass


def test_a_block_module_run_several_times_gives_one_block_per_run():
    """Shared weights (one block applied three times): three blocks, named by run."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = EncoderLayer()

        def forward(self, x):
            for _ in range(DEPTH):
                x = self.blk(x)
            return x

    model = trained(Classifier(Shared(), "transformer"), 8)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad(), capture(model, kinds=("probs", "out"), example=x) as cap:
        model(x)
    assert [s.name for s in cap.sites] == [f"transformer.blk.self_attention[{i}].probs" for i in range(DEPTH)]
    maps = cap.kind("probs")
    assert len(maps) == DEPTH and not torch.allclose(maps[0], maps[1])  # each run's own map, not the last one thrice


def test_an_input_we_cannot_guess_asks_for_an_example_in_one_line():
    class Tokens(nn.Module):  # takes [B, N, D] tokens, not images; nothing says how many
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(SdpaAttention()), Block(SdpaAttention()))

        def forward(self, x):
            return self.blocks(x)

    model = Tokens().eval()
    assert attention_plans(model) == []  # describe() says depth 0
    with pytest.raises(UnsupportedModelError) as e:
        with capture(model):
            pass
    assert "\n" not in str(e.value) and "pass an example input" in str(e.value)
    x = torch.randn(2, TOKENS, DIM)
    with torch.no_grad(), capture(model, example=x) as cap:
        model(x)
    assert [t.shape for t in cap.kind("probs")] == [(2, HEADS, TOKENS, TOKENS)] * 2


def test_probe_describes_a_model_from_its_own_images_when_no_guess_runs():
    """20 x 12 px images (5 x 3 patches): every square guess fails; probe describes the model on its first batch."""
    class WideViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patches = nn.Conv2d(3, DIM, PATCH, PATCH)
            self.pos = nn.Parameter(torch.randn(1, 15, DIM) * 0.02)
            self.blocks = nn.Sequential(Block(SdpaAttention()), Block(SdpaAttention()))
            self.head = nn.Linear(DIM, 10)

        def forward(self, img):
            return self.head(self.blocks(self.patches(img).flatten(2).transpose(1, 2) + self.pos).mean(1))

    from collapse_probe.loading.build import describe
    from collapse_probe.probing.run import probe

    torch.manual_seed(0)
    model = WideViT().eval()
    assert describe(model).depth == 0
    result = probe(model, torch.randn(4, 3, 20, 12), batch_size=2, progress=False)
    assert (result.model.depth, result.model.num_heads, result.model.family) == (2, HEADS, "universal")
    assert result.attention["probs"].names == ["blocks.0.attn.probs", "blocks.1.attn.probs"]
