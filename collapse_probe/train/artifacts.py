"""What a run writes besides the loop's own state: config.json, log.csv / collapse.csv rows, TensorBoard scalars,
last.pt (``save_state``), best.safetensors and final.safetensors (``export``), every file through
``outputs.write_file`` except the append-only CSV logs and TensorBoard events.

Epochs are numbered from 1 everywhere a user sees them: the ``epoch`` column of log.csv and collapse.csv is the epoch
just finished (1 = after the first pass over the data), the same number as the console's ``epoch=`` and TensorBoard's
step. A write that fails (full disk, read-only folder) is one line, exit 2.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..distributed import DistInfo
from ..errors import BadArgumentError, CollapseProbeError, first_line
from ..loading.save import save_checkpoint
from ..outputs import write_file
from .config import TrainConfig
from .folder import LOG_FIELDS  # noqa: F401  (re-exported: the log's columns)
from .state import rng_state, save_training_state

_WRITE_WORDS = ("space", "write", "disk", "i/o", "ioerror", "read-only", "serializ", "file")


def write_json(path: Path, obj: Any) -> None:
    write_file(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _write_failed(path: Path, e: BaseException) -> BadArgumentError:
    reason = getattr(e, "strerror", None) or first_line(e, 120)
    return BadArgumentError(f"cannot write {path}: {reason}; free disk space or choose another --output, then "
                            "--resume")


def guarded(path: Path, write: Callable[[], object]) -> None:
    """``write()``; a failure to write ``path`` that a library raises as something else than OSError (safetensors'
    own error) becomes the same one line as an OSError."""
    try:
        write()
    except CollapseProbeError:
        raise
    except OSError as e:
        raise _write_failed(path, e) from e
    except Exception as e:
        if any(w in str(e).lower() for w in _WRITE_WORDS):
            raise _write_failed(path, e) from e
        raise


def append_csv(path: Path, fields: list[str], row: dict[str, Any]) -> None:
    try:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
    except OSError as e:
        raise _write_failed(path, e) from e


def fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def top1(row: dict[str, Any]) -> float:
    """The better of raw and EMA validation top-1 in a log row (-1 where the epoch was not evaluated)."""
    values = [v for v in (row.get("top1"), row.get("ema_top1")) if isinstance(v, (int, float))]
    return max(values, default=-1.0)


_SCALARS = {"train_loss": "train/loss", "val_loss": "val/loss", "top1": "val/top1", "top5": "val/top5",
            "ema_top1": "val/ema_top1", "ema_top5": "val/ema_top5", "lr": "lr",
            "similar_blocks": "collapse/similar_blocks",
            "images_per_s": "speed/images_per_s"}


def log_scalars(writer: Any, row: dict[str, Any], step: int) -> None:
    for key, tag in _SCALARS.items():
        if isinstance(row.get(key), (int, float)):
            writer.add_scalar(tag, row[key], step)
    writer.flush()


def save_best(path: Path, cfg: TrainConfig, model, ema, metrics, epoch: int) -> None:
    """best.safetensors: the better of raw / EMA weights at the best validation top-1 so far."""
    which = "ema" if "ema" in metrics and metrics["ema"]["top1"] > metrics["raw"]["top1"] else "raw"
    ev = {"top1": metrics[which]["top1"], "top5": metrics[which]["top5"], "loss": metrics[which]["loss"],
          "epoch": epoch, "dataset": cfg.dataset, "weights": which, "val_images": metrics[which]["images"]}
    guarded(path, lambda: save_checkpoint(ema.module if which == "ema" else model, path,
                                          extra={"eval": ev, "train_config": cfg.to_dict()}))


def save_state(path: Path, cfg: TrainConfig, info: DistInfo, model, ema, optimizer, scheduler, scaler, epoch: int,
          num_updates: int, history: list[dict[str, Any]]) -> None:
    rng = [rng_state()]
    if info.distributed:  # every rank's RNG, so a resumed multi-process run continues each stream
        rng = [None] * info.world
        dist.all_gather_object(rng, rng_state())
    if not info.main:
        return
    from ..loading.read import META_KEY
    from ..loading.save import model_metadata

    state = {
        "model": model.state_dict(), "model_ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "epoch": epoch, "num_updates": num_updates, "rng": rng, "config": cfg.to_dict(),
        "epoch_base": 1,  # history rows number epochs from 1 (absent: an earlier version's 0-based rows)
        "history": [{k: v for k, v in r.items()} for r in history],
        META_KEY: {**model_metadata(model), "train_config": cfg.to_dict()},  # what it was trained on, for the probe
    }
    save_training_state(path, state)
    write_json(path.parent / "config.json", cfg.to_dict())


def export(out: Path, cfg: TrainConfig, model, ema, metrics, epochs: int, track_batch) -> tuple[Path, dict]:
    """final.safetensors: raw or EMA weights, whichever has the better validation top-1 (recorded as "weights")."""
    which = "ema" if "ema" in metrics and metrics["ema"]["top1"] > metrics["raw"]["top1"] else "raw"
    chosen = ema.module if which == "ema" else model
    ev = {"top1": metrics[which]["top1"], "top5": metrics[which]["top5"], "loss": metrics[which]["loss"],
          "epochs": epochs, "dataset": cfg.dataset, "weights": which, "val_images": metrics[which]["images"]}
    extra: dict[str, Any] = {"eval": ev, "train_config": cfg.to_dict()}
    if track_batch is not None:
        from .evaluation import track_collapse

        tracked = track_collapse(chosen, track_batch.to(next(chosen.parameters()).device), cfg.track_threshold)
        extra["collapse"] = {"kind": tracked["kind"], "similar_blocks": tracked["similar_blocks"],
                             "similar_ratio": tracked["similar_ratio"], "threshold": cfg.track_threshold,
                             "similar_blocks_probs": tracked["similar_blocks_probs"],
                             "neighbor": tracked[tracked["kind"]]["neighbor"],
                             "images": int(track_batch.shape[0])}
        ev["similar_blocks"] = tracked["similar_blocks"]
    path = out / "final.safetensors"
    guarded(path, lambda: save_checkpoint(chosen, path, extra=extra))
    return path, ev
