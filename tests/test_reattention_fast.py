"""The fast Re-attention path (Theta as a batched matmul, BN folded / fused) against the modules as written.

The reference is ``fast_reattn = False``: Conv2d(H, H, 1), then BatchNorm2d / head LayerNorm / identity, then the scale,
exactly the code DeepViT's official repository runs. Everything is compared in float64 so that "equal to float
rounding" can be asserted tightly, plus one float32 model-level check.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import collapse_probe  # noqa: F401  (registers the presets)
from collapse_probe.models.attention import Attention
from collapse_probe.models.reattention import (
    fold_head_affine,
    head_stats,
    mix_heads,
    reattention_fast,
    reattention_reference,
)

TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64: differences are summation order only


def make_pair(heads: int, mix_norm: str, head_dim: int = 4, attn_drop: float = 0.0, scale: float = 0.7,
              momentum: float | None = 0.1) -> tuple[Attention, Attention]:
    """(reference, fast) attention modules with identical, non-trivial parameters and BN running statistics."""
    torch.manual_seed(heads * 7 + len(mix_norm))
    ref = Attention(heads * head_dim, num_heads=heads, reattention=True, mix_norm=mix_norm, attn_drop=attn_drop,
                    reattn_scale=scale).double()
    with torch.no_grad():
        for p in ref.mix_norm.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(ref.mix_norm, nn.BatchNorm2d):
            ref.mix_norm.momentum = momentum
            ref.mix_norm.running_mean.copy_(torch.randn(heads) * 0.1)
            ref.mix_norm.running_var.copy_(torch.rand(heads) + 0.05)
    ref.fast_reattn = False
    fast = copy.deepcopy(ref)
    fast.fast_reattn = True
    return ref, fast


def run(module: Attention, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients of <output, grad_out> w.r.t. x and every parameter."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_out)
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return y.detach(), grads


def assert_same_grads(ga: dict[str, torch.Tensor], gb: dict[str, torch.Tensor]) -> None:
    """Equal to rounding; the absolute tolerance follows the largest gradient, because some gradients are zero in
    exact arithmetic (Theta's bias under training-mode BN: the mean subtraction removes it) and both paths then return
    rounding noise of the terms that cancel."""
    assert ga.keys() == gb.keys()
    scale = max(float(g.abs().max()) for g in ga.values() if g is not None)
    for name, g_ref in ga.items():
        assert (g_ref is None) == (gb[name] is None), name
        if g_ref is not None:
            torch.testing.assert_close(gb[name], g_ref, rtol=TOL["rtol"], atol=TOL["atol"] * max(scale, 1.0),
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mix_norm", ["bn", "ln", "none"])
@pytest.mark.parametrize("heads", [1, 4, 12])
@pytest.mark.parametrize("tokens", [17, 65, 197])
@pytest.mark.parametrize("training", [True, False])
def test_outputs_and_gradients_match_reference(mix_norm, heads, tokens, training):
    ref, fast = make_pair(heads, mix_norm)
    ref.train(training), fast.train(training)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, heads * 4, generator=g, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y_ref, g_ref = run(ref, x, grad_out)
    y_fast, g_fast = run(fast, x, grad_out)
    torch.testing.assert_close(y_fast, y_ref, **TOL)
    assert_same_grads(g_ref, g_fast)
    # gradients that must be non-trivial (with one head, a norm over heads or batch-statistics BN makes Theta moot)
    for name in ("theta.weight", "qkv.weight") if heads > 1 else ("qkv.weight",):
        assert g_fast[name].abs().max() > 1e-6, name


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_after_train_steps(momentum):
    ref, fast = make_pair(4, "bn", momentum=momentum)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(3, 17, 16, generator=g, dtype=torch.float64)
        grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        y_ref, _ = run(ref, x, grad_out)
        y_fast, _ = run(fast, x, grad_out)
        torch.testing.assert_close(y_fast, y_ref, **TOL)
    bn_ref, bn_fast = ref.mix_norm, fast.mix_norm
    assert int(bn_fast.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 4
    torch.testing.assert_close(bn_fast.running_mean, bn_ref.running_mean, **TOL)
    torch.testing.assert_close(bn_fast.running_var, bn_ref.running_var, **TOL)
    # and the statistics moved: a path that forgot to update them would fail here
    assert not torch.allclose(bn_fast.running_var, make_pair(4, "bn")[0].mix_norm.running_var)


def test_folded_eval_map_matches_reference_and_is_one_affine_map():
    ref, _ = make_pair(12, "bn", scale=0.35)
    ref.eval()
    a = torch.rand(2, 12, 65, 65, dtype=torch.float64).softmax(-1)
    expected = reattention_reference(a, ref.theta, ref.mix_norm, ref.reattn_scale)
    w, c = fold_head_affine(ref.theta, ref.mix_norm, ref.reattn_scale)
    # independent of our einsum helper: explicit per-head sums
    manual = torch.stack([sum(w[g, h] * a[:, h] for h in range(12)) + c[g] for g in range(12)], dim=1)
    torch.testing.assert_close(manual, expected, **TOL)
    torch.testing.assert_close(reattention_fast(a, ref.theta, ref.mix_norm, ref.reattn_scale), expected, **TOL)


def test_batch_statistics_from_head_gram_match_the_mixed_map():
    theta = nn.Conv2d(4, 4, 1).double()
    a = (torch.randn(3, 4, 17, 17, dtype=torch.float64) * 0.01).softmax(-1)  # near-uniform: cancellation-prone
    mixed = theta(a)
    mean, var = head_stats(a, theta)
    torch.testing.assert_close(mean, mixed.mean(dim=(0, 2, 3)), **TOL)
    torch.testing.assert_close(var, mixed.var(dim=(0, 2, 3), unbiased=False), rtol=1e-7, atol=1e-14)
    a32, theta32 = a.float(), nn.Conv2d(4, 4, 1)
    theta32.load_state_dict({k: v.float() for k, v in theta.state_dict().items()})
    _, var32 = head_stats(a32, theta32)
    torch.testing.assert_close(var32.double(), var, rtol=1e-3, atol=0.0)  # fp32 keeps 3+ digits even here


def test_mix_heads_matches_conv():
    conv = nn.Conv2d(5, 5, 1).double()
    a = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(mix_heads(a, conv.weight[:, :, 0, 0], conv.bias), conv(a), **TOL)
    torch.testing.assert_close(mix_heads(a, conv.weight[:, :, 0, 0]), conv(a) - conv.bias.view(1, -1, 1, 1), **TOL)


def test_dropout_stays_on_the_softmax_map_before_mixing():
    ref, fast = make_pair(4, "bn", attn_drop=0.3)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    torch.manual_seed(11)
    y_ref, g_ref = run(ref, x, grad_out)
    torch.manual_seed(11)
    y_fast, g_fast = run(fast, x, grad_out)
    torch.testing.assert_close(y_fast, y_ref, **TOL)
    assert_same_grads(g_ref, g_fast)


@pytest.mark.parametrize("mix_norm", ["bn", "ln", "none"])
def test_hooks_see_the_same_maps(mix_norm):
    ref, fast = make_pair(4, mix_norm)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    seen: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "fast": {}}
    for tag, m in (("ref", ref), ("fast", fast)):
        for point in ("probs", "mixed"):
            getattr(m, point).register_forward_hook(
                lambda _m, _i, out, tag=tag, point=point: seen[tag].__setitem__(point, out.detach()))
        m(x)
    assert seen["fast"].keys() == {"probs", "mixed"}
    for point in ("probs", "mixed"):
        torch.testing.assert_close(seen["fast"][point], seen["ref"][point], **TOL)
    torch.testing.assert_close(seen["fast"]["probs"].sum(-1), torch.ones(2, 4, 17, dtype=torch.float64), **TOL)


def test_a_hook_that_replaces_the_mixed_map_is_honoured():
    ref, fast = make_pair(4, "bn")
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    for m in (ref, fast):
        m.mixed.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
        # zero maps: every token's attention output is 0, so the block returns the projection bias
        torch.testing.assert_close(m(x), m.proj.bias.expand(2, 17, 16), **TOL)


def test_state_dict_unchanged():
    ref, fast = make_pair(4, "bn")
    sd = fast.state_dict()
    assert sd.keys() == ref.state_dict().keys()
    assert sd["theta.weight"].shape == (4, 4, 1, 1) and sd["theta.bias"].shape == (4,)
    assert {k for k in sd if k.startswith("mix_norm.")} == {
        "mix_norm.weight", "mix_norm.bias", "mix_norm.running_mean", "mix_norm.running_var",
        "mix_norm.num_batches_tracked"}
    model = timm.create_model("deepvit_micro", depth=2)
    keys = set(model.state_dict())
    assert {"blocks.1.attn.theta.weight", "blocks.1.attn.theta.bias", "blocks.1.attn.mix_norm.running_var"} <= keys
    assert not any("fast" in k or "fold" in k for k in keys)


def _model_grads(model: nn.Module, x: torch.Tensor, fast: bool) -> dict[str, torch.Tensor]:
    for m in model.modules():
        if isinstance(m, Attention):
            m.fast_reattn = fast
    model.zero_grad(set_to_none=True)
    model(x).logsumexp(-1).mean().backward()
    return {n: p.grad.double() for n, p in model.named_parameters()}


def test_model_train_step_float32_is_as_accurate_as_the_reference():
    """In fp32 both paths round differently; against a float64 reference run each gradient of the fast path must be
    about as close as the fp32 reference itself is (some, e.g. the patch-embedding bias, lose 3 digits in both)."""
    torch.manual_seed(0)
    model = timm.create_model("deepvit_micro", depth=2, reattn_scale="head_dim").train()
    x = torch.randn(4, 3, 32, 32)
    exact = _model_grads(copy.deepcopy(model).double(), x.double(), fast=False)
    ref = _model_grads(copy.deepcopy(model), x, fast=False)
    fast_model = copy.deepcopy(model)
    fast = _model_grads(fast_model, x, fast=True)
    for name, g in exact.items():
        err_ref, err_fast = float((ref[name] - g).norm()), float((fast[name] - g).norm())
        assert err_fast <= 4 * err_ref + 1e-6 * float(g.norm()) + 1e-9, f"{name}: {err_fast:.2e} vs {err_ref:.2e}"
    ref_model = copy.deepcopy(model)
    _model_grads(ref_model, x, fast=False)
    for b_ref, b_fast in zip(ref_model.buffers(), fast_model.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-5, atol=1e-7)


def test_fast_path_traces_without_graph_breaks():
    """torch.compile (dynamo only, fullgraph) of the fast path in train mode: same output and running statistics."""
    ref, fast = make_pair(4, "bn")
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), ref(x), **TOL)
    torch.testing.assert_close(fast.mix_norm.running_var, ref.mix_norm.running_var, **TOL)
    assert int(fast.mix_norm.num_batches_tracked) == 2
