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
from torch import nn

from ..distributed import DistInfo, all_reduce_sum
from ..probing.baseline import bn_modules  # noqa: F401  (re-exported for the engine)
from ..probing.baseline import recalibrate_bn as _recalibrate


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, device: torch.device, num_batches: int,
                   info: DistInfo | None = None, autocast=nullcontext) -> int:
    """Re-estimate every BatchNorm's running statistics on ``num_batches`` batches (as the official DeepViT trainer does
    before evaluating): ``probing.baseline.recalibrate_bn``, the same routine the untrained twin's statistics come from.
    Under DDP the per-rank estimates are averaged. Returns the number of batches used (0 when there is no BatchNorm).
    """
    return _recalibrate(model, batches, device, num_batches, all_reduce=info is not None and info.distributed,
                        autocast=autocast)


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

    One measurement of ``probing.monitor.CollapseMonitor`` (the road the Lightning and transformers callbacks take):
    the probe and verdict engine of every command, the model's train/eval flags and random states given back. The
    verdict's kind is the maps that multiply V (``ProbeResult.applied_kind``), the paper's metric under the mean
    reduction; both kinds are returned, with 1-based block numbers (``blocks``, ``similar_blocks``) as in the reports.
    """
    from ..probing.monitor import CollapseMonitor

    m = CollapseMonitor(images, kinds=("probs", "mixed"), metrics=("sim_prev", "cross_head"),
                        threshold=threshold, batch_size=max(len(images), 1)).measure(model)  # one forward, as before
    out: dict[str, Any] = {}
    for kind in m.result.attention:
        rows = [r for r in m.rows if r["kind"] == kind]
        out[kind] = {"blocks": [r["block"] for r in rows],
                     "neighbor": [None if math.isnan(r["sim_prev"]) else float(r["sim_prev"]) for r in rows],
                     "similar_blocks": [r["block"] for r in rows if r["similar"]],
                     "cross_head": [float(r["cross_head"]) for r in rows]}
    out["kind"] = m.kind
    out["similar_blocks"] = m.count
    out["similar_ratio"] = m.count / max(len(out[m.kind]["blocks"]), 1)
    out["similar_blocks_probs"] = len(out["probs"]["similar_blocks"])
    return out
