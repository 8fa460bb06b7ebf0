"""Models: registry, paper parameter counts, and Re-attention against a hand-written computation."""
from __future__ import annotations

import pytest
import timm
import torch

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.models.attention import Attention
from collapse_probe.models.vit import resolve_reattn_blocks


def n_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name, millions", [("vit_16b", 24.4), ("vit_24b", 36.3), ("vit_32b", 48.1),
                                            ("deepvit_16b", 24.4), ("deepvit_32b", 48.1), ("deepvit_s", 27.3)])
def test_paper_parameter_counts(name, millions):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(name)
    assert n_params(model) == pytest.approx(millions, abs=0.1)


def test_registered_and_configurable():
    assert {"vit_32b", "deepvit_32b", "deepvit_s", "deepvit_l", "deepvit_micro"} <= set(timm.list_models("*vit*"))
    model = timm.create_model("deepvit_micro", depth=3, reattn_blocks=1)
    assert model.reattn_block_indices == [2]
    assert model.collapse_probe_args["model_args"]["depth"] == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pretrained_is_an_error_not_a_download():
    with pytest.raises(ValueError, match="never downloads"):
        timm.create_model("deepvit_micro", pretrained=True)


def test_resolve_reattn_blocks():
    assert resolve_reattn_blocks("all", 4) == [0, 1, 2, 3]
    assert resolve_reattn_blocks(2, 5) == [3, 4]
    assert resolve_reattn_blocks(None, 4) == []
    assert resolve_reattn_blocks([0, 3], 4) == [0, 3]


def manual_attention(attn: Attention, x: torch.Tensor, mixed: bool) -> torch.Tensor:
    """Re-attention written out from the paper: softmax(QK^T/sqrt d), Theta over heads, Norm, times V."""
    B, N, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    W, b = attn.qkv.weight, attn.qkv.bias
    qkv = (x @ W.T + b).reshape(B, N, 3, H, d)
    q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    if mixed:
        theta = attn.theta.weight[:, :, 0, 0]  # [out head g, in head h]
        a = torch.einsum("gh,bhij->bgij", theta, a) + attn.theta.bias.view(1, H, 1, 1)
        bn = attn.mix_norm  # eval mode: running statistics per head channel
        a = (a - bn.running_mean.view(1, H, 1, 1)) / torch.sqrt(bn.running_var.view(1, H, 1, 1) + bn.eps)
        a = a * bn.weight.view(1, H, 1, 1) + bn.bias.view(1, H, 1, 1)
        a = a * attn.reattn_scale
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_reattention_matches_manual_computation():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, reattention=True, reattn_scale=0.7)
    with torch.no_grad():  # non-trivial BN statistics so the test sees them
        attn.mix_norm.running_mean.uniform_(-0.1, 0.1)
        attn.mix_norm.running_var.uniform_(0.5, 2.0)
        attn.mix_norm.weight.uniform_(0.5, 1.5)
        attn.mix_norm.bias.uniform_(-0.2, 0.2)
    attn.eval()
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), manual_attention(attn, x, mixed=True))


def test_identity_theta_without_norm_is_self_attention():
    torch.manual_seed(0)
    plain = Attention(32, num_heads=4).eval()
    re = Attention(32, num_heads=4, reattention=True, mix_norm="none", theta_init="identity").eval()
    re.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(re(x), plain(x))
    torch.testing.assert_close(plain(x), manual_attention(plain, x, mixed=False))


def test_layernorm_variant_normalises_over_heads():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, reattention=True, mix_norm="ln").eval()
    assert attn.theta.bias is None
    seen = {}
    attn.mixed.register_forward_hook(lambda m, i, o: seen.setdefault("m", o))
    attn(torch.randn(2, 5, 32))
    m = seen["m"]  # [B, H, N, N], normalised over H at every (b, i, j) (LayerNorm weight 1, bias 0 at init)
    torch.testing.assert_close(m.mean(1), torch.zeros_like(m.mean(1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.var(1, unbiased=False), torch.ones_like(m.mean(1)), atol=1e-3, rtol=0)


def test_fused_and_unfused_self_attention_agree():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 9, 32)
    attn.fused_attn = True
    fused = attn(x)
    attn.fused_attn = False
    torch.testing.assert_close(fused, attn(x), atol=1e-5, rtol=1e-5)


def test_res_scale_block_formula():
    torch.manual_seed(0)
    model = timm.create_model("deepvit_micro", depth=1, res_scale=2.0, drop_path_rate=0.0).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 65, 64)
    y = x + 2.0 * blk.ls1(blk.attn(blk.norm1(x / 2.0)))
    expected = y + 2.0 * blk.ls2(blk.mlp(blk.norm2(y / 2.0)))
    torch.testing.assert_close(blk(x), expected)


def test_conv_stem_keeps_token_count():
    with torch.device("meta"):
        model = timm.create_model("deepvit_s")
    assert model.patch_embed.num_patches == 196
    small = timm.create_model("deepvit_s", depth=1, reattn_blocks=1, img_size=64, embed_dim=48, num_heads=4).eval()
    assert small.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 17, 48)


def test_reattention_blocks_train_step():
    model = timm.create_model("deepvit_micro", depth=2)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert model.blocks[1].attn.theta.weight.grad.abs().sum() > 0
