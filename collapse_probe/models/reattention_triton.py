"""Re-attention head mixing as one fused Triton kernel (GPU training and inference), PyTorch elsewhere.

Every Re-attention norm collapse-probe uses except the head LayerNorm is, per pixel (b, i, j) of the [B, H, N, N] map,
an affine map over the head axis: Norm(Theta A) * scale = W' A + c with W' = diag(g) Theta and c per head
(``reattention.fold_head_affine``). For BatchNorm in eval mode g and c come from the running statistics; in training
mode from the batch statistics, which need only A's per-head mean and its H x H second moment (``HeadMoments``: one
GEMM over A, never the mixed map). The kernel then reads each A tile once and writes W' A + c once (fp32
accumulation), instead of Conv2d + BatchNorm + scale each passing over the map forward and backward.

Backward (``HeadAffine``, a ``torch.autograd.Function``): dA = W'^T dY runs through the same kernel; dW' = sum dY A^T
and dc = sum dY are fp32 PyTorch reductions; the gradient through the batch statistics (``HeadMoments``) is again a
head-affine map of A, so one more kernel pass; the small H-sized algebra in between (statistics -> W', c) is PyTorch
autograd. No [B, H, N, N] tensor is saved besides A. Padding masks are not supported (the models here have none).

The kernel itself is in ``_reattention_kernel`` (it imports triton), imported on first use only, so importing
collapse_probe never needs triton; set ``TRITON_INTERPRET=1`` before
that first use to run the kernel on CPU tensors through Triton's interpreter (how the tests run it without a GPU).
Under ``torch.compile`` the PyTorch path is used instead (inductor fuses it itself).

    theta, bn = nn.Conv2d(12, 12, 1).cuda(), nn.BatchNorm2d(12).cuda()
    a = torch.rand(8, 12, 197, 197, device="cuda").softmax(-1)
    y = reattention_triton(a, theta, bn, 1.0)   # == reattention_reference(a, theta, bn, 1.0), BN stats updated
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import nn

from .reattention import fold_head_affine, head_moments, mixed_stats, update_running_stats

__all__ = ["HeadAffine", "HeadMoments", "head_affine", "reattention_triton", "triton_reattention_available"]

BLOCK = 256  # pixels per program: H x BLOCK fp32 accumulators stay in registers for H <= 16


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_reattention_available(norm: nn.Module) -> bool:
    """Whether ``reattention_triton`` handles this norm here (triton importable, not compiling, affine norm)."""
    if torch.compiler.is_compiling() or not triton_importable():
        return False
    return type(norm) in (nn.Identity, nn.BatchNorm2d)


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, imported on first use: ``triton.jit`` reads TRITON_INTERPRET when it decorates, and the
    interpreter patches ``tl`` in the kernel's module globals (so the kernel lives at module level there)."""
    from ._reattention_kernel import head_affine_kernel

    return head_affine_kernel


def _launch(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    import triton

    B, H, N, M = a.shape
    a = a.contiguous()
    w = w.float().contiguous()
    y = torch.empty((B, H, N, M), dtype=out_dtype, device=a.device)
    P = N * M
    c_arg = c.float().contiguous() if c is not None else w  # unused pointer when HAS_C is False
    grid = (B, triton.cdiv(P, BLOCK))
    _kernel()[grid](a, w, c_arg, y, P, H=H, HP=triton.next_power_of_2(H), HAS_C=c is not None, BLOCK_P=BLOCK)
    return y


class HeadAffine(torch.autograd.Function):
    """y[b, g] = sum_h w[g, h] a[b, h] + c[g] on [B, H, N, M] maps, forward and dA by the Triton kernel."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(a, w)
        ctx.c_dtype = c.dtype
        return _launch(a, w, c, out_dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, w = ctx.saved_tensors
        B, H, N, M = a.shape
        da = _launch(dy, w.t(), None, a.dtype) if ctx.needs_input_grad[0] else None
        dw = dc = None
        if ctx.needs_input_grad[1]:  # fp32 reductions: dW' feeds BN's cancelling statistics terms
            flat_dy, flat_a = dy.reshape(B, H, N * M).float(), a.reshape(B, H, N * M).float()
            with torch.autocast(a.device.type, enabled=False):
                dw = torch.bmm(flat_dy, flat_a.transpose(1, 2)).sum(0).to(w.dtype)
        if ctx.needs_input_grad[2]:
            dc = dy.float().sum(dim=(0, 2, 3)).to(ctx.c_dtype)
        return da, dw, dc, None


class HeadMoments(torch.autograd.Function):
    """(mu, C) = ``reattention.head_moments(a)`` with an analytic backward through the kernel, saving nothing big.

    Autograd through head_moments would keep the fp32 shifted copy of A for the Gram's backward (a second map's worth
    of memory). Instead: dmu_h / count and dC reach A as dA_h = sum_k (dC_hk + dC_kh) (A_k - mu_k) / count (the mean's
    own dependence cancels since the centred map sums to zero), i.e. a head-affine map of A itself: one kernel pass.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            mu, cov = head_moments(a)  # the shifted copy is freed when this returns
        ctx.save_for_backward(a, mu)
        return mu, cov

    @staticmethod
    def backward(ctx: Any, dmu: torch.Tensor, dcov: torch.Tensor) -> torch.Tensor:
        a, mu = ctx.saved_tensors
        B, _, N, M = a.shape
        count = B * N * M
        q = (dcov + dcov.t()) / count
        e = dmu / count - q @ mu
        return _launch(a, q, e, a.dtype)


def head_affine(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``HeadAffine`` with the output in ``out_dtype`` (default: autocast's dtype when autocast is on, else a's)."""
    return HeadAffine.apply(a, w, c, out_dtype or _out_dtype(a))


def reattention_triton(attn: torch.Tensor, theta: nn.Conv2d, norm: nn.Module, scale: float) -> torch.Tensor:
    """Norm(Theta(attn)) * scale for ``norm`` in (nn.Identity, nn.BatchNorm2d), BN running statistics updated."""
    out_dtype = _out_dtype(attn)
    # statistics and folding in fp32 whatever autocast says: a bf16 Gram loses the small head covariance entirely
    with torch.autocast(attn.device.type, enabled=False):
        if isinstance(norm, nn.BatchNorm2d) and (norm.training or norm.running_mean is None):
            mean, var = mixed_stats(*HeadMoments.apply(attn), theta)
            B, _, N, M = attn.shape
            update_running_stats(norm, mean, var, B * N * M)
            w, c = fold_head_affine(theta, norm, scale, mean, var)
        else:
            w, c = fold_head_affine(theta, norm, scale)
        return head_affine(attn, w.float(), c.float(), out_dtype)


def _out_dtype(a: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when autocast is on (what the Conv2d reference would return), else the map's."""
    dev = a.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else a.dtype
