"""Re-attention head mixing, Norm(Theta^T A) * scale, computed without the 1x1 convolution kernel.

``Attention`` keeps Theta as ``nn.Conv2d(H, H, 1)`` and the norm as ``nn.BatchNorm2d(H)`` / ``HeadLayerNorm`` /
``nn.Identity`` (so state dicts are unchanged); the functions here read those modules' parameters and compute the same
map faster:

- ``reattention_reference``: the modules called as written (Conv2d, then the norm, then the scale).
- ``reattention_fast``: Theta as one batched matmul over the head axis with the bias fused in (``baddbmm``); in eval
  mode BatchNorm is a per-head affine map, so Theta, BN and the scale fold into one H x H matrix plus a per-head bias
  (one pass over the map); in training mode the scale is folded into BN's affine parameters and ``F.batch_norm`` runs on
  the mixed map, updating the running statistics exactly as ``nn.BatchNorm2d`` does.
- ``fold_head_affine``: the (W', c) of Y = W' A + c for any norm where that is exact (none; BN in eval mode; BN in
  training mode given the batch statistics), used by the Triton kernel (``reattention_triton``).

    >>> theta, bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4).eval()
    >>> a = torch.rand(2, 4, 17, 17).softmax(-1)
    >>> torch.allclose(reattention_fast(a, theta, bn, 1.0), reattention_reference(a, theta, bn, 1.0), atol=1e-6)
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "fold_head_affine", "head_moments", "head_stats", "mix_heads", "mixed_stats", "reattention_fast",
    "reattention_reference",
]


def reattention_reference(attn: torch.Tensor, theta: nn.Conv2d, norm: nn.Module, scale: float) -> torch.Tensor:
    """Norm(Theta(attn)) * scale with the modules as written; attn [B, H, N, M] -> [B, H, N, M]."""
    return norm(theta(attn)) * scale


def theta_matrix(theta: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Theta's [H_out, H_in] matrix and [H_out] bias (None without bias), views of the Conv2d parameters."""
    return theta.weight[:, :, 0, 0], theta.bias


