"""Capture on every supported ViT family: maps equal an independent recomputation from the module's own q, k
(or the library's own ``output_attentions``), rows sum to 1, outputs unchanged, hooks and switches removed.

    PYTHONPATH=. pytest tests/test_capture_families.py -q
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import collapse_probe.models  # noqa: F401  (registers our presets)
from collapse_probe.errors import UnsupportedModelError
from collapse_probe.hooks.capture import capture, find_sites

torch.manual_seed(0)
X32 = torch.randn(2, 3, 32, 32)
TIMM_KW = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(y):
    if isinstance(y, torch.Tensor):
        return y
    return y.logits if getattr(y, "logits", None) is not None else y.last_hidden_state


def _record(model: nn.Module, fwd, specs):
    """Run ``fwd`` with plain hooks of our own: specs = [(module, fn(inputs, kwargs, output) -> tensor)]."""
    got: list[list[torch.Tensor]] = [[] for _ in specs]
    handles = []
    for i, (mod, fn) in enumerate(specs):
        def hook(m, args, kwargs, out, i=i, fn=fn):
            got[i].append(fn(args, kwargs, out).detach())
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            fwd()
    finally:
        for h in handles:
            h.remove()
    return got


def check_family(model: nn.Module, fwd, reference, kinds=("probs",), state=lambda m: None):
    """Shared assertions; ``reference()`` -> {kind: [maps per block]} computed without collapse_probe."""
    model.eval()
    before_hooks, before_state = _hook_counts(model), state(model)
    with torch.no_grad():
        y0 = _logits(fwd())
        with capture(model, kinds=kinds) as cap:
            y1 = _logits(fwd())
            assert state(model) != before_state or before_state is None  # the switch really happened
        y2 = _logits(fwd())
    assert _hook_counts(model) == before_hooks, "hooks left behind"
    assert state(model) == before_state, "switches not restored"
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-4)  # probing path computes the same function
    assert torch.equal(y2, y0)  # and afterwards the original path is back
    ref = reference()
    for kind in kinds:
        maps = cap.kind(kind)
        assert len(maps) == len(ref[kind]) > 0
        for got, want in zip(maps, ref[kind]):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    probs = cap.kind("probs")
    for p in probs:
        assert p.dim() == 4 and p.shape[-1] == p.shape[-2]
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
    assert [s.block for s in cap.sites if s.kind == "probs"] == list(range(len(probs)))
    return cap


def _fused_flags(model):
    return tuple(getattr(m, "fused_attn", None) for m in model.modules() if hasattr(m, "fused_attn"))


def _split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, C3 = qkv.shape
    q, k, _ = qkv.reshape(B, N, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4)
    return q, k


def _softmax_qk(q, k, scale=None, bias=None):
    s = (q * (scale if scale is not None else q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    return (s + bias if bias is not None else s).softmax(-1)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_vit_and_distilled_deit(name):
    model = timm.create_model(name, **TIMM_KW)
    assert all(_fused_flags(model))  # fused SDPA by default

    def reference():
        specs = [(b.attn.qkv, lambda a, kw, o, m=b.attn: _softmax_qk(*_split_qkv(o, m.num_heads), m.scale))
                 for b in model.blocks]
        return {"probs": [r[0] for r in _record(model, lambda: model(X32), specs)]}

    cap = check_family(model, lambda: model(X32), reference, state=_fused_flags)
    assert cap.kind("probs")[0].shape == (2, 4, 16 + (2 if "distilled" in name else 1), 16 + (2 if "distilled" in name
                                                                                                else 1))


def test_timm_beit_includes_relative_position_bias():
    model = timm.create_model("beit_base_patch16_224", **TIMM_KW)

    def qk_bias(args, m):
        x = args[0]
        bias = torch.cat((m.q_bias, m.k_bias, m.v_bias))
        q, k = _split_qkv(F.linear(x, m.qkv.weight, bias), m.num_heads)
        return _softmax_qk(q, k, m.scale, m._get_rel_pos_bias())

    def reference():
        specs = [(b.attn, lambda a, kw, o, m=b.attn: qk_bias(a, m)) for b in model.blocks]
        return {"probs": [r[0] for r in _record(model, lambda: model(X32), specs)]}

    check_family(model, lambda: model(X32), reference, state=_fused_flags)


def test_timm_eva_includes_rope():
    from timm.layers import apply_rot_embed_cat

    model = timm.create_model("eva02_tiny_patch14_224", img_size=28, patch_size=14, embed_dim=32, depth=2,
                              num_heads=4, num_classes=10)
    x = torch.randn(2, 3, 28, 28)
    ropes, qs, ks = [], [], []

    def reference():
        hooks = [b.attn.register_forward_pre_hook(lambda m, a, kw: ropes.append(kw.get("rope")), with_kwargs=True)
                 for b in model.blocks]
        hooks += [b.attn.q_norm.register_forward_hook(lambda m, a, o: qs.append(o)) for b in model.blocks]
        hooks += [b.attn.k_norm.register_forward_hook(lambda m, a, o: ks.append(o)) for b in model.blocks]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        out = []
        for b, rope, q, k in zip(model.blocks, ropes, qs, ks):
            npt, half = b.attn.num_prefix_tokens, getattr(b.attn, "rotate_half", False)
            assert rope is not None
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
            out.append(_softmax_qk(q, k, b.attn.scale))
        return {"probs": out}

    check_family(model, lambda: model(x), reference, state=_fused_flags)


def test_timm_cait_talking_heads_probs_before_and_mixed_after_proj_w():
    model = timm.create_model("cait_xxs24_224", depth_token_only=1, **TIMM_KW)

    def maps(o, m):
        q, k = _split_qkv(o, m.num_heads)
        logits = m.proj_l(((q * m.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        probs = logits.softmax(-1)
        return torch.stack([probs, m.proj_w(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)])

    def reference():
        specs = [(b.attn.qkv, lambda a, kw, o, m=b.attn: maps(o, m)) for b in model.blocks]
        got = [r[0] for r in _record(model, lambda: model(X32), specs)]
        return {"probs": [g[0] for g in got], "mixed": [g[1] for g in got]}

    cap = check_family(model, lambda: model(X32), reference, kinds=("probs", "mixed"))
    assert len(cap.kind("probs")) == 2  # class-attention blocks (blocks_token_only) are not token-to-token maps
    assert not torch.allclose(cap.kind("mixed")[0].sum(-1), torch.ones(1))  # post-mixing map is not stochastic


def test_torchvision_vit_multihead_attention():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    layers = list(model.encoder.layers)

    def maps(args, kwargs, m):
        x = args[0]  # batch_first [B, N, D]
        q, k, _ = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        B, N, D = q.shape
        q, k = (t.reshape(B, N, m.num_heads, D // m.num_heads).transpose(1, 2) for t in (q, k))
        return _softmax_qk(q, k)

    def reference():
        specs = [(lay.self_attention, lambda a, kw, o, m=lay.self_attention: maps(a, kw, m)) for lay in layers]
        return {"probs": [r[0] for r in _record(model, lambda: model(X32), specs)]}

    cap = check_family(model, lambda: model(X32), reference)
    assert cap.sites[0].name == "encoder.layers.encoder_layer_0.self_attention.probs"


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_transformers_sdpa_models_against_output_attentions(family):
    import transformers as tf

    cfg_cls, model_cls = {"vit": (tf.ViTConfig, tf.ViTForImageClassification),
                          "deit": (tf.DeiTConfig, tf.DeiTForImageClassificationWithTeacher),
                          "dinov2": (tf.Dinov2Config, tf.Dinov2Model)}[family]
    cfg = cfg_cls(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_labels=10, attn_implementation="sdpa")
    model = model_cls(cfg).eval()

    def reference():
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        with torch.no_grad():
            out = eager(pixel_values=X32, output_attentions=True)
        assert out.attentions is not None and len(out.attentions) == 2
        return {"probs": list(out.attentions)}

    check_family(model, lambda: model(pixel_values=X32), reference,
                 state=lambda m: m.config._attn_implementation)
    assert model.config._attn_implementation == "sdpa"


def test_vit_pytorch_vit():
    from einops import rearrange
    from vit_pytorch import ViT

    model = ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)
    attns = [layer[0] for layer in model.transformer.layers]

    def maps(o, m):
        q, k, _ = (rearrange(t, "b n (h d) -> b h n d", h=m.heads) for t in o.chunk(3, dim=-1))
        return _softmax_qk(q, k, m.scale)

    def reference():
        specs = [(a.to_qkv, lambda args, kw, o, m=a: maps(o, m)) for a in attns]
        return {"probs": [r[0] for r in _record(model, lambda: model(X32), specs)]}

    check_family(model, lambda: model(X32), reference)


def test_vit_pytorch_cait_patch_attention_only():
    from einops import rearrange
    from vit_pytorch.cait import CaiT

    model = CaiT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, cls_depth=1, heads=4, mlp_dim=64,
                 dim_head=8)
    attns = [layer[0].fn for layer in model.patch_transformer.layers]

    def reference():
        specs = [(a.to_q, lambda args, kw, o: o) for a in attns] + [(a.to_kv, lambda args, kw, o: o) for a in attns]
        rec = _record(model, lambda: model(X32), specs)
        out = []
        for i, a in enumerate(attns):
            q = rearrange(rec[i][0], "b n (h d) -> b h n d", h=a.heads)
            k = rearrange(rec[len(attns) + i][0].chunk(2, dim=-1)[0], "b n (h d) -> b h n d", h=a.heads)
            dots = torch.einsum("bhid,bhjd->bhij", q, k) * a.scale
            out.append(torch.einsum("bhij,hg->bgij", dots, a.mix_heads_pre_attn).softmax(-1))
        return {"probs": out}

    cap = check_family(model, lambda: model(X32), reference)
    assert all("patch_transformer" in s.name for s in cap.sites)  # cls_transformer: class attention, skipped


def test_vit_pytorch_deepvit_probs_and_reattention():
    from einops import rearrange
    from vit_pytorch.deepvit import DeepViT

    model = DeepViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)
    attns = [layer[0] for layer in model.transformer.layers]

    def maps(o, m):
        q, k, _ = (rearrange(t, "b n (h d) -> b h n d", h=m.heads) for t in o.chunk(3, dim=-1))
        probs = _softmax_qk(q, k, m.scale)
        mixed = torch.einsum("bhij,hg->bgij", probs, m.reattn_weights).permute(0, 2, 3, 1)
        ln = m.reattn_norm[1]
        mixed = F.layer_norm(mixed, (m.heads,), ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
        return torch.stack([probs, mixed])

    def reference():
        specs = [(a.norm, lambda args, kw, o, m=a: maps(m.to_qkv(o), m)) for a in attns]
        got = [r[0] for r in _record(model, lambda: model(X32), specs)]
        return {"probs": [g[0] for g in got], "mixed": [g[1] for g in got]}

    check_family(model, lambda: model(X32), reference, kinds=("probs", "mixed"))


def test_our_deepvit():
    model = timm.create_model("deepvit_micro", depth=3)
    x = torch.randn(2, 3, 32, 32)

    def reference():
        specs = [(b.attn.qkv, lambda a, kw, o, m=b.attn: _softmax_qk(*_split_qkv(o, m.num_heads), m.scale))
                 for b in model.blocks]
        return {"probs": [r[0] for r in _record(model, lambda: model(x), specs)]}

    cap = check_family(model, lambda: model(x), reference)
    assert cap.sites[0].name == "blocks.0.attn.probs"


def test_hooks_removed_and_switches_restored_when_the_body_raises():
    model = timm.create_model("vit_tiny_patch16_224", **TIMM_KW).eval()
    flags, hooks = _fused_flags(model), _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model):
            raise RuntimeError("boom")
    assert _fused_flags(model) == flags and _hook_counts(model) == hooks


def test_model_without_attention_names_what_was_looked_for():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(UnsupportedModelError) as e:
        find_sites(model)
    msg = str(e.value)
    assert "Sequential" in msg and "timm Attention" in msg and "MultiheadAttention" in msg and "vit-pytorch" in msg
    assert "\n" not in msg


def test_transformers_model_that_cannot_switch_to_eager_gets_a_clear_error(monkeypatch):
    import transformers as tf

    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, attn_implementation="sdpa")
    model = tf.ViTModel(cfg).eval()
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, impl: None)  # refuses to switch
    hooks = _hook_counts(model)
    with pytest.raises(UnsupportedModelError, match="returned no attention weights"):
        with torch.no_grad(), capture(model):
            model(pixel_values=X32)
    assert _hook_counts(model) == hooks and model.config._attn_implementation == "sdpa"


def test_timm_vit_relpos_includes_the_relative_position_bias():
    """timm vit_relpos_*: RelPosAttention adds an MLP-made bias per head before the softmax (fused: as attn_mask)."""
    model = timm.create_model("vit_relpos_small_patch16_224", **TIMM_KW)
    assert all(_fused_flags(model))

    def reference():
        specs = [(b.attn.qkv, lambda a, kw, o, m=b.attn: _softmax_qk(*_split_qkv(o, m.num_heads), m.scale,
                                                                      m.rel_pos.get_bias())) for b in model.blocks]
        return {"probs": [r[0] for r in _record(model, lambda: model(X32), specs)]}

    check_family(model, lambda: model(X32), reference, state=_fused_flags)


def _hf_vision(kind: str):
    import transformers as tf

    common = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, attn_implementation="sdpa")
    if kind == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**common)).eval()
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(**common)).eval()  # with its attention-pooling head


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_clip_and_siglip_heads_named_num_heads(kind):
    """CLIP / SigLIP attention modules call the count ``num_heads``; SigLIP's pooling head (one query) is skipped."""
    model = _hf_vision(kind)

    def reference():
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        with torch.no_grad():
            out = eager(pixel_values=X32, output_attentions=True)
        return {"probs": list(out.attentions)}  # the encoder layers only: the pooling head is not among them

    cap = check_family(model, lambda: model(pixel_values=X32), reference,
                       state=lambda m: m.config._attn_implementation)
    assert len(cap.kind("probs")) == 2 and cap.kind("probs")[0].shape == (2, 4, 16 + (kind == "clip"),
                                                                          16 + (kind == "clip"))
    if kind == "siglip":
        assert isinstance(model.head.attention, nn.MultiheadAttention)  # exists, and was skipped


@pytest.mark.parametrize("name,kw,why", [
    ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                          num_heads=(2, 2), num_classes=10), "windowed attention is not supported"),
    ("xcit_nano_12_p16_224", dict(img_size=32, embed_dim=32, depth=1, num_heads=4, num_classes=10),
     "cross-covariance attention is over channels, not tokens"),
])
def test_swin_and_xcit_are_refused_with_the_reason(name, kw, why):
    from collapse_probe.loading.build import describe

    model = timm.create_model(name, **kw).eval()
    hooks = _hook_counts(model)
    for attempt in (lambda: capture(model).__enter__(), lambda: describe(model)):
        with pytest.raises(UnsupportedModelError, match=why) as e:
            attempt()
        assert e.value.exit_code == 5 and "\n" not in str(e.value)
    assert _hook_counts(model) == hooks
