"""The untrained twin: the same architecture with fresh weights, the baseline every collapse number is read against.

    twin, how = untrained_twin(model, seed=0)        # a copy, re-initialised the way its library initialises it
    used = recalibrate_bn(twin, batches, device)     # BatchNorm statistics re-estimated on the probe images

Why: the paper's column cosine of near-uniform maps sits near 1 whatever they attend to, so a random-init deep ViT
already scores "collapsed". A count means something only beside what the same architecture gives before training, on
the same images. ``probe(..., baseline=True)`` measures the twin with the same settings and stores it as
``result.baseline``.

Initialisation, in order: every submodule's own ``reset_parameters`` (Linear, Conv, LayerNorm, BatchNorm, PyTorch's
MultiheadAttention); then the library's model-level init where there is one — timm's ``init_weights()`` (our models are
timm models), HuggingFace's ``_init_weights`` per module; then any parameter that still holds its trained value (a bare
``nn.Parameter`` such as a class token in a family without either) is drawn from N(0, 0.02²), timm's choice for tokens.
All under ``torch.manual_seed(seed)`` inside a forked RNG, so the caller's random state is untouched and the same seed
gives the same twin. A model built from the user's own code (``--model-code``) is instead built again by that code
under the seed (``untrained_twin(model, seed, factory)``): its own initialisation, whatever it is.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..loading.images import batch_images


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _reinit(model: nn.Module, original: nn.Module) -> str:
    for m in model.modules():
        if m is not model and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    how = "reset_parameters"
    if callable(getattr(model, "_init_weights", None)) and hasattr(model, "config"):  # HuggingFace PreTrainedModel
        for m in model.modules():
            model._init_weights(m)
        how = "HuggingFace _init_weights"
    elif callable(getattr(model, "init_weights", None)) and type(model).__module__.split(".")[0] in (
            "timm", "collapse_probe"):
        model.init_weights()
        how = "timm init_weights"
    before = dict(original.named_parameters())
    kept = [p for n, p in model.named_parameters() if n in before and torch.equal(p, before[n].to(p.device))]
    for p in kept:
        nn.init.trunc_normal_(p, std=0.02)
    return how + (f"; {len(kept)} parameter(s) drawn from N(0, 0.02^2)" if kept else "")


def untrained_twin(model: nn.Module, seed: int = 0, factory: Callable[..., nn.Module] | None = None
                   ) -> tuple[nn.Module, str]:
    """A re-initialised copy of ``model`` (same class, config and device; eval mode) and how it was initialised.

    ``factory`` (the user's own code, ``--model-code``): ``factory(seed=seed)`` builds the twin instead, so it gets
    exactly the initialisation the user's code gives a fresh model.
    """
    if factory is not None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        twin = factory(seed=seed).to(device)
        return twin.eval(), f"your model's own initialisation (its factory called again), seed {seed}"
    twin = copy.deepcopy(model)
    devices = [p.device for p in twin.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        how = _reinit(twin, model)
    return twin.eval(), f"{how}, seed {seed}"


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, device: torch.device, num_batches: int | None = None,
                   all_reduce: bool = False, autocast: Any = None) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (tensors [B, C, H, W] or (x, y) pairs), as the
    official DeepViT trainer does before evaluating: statistics reset, cumulative average (momentum None), only the
    BatchNorm layers in train mode. ``all_reduce`` averages the estimates over torchrun ranks. Returns the batches used
    (0 when the model has no BatchNorm)."""
    bns = bn_modules(model)
    if not bns or (num_batches is not None and num_batches <= 0):
        return 0
    was_training, momenta = model.training, [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            x = batch_images(batch).to(device, non_blocking=True)
            if autocast is None:
                model(x)
            else:
                with autocast():
                    model(x)
            used += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    if all_reduce and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for bn in bns:
            for buf in (bn.running_mean, bn.running_var):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf /= world
        count = torch.tensor([float(used)], device=bns[0].running_mean.device)  # batches over all ranks, as reported
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        used = int(count.item())
    return used
