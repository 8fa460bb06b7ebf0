"""Training loop: timm transforms / Mixup / AdamW / cosine schedule / EMA, AMP, DDP, exact resume, collapse tracking.

    from collapse_probe.train import resolve_config, train
    result = train(resolve_config("digits", model="vit_micro", model_args={"depth": 8}, output="runs/vit8"))
    result.final_path  # runs/vit8/final.safetensors (better of raw / EMA weights by validation top-1)

Files in ``cfg.output`` (rank 0 writes them):
    config.json       the resolved config (also inside every checkpoint)
    last.pt           full training state after the latest epoch (atomic; ``resume=True`` continues from it)
    log.csv           per epoch: train loss, val loss, top-1, top-5 (raw and EMA), lr, images/s, seconds, similar blocks
    collapse.csv      per tracked epoch and block: neighbour similarity of the current model on a fixed val batch
    best.safetensors  the weights (raw or EMA) with the best validation top-1 so far, "epoch" in the eval metadata
    final.safetensors the exported model with its config and accuracy in the metadata
    events.out.tfevents.*  TensorBoard scalars per epoch (train/loss, val/top1, val/top5, lr, collapse/similar_blocks)
                      when the tensorboard package is installed

``cfg.output`` None: a fresh runs/train/version_N; a folder holding a run is continued only with ``resume`` (see
``runs``).

Per epoch: train -> optional BatchNorm re-calibration -> evaluation -> collapse tracking -> log -> checkpoint. RNG
states are saved with the checkpoint after all of these, so a resumed run replays exactly what an uninterrupted run
does next (one process; under DDP every rank's RNG state is gathered and restored too).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from ..errors import BadArgumentError
from ..loading.build import create_model
from .artifacts import (
    LOG_FIELDS,
    append_csv,
    export,
    fmt,
    log_scalars,
    save_best,
    save_state,
    top1,
    truncate_csv,
    write_json,
)
from .baselines import CosineRegularizer, baseline_model_args
from .config import TrainConfig
from .data import build_datasets, eval_loader, fixed_batch, train_loader
from .evaluation import bn_modules, evaluate, recalibrate_bn, track_collapse
from .runs import bar, load_initial, load_resume, load_state, resume_path, run_folder, summary_writer
from .state import seed_everything, set_rng_state


@dataclass
class TrainResult:
    model: nn.Module  # raw (unwrapped) model after the last epoch
    ema: nn.Module | None
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)  # eval of the exported weights
    final_path: Path | None = None


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA for "auto" (no loss scaling needed); fp16 uses a GradScaler; None = full precision."""
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        raise BadArgumentError("amp fp16 needs a CUDA device; use bf16 or none on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _num_classes(cfg: TrainConfig) -> int:
    if cfg.dataset in ("digits", "synthetic"):
        return 10
    root = Path(cfg.data_dir or "") / "train"
    if not root.is_dir():
        raise BadArgumentError(f"{root} is not a folder; data_dir needs train/ and val/ (ImageNet layout)")
    return sum(1 for p in root.iterdir() if p.is_dir())


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    args = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path, "drop_rate": cfg.drop,
            **baseline_model_args(cfg), **cfg.model_args}
    return create_model(cfg.model, **args)


