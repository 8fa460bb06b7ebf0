"""Train ViT / DeepViT models: timm's recipe pieces, one GPU or many (torchrun + DDP), exact resume, collapse tracking.

    python -m collapse_probe train --preset digits --model deepvit_micro --depth 8 --output runs/deepvit8
    torchrun --nproc-per-node 8 -m collapse_probe train --preset paper --model deepvit_16b --data-dir /data/imagenet

Modules: config (dataclass, presets, merging), limits (value ranges), recipe (YAML files and --set, bounded), data
(datasets, loaders), setup (model, transforms, loss, optimizer, schedule), sizing (memory estimate on the meta
device), engine (the loop), evaluation (BatchNorm re-calibration, evaluation, collapse tracking), folder (which folders
a run may write, its manifest, logs), runs (choosing the folder, fine-tuning, TensorBoard, progress), resume (checking
and loading a last.pt), artifacts (logs, checkpoints), state (atomic training state, RNG), baselines (attention
reuse / temperature / dropping, cosine regulariser). What a checkpoint was trained on is read by ``loading.provenance``.
"""
from typing import Any

from .config import PRESETS, TrainConfig, resolve_config

_ENGINE = ("TrainResult", "evaluate", "recalibrate_bn", "track_collapse", "train")


def __getattr__(name: str) -> Any:  # the engine imports torch and timm: only when used (`--help` stays fast)
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRESETS", "TrainConfig", "TrainResult", "evaluate", "recalibrate_bn", "resolve_config", "track_collapse",
           "train"]
