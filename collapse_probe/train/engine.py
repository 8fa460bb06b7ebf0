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
from .artifacts import LOG_FIELDS, append_csv, export, fmt, save_best, save_state, top1
from .baselines import CosineRegularizer
from .config import TrainConfig
from .data import build_datasets, eval_loader, fixed_batch, train_loader
from .evaluation import bn_modules, evaluate, recalibrate_bn, track_collapse
from .folder import CSV_FIELDS, RunFolder
from .resume import apply_state, plan_resume, read_state
from .runs import Scalars, bar, load_initial, plan_output
from .setup import (  # noqa: F401  (build_model, build_transforms, build_loss: re-exported for tests and scripts)
    amp_dtype,
    build_loss,
    build_model,
    build_optimizer,
    build_scheduler,
    build_transforms,
    model_kwargs,
    num_classes_of,
)
from .sizing import check_fits, estimate, size_text
from .state import seed_everything


@dataclass
class TrainResult:
    model: nn.Module  # raw (unwrapped) model after the last epoch
    ema: nn.Module | None
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)  # eval of the exported weights
    final_path: Path | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def train(cfg: TrainConfig, info: DistInfo | None = None, *, epochs_from_checkpoint: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset``; one process, or one rank of a torchrun job (DDP).

    ``epochs_from_checkpoint``: on resume, keep the checkpoint's length whatever ``cfg.epochs`` says (the CLI sets it
    when no epochs were given); otherwise a different ``cfg.epochs`` changes the run's length from the current step.
    """
    own_group = info is None
    info = info or init_distributed(cfg.device)
    try:
        return _train(cfg, info, epochs_from_checkpoint)
    finally:
        if own_group:
            cleanup()


def _train(cfg: TrainConfig, info: DistInfo, epochs_from_checkpoint: bool) -> TrainResult:
    folder, source = plan_output(cfg)  # every rank checks (same files, same errors); rank 0's choice of version_N wins
    if info.distributed:
        box = [str(folder.path)]
        dist.broadcast_object_list(box, src=0)
        if Path(box[0]) != folder.path:
            folder = RunFolder(Path(box[0]), "new")
    cfg = dataclasses.replace(cfg, output=str(folder.path), model_args=dict(cfg.model_args))
    if info.main:
        folder.lock()  # an existing folder: before any of it is read; a new one once it is made
    try:
        return _run(cfg, info, folder, source, epochs_from_checkpoint)
    except BaseException:
        if info.main:
            folder.discard()  # a run that never finished an epoch leaves no folder (nor files in a given empty one)
        raise
    finally:
        folder.release()


def _run(cfg: TrainConfig, info: DistInfo, folder: RunFolder, source: Path | None,
         epochs_from_checkpoint: bool) -> TrainResult:
    device, out = info.device, folder.path
    show = cfg.progress and info.main
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    # everything is built and checked before the first file is written: a bad setting leaves no folder behind
    num_classes = num_classes_of(cfg)
    dtype = amp_dtype(cfg, device)
    need = estimate(lambda: build_model(cfg, num_classes), cfg.batch_size, cfg.model_ema)
    check_fits(need, cfg.model, cfg.model_args, cfg.batch_size, device, dtype is not None)
    # same initial weights on every rank; then a per-rank stream for augmentation and drop path
    seed_everything(cfg.seed)
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
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    optimizer = build_optimizer(cfg, model)
    steps = len(train_loader(train_set, cfg, info.rank, info.world, 0))
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    start_epoch, num_updates, history = 0, 0, []
    if source is not None:  # every entry checked before anything of it is used, and before any file is written
        state = read_state(source, max_bytes=2 * need.state_bytes + (256 << 20))
        plan = plan_resume(state, cfg, source, epochs_from_checkpoint)
        cfg = plan.cfg
        scheduler, total_epochs = build_scheduler(cfg, optimizer, cfg.epochs, steps)
        reference = scheduler if plan.saved_epochs == cfg.epochs else \
            build_scheduler(cfg, optimizer, plan.saved_epochs, steps)[0]
        apply_state(state, plan, model, ema, optimizer, scaler, reference, info.rank, source)
        scheduler.step_update(num_updates=plan.num_updates)  # the lr of this step (on a stretched schedule too)
        start_epoch, num_updates, history = plan.start_epoch, plan.num_updates, plan.history
        del state
        if start_epoch >= total_epochs and (out / "final.safetensors").is_file():
            if info.main:
                print(f"run {out} already finished {start_epoch} epochs; nothing to do; use --resume --epochs M with "
                      f"M > {cfg.epochs} to train longer", file=sys.stderr)
            return TrainResult(_unwrap(model), ema.module if ema is not None else None, history)
        note = [plan.note, f"resumed from {source} at epoch {start_epoch}"]
    else:
        scheduler, total_epochs = build_scheduler(cfg, optimizer, cfg.epochs, steps)
        note = [f"--resume: no {out / 'last.pt'} yet, starting from scratch" if cfg.resume else None]
    if info.main:
        logs = {name: folder.read_log(name) for name in CSV_FIELDS} if cfg.resume else {}  # ours, or refused now
        for line in filter(None, note):
            print(line, file=sys.stderr)
        folder.commit(cfg.to_dict(), start_epoch, cut_logs=cfg.resume, logs=logs)  # the first write of the run
        print(f"train: {cfg.model}, {need.params:,} parameters (about {size_text(need.total)} of memory) on {device}"
              f"{f' with {dtype}'.replace('torch.', '') if dtype else ''}, {info.world} process(es); {cfg.dataset}: "
              f"{len(train_set)} training / {len(val_set)} validation images, {steps} steps of {cfg.batch_size} "
              f"per epoch; epochs {start_epoch + 1}..{total_epochs} into {out}", file=sys.stderr, flush=True)
    scalars = Scalars(folder) if info.main else None
    best = max([top1(r) for r in history] + [-1.0])

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    mixup_fn, criterion = build_loss(cfg, num_classes)
    regularizer = CosineRegularizer(model, cfg.cosine_reg, cfg.cosine_reg_pairs) if cfg.cosine_reg > 0 else None

    train_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device] if device.type == "cuda" else None,
                          find_unused_parameters=cfg.attn_reuse_from is not None)  # reusing blocks leave q, k unused
    if cfg.compile:
        train_model = torch.compile(train_model)

    val = eval_loader(val_set, cfg, info.rank, info.world)
    metrics: dict[str, Any] = {}

    def evaluate_both(when: str) -> dict[str, Any]:
        with bar(val, len(val), f"{when}: evaluation (raw)", show) as batches:
            found = {"raw": evaluate(model, batches, device, info, autocast)}
        if ema is not None:
            with bar(val, len(val), f"{when}: evaluation (ema)", show) as batches:
                found["ema"] = evaluate(ema.module, batches, device, info, autocast)
        return found

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
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(tot[0] / max(float(tot[1]), 1.0)),
                               "lr": optimizer.param_groups[0]["lr"],
                               "images_per_s": float(tot[1]) / max(train_seconds, 1e-9)}
        last = epoch == total_epochs - 1
        if cfg.bn_recalib_batches and bn_modules(model):
            for name, m in [("raw", model)] + ([("ema", ema.module)] if ema is not None else []):
                with bar(train_loader(train_set, cfg, info.rank, info.world, epoch), cfg.bn_recalib_batches,
                         f"epoch {epoch + 1}: BatchNorm re-calibration ({name})", show) as batches:
                    recalibrate_bn(m, batches, device, cfg.bn_recalib_batches, info, autocast)
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            metrics = evaluate_both(f"epoch {epoch + 1}")
            row.update(val_loss=metrics["raw"]["loss"], top1=metrics["raw"]["top1"], top5=metrics["raw"]["top5"])
            if ema is not None:
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
                            {"epoch": epoch + 1, "kind": kind, "block": b,
                             "neighbor_similarity": "" if nb is None else fmt(nb),
                             "similar": int(b in tracked[kind]["similar_blocks"])})
        row["epoch_seconds"] = time.perf_counter() - t0
        history.append(row)
        if info.main:
            append_csv(out / "log.csv", LOG_FIELDS, {k: fmt(v) for k, v in row.items()})
            msg = " ".join(f"{k}={fmt(v)}" for k, v in row.items())
            print(msg, file=sys.stderr, flush=True)
            scalars.log(row, epoch + 1)
        if last or (epoch + 1) % max(cfg.save_every, 1) == 0:
            save_state(out / "last.pt", cfg, info, model, ema, optimizer, scheduler, scaler, epoch + 1, num_updates,
                       history)
            folder.saved = True

    if not metrics and start_epoch >= total_epochs:  # finished earlier, stopped before final.safetensors was written
        metrics = evaluate_both(f"epoch {total_epochs}")
    result = TrainResult(_unwrap(model), ema.module if ema is not None else None, history)
    if info.main and metrics:
        result.final_path, result.final = export(out, cfg, model, ema, metrics, total_epochs, track_batch)
    if regularizer is not None:
        regularizer.remove()
    if scalars is not None:
        scalars.close()
    return result