def mix_heads(attn: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, g] = sum_h weight[g, h] attn[b, h] (+ bias[g]); attn [B, H, N, M], weight [G, H] -> [B, G, N, M].

    One batched GEMM per image over the flattened N*M pixels, with the bias added by the GEMM itself (baddbmm): the
    head axis is tiny (4-12), where the convolution kernel and a separate bias pass cost more than the mixing.
    """
    B, H, N, M = attn.shape
    G = weight.shape[0]
    a = attn.reshape(B, H, N * M)
    if not torch.is_autocast_enabled(a.device.type):  # autocast casts by itself; otherwise match the map's dtype
        weight = weight.to(a.dtype)
        bias = None if bias is None else bias.to(a.dtype)
    w = weight.unsqueeze(0).expand(B, G, H)
    if bias is None:
        out = torch.bmm(w, a)
    else:
        out = torch.baddbmm(bias.view(1, G, 1), w, a)
    return out.view(B, G, N, M)


def _bn_momentum(bn: nn.BatchNorm2d) -> float:
    """Count the batch and return the running-average factor exactly as ``nn.BatchNorm2d.forward`` does."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return 0.0 if bn.momentum is None else bn.momentum


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _scaled_affine(bn: nn.BatchNorm2d, scale: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """BN's weight and bias with the Re-attention scale folded in (saves one pass over the map)."""
    if bn.weight is None or scale == 1.0:
        return bn.weight, bn.bias
    return bn.weight * scale, bn.bias * scale


def fold_head_affine(theta: nn.Conv2d, norm: nn.Module, scale: float, mean: torch.Tensor | None = None,
                     var: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' [H, H], c [H]) with Norm(Theta A) * scale = W' A + c per pixel, differentiable in all parameters.

    ``norm`` is ``nn.Identity`` or ``nn.BatchNorm2d``; for BN the statistics are the running ones, or ``mean`` / ``var``
    (biased batch statistics of Theta A + b per head) when given. Theta's bias goes through BN: it moves the mean too.
    """
    weight, bias = theta_matrix(theta)
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    if isinstance(norm, nn.Identity):
        return weight * scale, bias * scale
    if not isinstance(norm, nn.BatchNorm2d):
        raise TypeError(f"no per-pixel affine form for {type(norm).__name__}")
    if mean is None or var is None:
        mean, var = norm.running_mean, norm.running_var
    gain = torch.rsqrt(var + norm.eps) * scale
    if norm.weight is not None:
        gain = gain * norm.weight
    shift = (bias - mean) * gain
    if norm.bias is not None:
        shift = shift + norm.bias * scale
    return weight * gain[:, None], shift


def head_moments(attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head mean mu [H] and H x H covariance C of A's heads over the (B, N, M) pixels, in at least fp32.

    A is shifted by 1/M first (each softmax row sums to 1, so that is the exact mean without dropout):
    C = E[(A - s)(A - s)^T] - (mu - s)(mu - s)^T then loses nothing to cancellation even for near-uniform maps, where
    E[A A^T] and mu mu^T agree to many digits. One GEMM over A. Differentiable (autograd through the shifted copy).
    """
    B, H, N, M = attn.shape
    count = B * N * M
    dtype = torch.promote_types(attn.dtype, torch.float32)  # half maps: statistics in fp32
    a = attn.reshape(B, H, N * M).to(dtype) - 1.0 / M
    mu_s = a.sum(dim=(0, 2)) / count  # mu - s
    cov = torch.bmm(a, a.transpose(1, 2)).sum(0) / count - mu_s[:, None] * mu_s[None, :]
    return mu_s + 1.0 / M, cov


def mixed_stats(mu: torch.Tensor, cov: torch.Tensor, theta: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased per-head mean and variance of Theta A + b from A's head moments: W mu + b and diag(W C W^T)."""
    weight, bias = theta_matrix(theta)
    weight = weight.to(mu.dtype)
    mean = weight @ mu + (0.0 if bias is None else bias.to(mu.dtype))
    var = ((weight @ cov) * weight).sum(1).clamp_min(0.0)
    return mean, var


def head_stats(attn: torch.Tensor, theta: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased per-head mean and variance of Theta A + b over (B, N, M) without materialising the mixed map."""
    return mixed_stats(*head_moments(attn), theta)


def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """Move BN's running statistics as ``nn.BatchNorm2d`` does (unbiased variance) from batch mean / biased var."""
    factor = _bn_momentum(bn)
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        bn.running_mean.mul_(1.0 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1.0 - factor).add_(unbiased.detach().to(bn.running_var.dtype), alpha=factor)


def _batch_norm_scaled(mixed: torch.Tensor, bn: nn.BatchNorm2d, scale: float) -> torch.Tensor:
    """nn.BatchNorm2d's forward on ``mixed`` (same running-statistics update) times ``scale``, in one kernel."""
    factor = _bn_momentum(bn)
    weight, bias = _scaled_affine(bn, scale)
    keep = not bn.training or bn.track_running_stats
    out = F.batch_norm(mixed, bn.running_mean if keep else None, bn.running_var if keep else None, weight, bias,
                       _uses_batch_stats(bn), factor, bn.eps)
    return out if bn.weight is not None or scale == 1.0 else out * scale


def reattention_fast(attn: torch.Tensor, theta: nn.Conv2d, norm: nn.Module, scale: float) -> torch.Tensor:
    """Same map as ``reattention_reference`` (to float rounding), Theta as a batched matmul and the norm folded in."""
    weight, bias = theta_matrix(theta)
    if isinstance(norm, nn.Identity):
        return mix_heads(attn, weight * scale, None if bias is None else bias * scale)
    if type(norm) is nn.BatchNorm2d:  # subclasses (SyncBatchNorm, ...) keep their own forward
        if not _uses_batch_stats(norm):
            return mix_heads(attn, *fold_head_affine(theta, norm, scale))
        return _batch_norm_scaled(mix_heads(attn, weight, bias), norm, scale)
    out = norm(mix_heads(attn, weight, bias))
    return out if scale == 1.0 else out * scale