def build_transforms(cfg: TrainConfig, model: nn.Module):
    from timm.data import create_transform, resolve_data_config

    dc = resolve_data_config({}, model=model)
    train_tf = create_transform(
        dc["input_size"], is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter if cfg.color_jitter else None, auto_augment=cfg.auto_augment,
        interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"], re_prob=cfg.reprob, re_mode=cfg.remode,
        re_count=cfg.recount)
    val_tf = create_transform(dc["input_size"], is_training=False, interpolation=dc["interpolation"],
                              mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"])
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


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def train(cfg: TrainConfig, info: DistInfo | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset``; one process, or one rank of a torchrun job (DDP)."""
    own_group = info is None
    info = info or init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        if own_group:
            cleanup()


def _train(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    device = info.device
    out = run_folder(cfg)  # every rank checks (same files, same errors); rank 0's choice of version_N wins
    if info.distributed:
        box = [str(out)]
        dist.broadcast_object_list(box, src=0)
        out = Path(box[0])
    cfg = dataclasses.replace(cfg, output=str(out), model_args=dict(cfg.model_args))
    if info.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadArgumentError(f"cannot create --output {out}: {e.strerror or type(e).__name__}") from e
    show = cfg.progress and info.main
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    # same initial weights on every rank; then a per-rank stream for augmentation and drop path
    seed_everything(cfg.seed)
    num_classes = _num_classes(cfg)
    model = build_model(cfg, num_classes)
    if cfg.initial_checkpoint:  # before the EMA copy, so both start from these weights
        for k in load_initial(model, cfg.initial_checkpoint):
            if info.main:
                print(f"note: --initial-checkpoint: {k} has another shape here; left at its initialisation",
                      file=sys.stderr)
    seed_everything(cfg.seed + info.rank)
    train_tf, val_tf = build_transforms(cfg, model)
    train_set, val_set, _ = build_datasets(cfg, train_tf, val_tf)
    track_batch = fixed_batch(val_set, cfg.track_images) if cfg.track_every and info.main else None

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    # AdamW; timm skips weight decay for 1-d parameters (norms, biases) and model.no_weight_decay() (tokens, pos_embed)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
    steps = len(train_loader(train_set, cfg, info.rank, info.world, 0))
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False, updates_per_epoch=steps)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    mixup_fn, criterion = build_loss(cfg, num_classes)
    regularizer = CosineRegularizer(model, cfg.cosine_reg, cfg.cosine_reg_pairs) if cfg.cosine_reg > 0 else None

    start_epoch, num_updates, history = 0, 0, []
    ckpt_path, source = out / "last.pt", resume_path(cfg, out)
    if source is not None:
        state = load_resume(source, cfg)
        load_state(model, state["model"], "model", source)
        if ema is not None and state.get("model_ema") is not None:
            load_state(ema.module, state["model_ema"], "model_ema", source)
        load_state(optimizer, state["optimizer"], "optimizer", source)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, num_updates, history = state["epoch"], state["num_updates"], list(state.get("history", []))
        ranks = state["rng"]
        set_rng_state(ranks[info.rank] if info.rank < len(ranks) else ranks[0])
        if info.main:
            print(f"resumed from {source} at epoch {start_epoch}", file=sys.stderr)
    elif cfg.resume and info.main:
        print(f"--resume: no {ckpt_path} yet, starting from scratch", file=sys.stderr)
    if info.main:
        if cfg.resume:  # rows written after the checkpoint we continue from (a crash), or by a run never saved
            truncate_csv(out / "log.csv", start_epoch)
            truncate_csv(out / "collapse.csv", start_epoch)
        write_json(out / "config.json", cfg.to_dict())
    writer = summary_writer(out) if info.main else None
    best = max([top1(r) for r in history] + [-1.0])

    train_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device] if device.type == "cuda" else None,
                          find_unused_parameters=cfg.attn_reuse_from is not None)  # reusing blocks leave q, k unused
    if cfg.compile:
        train_model = torch.compile(train_model)

    val = eval_loader(val_set, cfg, info.rank, info.world)
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, total_epochs):
        t0 = time.perf_counter()
        loader = train_loader(train_set, cfg, info.rank, info.world, epoch)
        train_model.train()
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        progress = bar(loader, steps, f"epoch {epoch + 1}/{total_epochs}: training", show)
        for step, (images, target) in enumerate(progress):
            if step >= steps:
                break
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup_fn is not None:
                images, target = mixup_fn(images, target)
            with autocast():
                output = train_model(images)
                loss = criterion(output, target)
                if regularizer is not None:
                    loss = loss + regularizer.loss()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
            loss_sum += loss.detach().double() * len(images)
            seen += len(images)
            if show and step % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        progress.close()  # a loop left by ``break`` keeps its bar open: the next one would nest under it
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        scheduler.step(epoch + 1)
        tot = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)]),
                             info).cpu()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(tot[0] / max(float(tot[1]), 1.0)),
                               "lr": optimizer.param_groups[0]["lr"],
                               "images_per_s": float(tot[1]) / max(train_seconds, 1e-9)}
        last = epoch == total_epochs - 1
        if cfg.bn_recalib_batches and bn_modules(model):
            for name, m in [("raw", model)] + ([("ema", ema.module)] if ema is not None else []):
                with bar(train_loader(train_set, cfg, info.rank, info.world, epoch), cfg.bn_recalib_batches,
                         f"epoch {epoch + 1}: BatchNorm re-calibration ({name})", show) as batches:
                    recalibrate_bn(m, batches, device, cfg.bn_recalib_batches, info, autocast)
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            with bar(val, len(val), f"epoch {epoch + 1}: evaluation (raw)", show) as batches:
                metrics = {"raw": evaluate(model, batches, device, info, autocast)}
            row.update(val_loss=metrics["raw"]["loss"], top1=metrics["raw"]["top1"], top5=metrics["raw"]["top5"])
            if ema is not None:
                with bar(val, len(val), f"epoch {epoch + 1}: evaluation (ema)", show) as batches:
                    metrics["ema"] = evaluate(ema.module, batches, device, info, autocast)
                row.update(ema_top1=metrics["ema"]["top1"], ema_top5=metrics["ema"]["top5"])
            if info.main and top1(row) > best:
                best = top1(row)
                save_best(out / "best.safetensors", cfg, model, ema, metrics, epoch + 1)
        if track_batch is not None and (last or (epoch + 1) % cfg.track_every == 0):
            with bar([track_batch], 1, f"epoch {epoch + 1}: collapse tracking ({len(track_batch)} images)",
                     show) as batches:
                tracked = track_collapse(model, next(iter(batches)).to(device), cfg.track_threshold)
            row["similar_blocks"] = tracked["similar_blocks"]
            kind = tracked["kind"]
            for b, nb in zip(tracked[kind]["blocks"], tracked[kind]["neighbor"]):
                append_csv(out / "collapse.csv", ["epoch", "kind", "block", "neighbor_similarity", "similar"],
                            {"epoch": epoch, "kind": kind, "block": b,
                             "neighbor_similarity": "" if nb is None else fmt(nb),
                             "similar": int(b in tracked[kind]["similar_blocks"])})
        row["epoch_seconds"] = time.perf_counter() - t0
        history.append(row)
        if info.main:
            append_csv(out / "log.csv", LOG_FIELDS, {k: fmt(v) for k, v in row.items()})
            msg = " ".join(f"{k}={fmt(v)}" for k, v in row.items())
            print(msg, file=sys.stderr, flush=True)
            if writer is not None:
                log_scalars(writer, row, epoch + 1)
        if last or (epoch + 1) % max(cfg.save_every, 1) == 0:
            save_state(ckpt_path, cfg, info, model, ema, optimizer, scheduler, scaler, epoch + 1, num_updates, history)

    result = TrainResult(_unwrap(model), ema.module if ema is not None else None, history)
    if info.main and metrics:
        result.final_path, result.final = export(out, cfg, model, ema, metrics, total_epochs, track_batch)
    if regularizer is not None:
        regularizer.remove()
    if writer is not None:
        writer.close()
    return result
