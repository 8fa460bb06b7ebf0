"""Capture on our models and timm ViTs: correct maps, unchanged outputs, hooks always removed."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.errors import UnsupportedModelError
from collapse_probe.hooks.capture import capture


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def tiny_timm_vit(name="vit_small_patch16_224", **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                             num_classes=5, **kw).eval()


def recompute_probs(attn_module, x_in: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) from the module's own qkv weights and its input tokens."""
    B, N, C = x_in.shape
    H = attn_module.num_heads
    qkv = attn_module.qkv(x_in).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    if hasattr(attn_module, "q_norm"):
        q, k = attn_module.q_norm(q), attn_module.k_norm(k)
    return torch.softmax(q @ k.transpose(-1, -2) * (C // H) ** -0.5, dim=-1)


@pytest.mark.parametrize("model_fn", [
    lambda: tiny_timm_vit(),
    lambda: tiny_timm_vit("deit_small_distilled_patch16_224"),
    lambda: timm.create_model("deepvit_micro", depth=3).eval(),
    lambda: timm.create_model("vit_micro", depth=3).eval(),
], ids=["timm-vit", "timm-deit-distilled", "deepvit", "ours-vit"])
def test_maps_equal_recomputation_and_outputs_unchanged(model_fn):
    model = model_fn()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with capture(model, kinds=("probs", "out")) as cap:
            probed = model(x)
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=1e-5)
    assert n_hooks(model) == 0
    probs = cap.kind("probs")
    assert len(probs) == 3
    for i, p in enumerate(probs):
        assert p.shape[:2] == (2, 4) and p.shape[-1] == p.shape[-2]
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
        # the block's input tokens are the previous block's output (or the embedded patches for block 0)
        if i > 0:
            blk = model.blocks[i]
            x_in = blk.norm1(cap.maps[f"blocks.{i - 1}.out"])
            if hasattr(blk, "res_scale") and blk.res_scale != 1:
                pytest.skip("res_scale models feed norm1(x / s)")
            torch.testing.assert_close(p, recompute_probs(blk.attn, x_in), atol=1e-5, rtol=1e-4)


def test_distilled_deit_has_two_extra_tokens():
    model = tiny_timm_vit("deit_small_distilled_patch16_224")
    with torch.no_grad(), capture(model) as cap:
        model(torch.randn(1, 3, 32, 32))
    assert cap.stack().shape == (3, 1, 4, 18, 18)  # 16 patches + cls + dist


def test_fused_flags_restored_and_fused_path_used_afterwards():
    model = tiny_timm_vit()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    with capture(model):
        assert all(not blk.attn.fused_attn for blk in model.blocks)
        model(torch.randn(1, 3, 32, 32))
    assert all(blk.attn.fused_attn for blk in model.blocks)


def test_hooks_removed_and_flags_restored_on_exception():
    model = tiny_timm_vit()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, kinds=("probs", "out")):
            model(torch.randn(1, 3, 32, 32))
            raise RuntimeError("boom")
    assert n_hooks(model) == 0
    assert all(blk.attn.fused_attn for blk in model.blocks)

    # an error raised inside a hook (the callback) also leaves nothing behind
    def bad(site, t):
        raise ValueError("callback failed")
    with pytest.raises(ValueError):
        with capture(model, callback=bad):
            model(torch.randn(1, 3, 32, 32))
    assert n_hooks(model) == 0


def test_deepvit_mixed_maps_are_theta_of_probs():
    model = timm.create_model("deepvit_micro", depth=2, mix_norm="none").eval()
    with torch.no_grad(), capture(model, kinds=("probs", "mixed")) as cap:
        model(torch.randn(2, 3, 32, 32))
    attn = model.blocks[1].attn
    theta, bias = attn.theta.weight[:, :, 0, 0], attn.theta.bias
    expected = torch.einsum("gh,bhij->bgij", theta, cap.maps["blocks.1.attn.probs"]) + bias.view(1, -1, 1, 1)
    torch.testing.assert_close(cap.maps["blocks.1.attn.mixed"], expected, atol=1e-5, rtol=1e-5)
    assert [s.name for s in cap.sites] == ["blocks.0.attn.probs", "blocks.0.attn.mixed", "blocks.1.attn.probs",
                                           "blocks.1.attn.mixed"]


def test_callback_streams_block_by_block_without_storing():
    model = timm.create_model("deepvit_micro", depth=4).eval()
    seen = []
    with torch.no_grad(), capture(model, callback=lambda site, t: seen.append((site.block, t.shape))) as cap:
        model(torch.randn(2, 3, 32, 32))
    assert [b for b, _ in seen] == [0, 1, 2, 3]
    assert cap.maps == {}


def test_wrapped_model_names_are_clean():
    model = tiny_timm_vit()
    wrapper = nn.Sequential()
    wrapper.add_module("module", model)
    with torch.no_grad(), capture(wrapper) as cap:
        wrapper(torch.randn(1, 3, 32, 32))
    assert list(cap.maps) == ["blocks.0.attn.probs", "blocks.1.attn.probs", "blocks.2.attn.probs"]


def test_model_without_attention_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no attention module"):
        with capture(nn.Sequential(nn.Linear(3, 3))):
            pass
