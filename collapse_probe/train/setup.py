"""Everything a run builds before its first step, each failure one line: model, transforms, loss, optimizer, schedule.

    model = build_model(cfg, num_classes)                    # timm.create_model with the baselines' options
    train_tf, val_tf = build_transforms(cfg, model)          # timm.data.create_transform, the model's input size
    mixup_fn, criterion = build_loss(cfg, num_classes)
    optimizer = build_optimizer(cfg, model)                  # timm.optim.create_optimizer_v2
    scheduler, total_epochs = build_scheduler(cfg, optimizer, epochs, steps)

Values of the right type that a library still rejects (an unknown optimizer name, a RandAugment string timm cannot
parse, a model argument the architecture does not take) are the user's settings: exit 2, naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BadArgumentError, CollapseProbeError, first_line
from ..loading.build import create_model
from .baselines import baseline_model_args
from .config import TrainConfig
from .sizing import input_size

_LIBRARY_ERRORS = (TypeError, ValueError, AssertionError, KeyError, AttributeError, NotImplementedError, RuntimeError)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA for "auto" (no loss scaling needed); fp16 uses a GradScaler; None = full precision."""
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        raise BadArgumentError("amp fp16 needs a CUDA device; use bf16 or none on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def num_classes_of(cfg: TrainConfig) -> int:
    if cfg.dataset in ("digits", "synthetic"):
        return 10
    root = Path(cfg.data_dir or "") / "train"
    if not root.is_dir():
        raise BadArgumentError(f"{root} is not a folder; data_dir needs train/ and val/ (ImageNet layout)")
    return sum(1 for p in root.iterdir() if p.is_dir())


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    from ..loading.safety import steering_keys

    steering = steering_keys(cfg.model_args)
    if steering:
        raise BadArgumentError(f"model_args may not set {', '.join(steering)} (timm would load another file or "
                               "download); start from weights with --initial-checkpoint")
    return {"num_classes": num_classes, "drop_path_rate": cfg.drop_path, "drop_rate": cfg.drop,
            **baseline_model_args(cfg), **cfg.model_args}


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    args = model_kwargs(cfg, num_classes)
    try:
        return create_model(cfg.model, **args)
    except CollapseProbeError as e:  # create_model's wording is for arguments read from a file: here they are ours
        raise BadArgumentError(f"model {cfg.model}: {e}") from e
    except _LIBRARY_ERRORS as e:
        raise BadArgumentError(f"cannot build {cfg.model} with model_args {str(cfg.model_args)[:80]}: "
                               f"{first_line(e, 120)}") from e


def build_transforms(cfg: TrainConfig, model: nn.Module):
    from timm.data import create_transform, resolve_data_config

    dc = resolve_data_config({}, model=model)
    size = input_size(model)
    try:
        train_tf = create_transform(
            size, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter if cfg.color_jitter else None, auto_augment=cfg.auto_augment,
            interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"], re_prob=cfg.reprob,
            re_mode=cfg.remode, re_count=cfg.recount)
        val_tf = create_transform(size, is_training=False, interpolation=dc["interpolation"], mean=dc["mean"],
                                  std=dc["std"], crop_pct=dc["crop_pct"])
    except _LIBRARY_ERRORS as e:
        raise BadArgumentError(f"timm cannot build the augmentation (auto_augment {cfg.auto_augment!r}, remode "
                               f"{cfg.remode!r}): {first_line(e, 120)}") from e
    return train_tf, val_tf


def build_loss(cfg: TrainConfig, num_classes: int):
    """(mixup_fn or None, training criterion): timm's Mixup / SoftTargetCrossEntropy / LabelSmoothingCrossEntropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory; AdamW skips weight decay for 1-d parameters and model.no_weight_decay()."""
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
    except _LIBRARY_ERRORS as e:
        raise BadArgumentError(f"config key opt: timm has no optimizer {cfg.opt!r} ({first_line(e, 100)})") from e


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, epochs: int, steps: int) -> tuple[Any, int]:
    """(scheduler stepped per update, total epochs incl. cooldown) for a run of ``epochs`` epochs of ``steps``."""
    from timm.scheduler import create_scheduler_v2

    try:
        return create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False, updates_per_epoch=steps)
    except _LIBRARY_ERRORS as e:
        raise BadArgumentError(f"config key sched: timm cannot build schedule {cfg.sched!r} ({first_line(e, 100)})"
                               ) from e
