"""Multi-head self-attention with optional Re-attention and named probe points.

Re-attention (DeepViT, Zhou et al. 2021) mixes the post-softmax maps of all heads with a learnable H x H matrix Theta,
normalises the result over the head channel and multiplies it by V:

    ReAttention(Q, K, V) = Norm(Theta^T softmax(Q K^T / sqrt(d))) V

Following the official code, Theta is a 1x1 convolution over the head channel (with bias) and Norm is BatchNorm2d(H).
The vit-pytorch variant (LayerNorm over the head axis, no bias) is available with ``mix_norm="ln"``.

Two probe points per attention module, named like TransformerLens hooks once inside a model:
    ``blocks.{i}.attn.probs``  post-softmax maps [B, H, N, N], rows sum to 1
    ``blocks.{i}.attn.mixed``  after Theta, Norm and scale (re-attention blocks only), not row-stochastic

    >>> attn = Attention(dim=64, num_heads=4, reattention=True)
    >>> attn(torch.randn(2, 17, 64)).shape
    torch.Size([2, 17, 64])

Speed: ``fast_reattn`` (default True, a plain attribute like timm's ``fused_attn``) computes Theta, Norm and scale
with ``reattention.reattention_fast`` (Theta as a batched matmul, eval-mode BatchNorm folded into it) and, on CUDA with
triton importable and ``triton_reattn`` (default True), the fused Triton kernel of ``reattention_triton``;
``fast_reattn = False`` runs the modules as written (``reattention.reattention_reference``). Same parameters and state
dict either way, and the ``probs`` / ``mixed`` hooks see the same maps.

Paper baselines (all off by default, and then the forward is unchanged): ``temperature`` divides the logits before the
softmax; ``share`` / ``reuse`` (an ``AttentionShare``) let one block publish the map it multiplies V with and later
blocks use that map instead of their own Q K^T (attention reuse). Both are plain attributes, not parameters, so state
dicts do not change.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn

from .reattention import reattention_fast, reattention_reference

MixNorm = Literal["bn", "ln", "none"]
ThetaInit = Literal["random", "identity"]


def _triton_device(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on t's device (the tests route CPU tensors through Triton's interpreter)."""
    return t.is_cuda


class HookPoint(nn.Identity):
    """An identity module that exists to be hooked; ``active`` says whether anybody is listening.

    Our attention only materialises the [B, H, N, N] map when a hook is attached to its ``probs`` point, so the fused
    scaled-dot-product path stays in use whenever nothing is probing.
    """

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)


class AttentionShare:
    """Holds the map one block multiplies V with during a forward, for later blocks that reuse it ([B, H, N, N])."""

    def __init__(self) -> None:
        self.map: torch.Tensor | None = None


class HeadLayerNorm(nn.Module):
    """LayerNorm over the head axis of [B, H, N, N] maps (the vit-pytorch Re-attention normalisation)."""

    def __init__(self, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_heads, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Self-attention whose heads can be re-mixed after the softmax (Re-attention).

    Args:
        dim: token width C.
        num_heads: heads H; head_dim = C // H.
        qkv_bias: bias on the fused qkv projection.
        attn_drop: dropout on the post-softmax map (applied before head mixing, as in the official code).
        proj_drop: dropout after the output projection.
        reattention: mix heads after the softmax with a learnable H x H Theta.
        mix_norm: normalisation of the mixed maps: BatchNorm2d over heads ("bn"), LayerNorm over heads ("ln") or none.
        theta_init: "random" (PyTorch's conv init, used for the paper's numbers) or "identity" (Theta = I, bias 0).
        reattn_scale: multiplies the normalised maps; DeepViT-S uses head_dim ** -0.5, the other presets 1.0.

    Shapes: x [B, N, C] -> [B, N, C].
    """

    fused_attn: bool
    fast_reattn: bool
    triton_reattn: bool

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        reattention: bool = False,
        mix_norm: MixNorm = "bn",
        theta_init: ThetaInit = "random",
        reattn_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.probs = HookPoint()
        self.reattention = reattention
        if reattention:
            self.theta = nn.Conv2d(num_heads, num_heads, kernel_size=1, bias=mix_norm != "ln")
            if theta_init == "identity":
                with torch.no_grad():
                    self.theta.weight.copy_(torch.eye(num_heads).view(num_heads, num_heads, 1, 1))
                    if self.theta.bias is not None:
                        self.theta.bias.zero_()
            elif theta_init != "random":
                raise ValueError(f"theta_init must be 'random' or 'identity', got {theta_init!r}")
            norms = {
                "bn": lambda: nn.BatchNorm2d(num_heads), "ln": lambda: HeadLayerNorm(num_heads), "none": nn.Identity,
            }
            if mix_norm not in norms:
                raise ValueError(f"mix_norm must be one of {sorted(norms)}, got {mix_norm!r}")
            self.mix_norm = norms[mix_norm]()
            self.reattn_scale = reattn_scale
            self.mixed = HookPoint()
        self.fast_reattn = True  # False: Theta / Norm / scale run as the modules are written (the reference)
        self.triton_reattn = True  # with fast_reattn, on CUDA when triton is importable: the fused Triton kernel
        self.temperature = 1.0  # softmax temperature (paper baseline); 1.0 = the plain model
        self.share: AttentionShare | None = None  # publish this block's map (attention-reuse source)
        self.reuse: AttentionShare | None = None  # use the published map instead of softmax(Q K^T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.reuse is not None:
            if self.reuse.map is None:
                raise RuntimeError("attention reuse: the source block has not run in this forward")
            attn = self.attn_drop(self.probs(self.reuse.map))  # q, k unused: this block reuses an earlier map
            x = attn @ v
        elif self.fused_attn and not self.reattention and not self.probs.active and self.share is None:
            # scale is only passed for a non-default temperature so the default call stays exactly as before
            kw = {} if self.temperature == 1.0 else {"scale": self.scale / self.temperature}
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, **kw)
        else:
            scale = self.scale if self.temperature == 1.0 else self.scale / self.temperature
            attn = (q * scale) @ k.transpose(-2, -1)
            attn = self.probs(attn.softmax(dim=-1))
            if self.reattention:
                # Theta^T A: output head g is sum_h Theta[g, h] A_h (+ bias), then Norm over the head channel.
                attn = self.mixed(self._reattend(self.attn_drop(attn)))
                if self.share is not None:
                    self.share.map = attn
            else:
                if self.share is not None:
                    self.share.map = attn
                attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def _reattend(self, attn: torch.Tensor) -> torch.Tensor:
        """Norm(Theta^T attn) * reattn_scale on [B, H, N, N] maps, by the fastest exact path available."""
        if not self.fast_reattn:
            return reattention_reference(attn, self.theta, self.mix_norm, self.reattn_scale)
        # under torch.compile the PyTorch path is traced (inductor fuses it); the Triton launch would break the graph
        if self.triton_reattn and not torch.compiler.is_compiling() and _triton_device(attn):
            from .reattention_triton import reattention_triton, triton_reattention_available

            if triton_reattention_available(self.mix_norm):
                return reattention_triton(attn, self.theta, self.mix_norm, self.reattn_scale)
        return reattention_fast(attn, self.theta, self.mix_norm, self.reattn_scale)
