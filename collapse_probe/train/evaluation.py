"""Measuring a model while it trains: BatchNorm re-calibration, evaluation and collapse tracking.

    used = recalibrate_bn(model, train_batches, device, num_batches=50)   # as the official DeepViT trainer does
    metrics = evaluate(model, val_loader, device, info)                    # loss, top1, top5, images (DDP-reduced)
    tracked = track_collapse(model, fixed_images, threshold=0.9)           # similar blocks of the maps applied to V
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import DistInfo, all_reduce_sum


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, device: torch.device, num_batches: int,
                   info: DistInfo | None = None, autocast=nullcontext) -> int:
    """Re-estimate every BatchNorm's running statistics on ``num_batches`` batches (as the official DeepViT trainer does
    before evaluating): statistics reset, cumulative average (momentum None), only BatchNorm layers in train mode.
    Under DDP the per-rank estimates are averaged. Returns the number of batches used (0 when there is no BatchNorm).
    """
    bns = bn_modules(model)
    if not bns or num_batches <= 0:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        for images, _ in batches:
            if used >= num_batches:
                break
            with autocast():
                model(images.to(device, non_blocking=True))
            used += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    if info is not None and info.distributed:
        for bn in bns:
            for buf in (bn.running_mean, bn.running_var):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf /= info.world
    return used


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, info: DistInfo, autocast=nullcontext) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 (%) over the whole loader, summed over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    try:
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast():
                out = model(images)
            out = out.float()
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            hit = top.eq(target[:, None])
            sums += torch.stack([nn.functional.cross_entropy(out, target, reduction="sum").double(),
                                 hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                 torch.tensor(float(len(target)), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    sums = all_reduce_sum(sums, info).cpu()
    n = max(float(sums[3]), 1.0)
    return {"loss": float(sums[0]) / n, "top1": 100.0 * float(sums[1]) / n, "top5": 100.0 * float(sums[2]) / n,
            "images": int(sums[3])}


def track_collapse(model: nn.Module, images: torch.Tensor, threshold: float = 0.9) -> dict[str, Any]:
    """Similar-block count and per-block neighbour similarity of ``model`` on one fixed batch [B, 3, H, W].

    Uses the maps that multiply V ("mixed" in Re-attention blocks, else "probs"); both kinds are returned.
    """
    from ..probing.run import probe

    res = probe(model, [images], kinds=("probs", "mixed"), progress=False)
    out: dict[str, Any] = {}
    for kind, st in res.attention.items():
        nb = st.neighbor(1)
        out[kind] = {"blocks": list(st.blocks), "neighbor": [None if math.isnan(v) else float(v) for v in nb],
                     "similar_blocks": st.similar_blocks(threshold), "cross_head": [float(v) for v in st.cross_head]}
    main_kind = res.applied_kind
    out["kind"] = main_kind
    out["similar_blocks"] = len(out[main_kind]["similar_blocks"])
    out["similar_ratio"] = out["similar_blocks"] / max(len(out[main_kind]["blocks"]), 1)
    out["similar_blocks_probs"] = len(out["probs"]["similar_blocks"])
    return out
