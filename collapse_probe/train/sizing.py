"""Will the model fit? Parameters and activation memory derived on the meta device, before anything is allocated.

    need = estimate(lambda: build_model(cfg, 10), batch_size=64, ema=True)   # Need(params, state_bytes, ...)
    check_fits(need, cfg, device)          # BadArgumentError (exit 2) when this machine cannot hold one step

A config of a few bytes can ask for a model of terabytes (``model_args: {embed_dim: 200000}``) or attention maps of
petabytes (``img_size: 65536``); allocating first would swap the machine to a halt or die in the allocator. The model
is built on torch's meta device (shapes only), its parameters counted, and one training forward run on meta tensors
with a hook on every leaf module that adds up the outputs autograd would keep. Training state per parameter: fp32
weights, gradients, two AdamW moments and the EMA copy. The bound is the machine's total memory (the GPU's for
CUDA), so only sizes no setting of this machine could train are refused; the estimate is printed at start-up.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadArgumentError


@dataclass
class Need:
    params: int
    state_bytes: int  # weights, gradients, optimizer moments, EMA
    activation_bytes: int | None  # one training batch's saved activations (None: the meta forward did not run)

    @property
    def total(self) -> int:
        return self.state_bytes + (self.activation_bytes or 0)


def size_text(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model takes: its patch embedding's image size when it has one (an ``img_size``
    model argument changes it, not the pretrained config), else timm's data config."""
    from timm.data import resolve_data_config

    size = resolve_data_config({}, model=model)["input_size"]
    embed = getattr(model, "patch_embed", None)
    img = getattr(embed, "img_size", None)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(s, int) for s in img):
        return (size[0], int(img[0]), int(img[1]))
    return tuple(size)


def estimate(make: Callable[[], nn.Module], batch_size: int, ema: bool) -> Need:
    """Parameters, training-state bytes and one batch's activation bytes of ``make()``, without allocating."""
    with torch.device("meta"):
        model = make()
    params = sum(p.numel() for p in model.parameters())
    state = params * 4 * (4 + int(ema))  # fp32 weights, gradients, 2 AdamW moments (+ the EMA copy)
    for m in model.modules():  # the module-by-module Re-attention runs on meta tensors (the fused path needs a device)
        if hasattr(m, "fast_reattn"):
            m.fast_reattn = False
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    try:
        model.train()
        model(torch.empty(batch_size, *input_size(model), device="meta"))
        activations: int | None = total
    except Exception:  # an op without a meta kernel: the parameter bound still applies
        activations = None
    finally:
        for h in handles:
            h.remove()
    return Need(params, state, activations)


def capacity(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (the GPU's own for CUDA), None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def check_fits(need: Need, model: str, model_args: dict, batch_size: int, device: torch.device,
               half_activations: bool) -> None:
    """BadArgumentError when one training step of this model cannot fit in ``device``'s total memory."""
    cap = capacity(device)
    acts = (need.activation_bytes or 0) // (2 if half_activations else 1)  # bf16 / fp16 autocast halves most
    if cap is None or need.state_bytes + acts <= cap:
        return
    where = "GPU" if device.type == "cuda" else "main"
    args = f" with model_args {str(model_args)[:80]}" if model_args else ""
    raise BadArgumentError(
        f"{model}{args} needs about {size_text(need.state_bytes + acts)} to train ({need.params:,} parameters: "
        f"{size_text(need.state_bytes)} of weights, gradients, AdamW moments and EMA; {size_text(acts)} of "
        f"activations for a batch of {batch_size}), more than this machine's {size_text(cap)} of {where} memory; "
        "choose a smaller model, image size or batch size")
