"""Training configuration: one flat dataclass, named presets, every value overridable.

    cfg = resolve_config("paper", model="deepvit_32b", data_dir="/data/imagenet")   # preset + overrides
    cfg = resolve_config("digits", model="vit_micro", model_args={"depth": 16}, epochs=30)
    cfg.to_dict()  # JSON-able; saved as config.json beside every checkpoint and inside it

Overrides replace the preset's values, except mappings (``model_args``), which are merged key by key as a JSON merge
patch (RFC 7386): ``model_args={"mlp_ratio": 1}`` keeps the preset's other model arguments, ``{"depth": None}``
removes one. Types are checked in ``_coerce``, ranges in ``limits``.

Presets:
    paper   the official DeepViT ImageNet recipe (DeiT-style): AdamW lr 5e-4 (batch 256 = 32 x 8 GPUs), weight decay
            0.05, cosine with 5 warmup epochs from 1e-6 to a minimum of 1e-5, 300 epochs + 10 cooldown,
            RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.4, mixup 0.8, cutmix 1.0, label smoothing 0.1, random
            erasing 0.25, drop path 0.2, model EMA 0.99996, seed 42, bf16 autocast on GPUs.
    paper32 the 32-block variant of the official configs: mixup 0.1, no cutmix, cosine regulariser 0.1 (first 12 pairs).
    digits  scikit-learn's 8x8 digits upscaled to 32 px for the micro presets, on a CPU, patch 4 (65 tokens: one
            token per source pixel; at patch 8, 17 tokens, the trained maps stay near-uniform). Lighter: no
            RandAugment, no flips (they change a digit's meaning), no colour jitter, no mixup / cutmix, no random
            erasing (made for large natural-image sets; they slow learning on 1437 tiny grey images), mild
            random-resized crops, lr 1e-3 with batch 64, 80 epochs with 2 warmup (a 40-epoch schedule left
            ViT-32 2.5 points lower and its attention near-uniform; see checkpoints/README.md), EMA 0.995, BatchNorm
            re-calibration on 5 batches, evaluation every 2 epochs, collapse tracking every 5.
    smoke   synthetic images, a few steps, for tests.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadArgumentError
from .limits import check_ranges


@dataclass
class TrainConfig:
    # model
    model: str = "deepvit_micro"
    model_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"depth": 16}; passed to timm.create_model
    drop_path: float = 0.2
    drop: float = 0.0
    # data
    dataset: str = "folder"  # folder (ImageNet layout: DIR/train, DIR/val) | digits | synthetic
    data_dir: str | None = None
    synthetic_size: int = 64  # images per split of the synthetic set
    val_fraction: float = 0.2  # digits: held-out share (fixed, seeded split)
    workers: int = 4
    pin_memory: bool = True
    # augmentation (timm.data.create_transform / Mixup)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = 0.4
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    # optimisation
    epochs: int = 300
    cooldown_epochs: int = 10
    batch_size: int = 32  # per process
    opt: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    clip_grad: float | None = None
    sched: str = "cosine"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    # devices
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    compile: bool = False
    channels_last: bool = False
    # evaluation and collapse tracking
    bn_recalib_batches: int = 0  # official code: 50 (re-estimate Re-attention BatchNorm stats before evaluating)
    eval_every: int = 1
    track_every: int = 1  # collapse tracking every N epochs (0: off)
    track_images: int = 32  # fixed validation batch for collapse tracking
    track_threshold: float = 0.9
    # paper baselines (model options) and regulariser
    attn_reuse_from: int | None = None
    attn_temperature: tuple[float, float] | None = None
    attn_drop_max: float | None = None
    cosine_reg: float = 0.0  # official code: 0.1 for the 32-block model
    cosine_reg_pairs: int = 12
    # bookkeeping
    seed: int = 42
    output: str | None = None  # None: a fresh runs/train/version_N (N = next free), as Lightning does
    save_every: int = 1
    resume: bool = False  # continue from resume_from, or OUTPUT/last.pt (a fresh start when that does not exist yet)
    resume_from: str | None = None  # a last.pt to continue from (must exist)
    initial_checkpoint: str | None = None  # weights to fine-tune from (safetensors or last.pt; read_checkpoint)
    progress: bool = True
    max_steps_per_epoch: int | None = None  # cap (smoke tests)
    preset: str | None = None
    # each ``--resume --epochs N`` that changed the length: {"at_epoch": epochs done, "from": old, "to": new epochs}
    extended: list[dict[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = resolve_config(None, **{k: v for k, v in d.items() if k != "preset"})  # every value is in d already
        return dataclasses.replace(cfg, preset=d.get("preset"))


_PAPER: dict[str, Any] = dict(dataset="folder", batch_size=32, model_ema_decay=0.99996, amp="auto")
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(_PAPER, model="deepvit_16b"),
    "paper32": dict(_PAPER, model="deepvit_32b", mixup=0.1, cutmix=0.0, cosine_reg=0.1),
    "digits": dict(
        model="deepvit_micro", model_args={}, dataset="digits", auto_augment=None, color_jitter=None,
        scale=(0.75, 1.0), hflip=0.0,
        reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, drop_path=0.1, epochs=80, cooldown_epochs=0,
        batch_size=64, lr=1e-3, warmup_epochs=2, min_lr=1e-5, model_ema_decay=0.995, workers=0,
        bn_recalib_batches=5, eval_every=2, track_every=5, track_images=64, pin_memory=False,
    ),
    "smoke": dict(
        model="deepvit_micro", model_args={"depth": 2}, dataset="synthetic", synthetic_size=32, auto_augment=None,
        color_jitter=None, reprob=0.0, mixup=0.0, cutmix=0.0, epochs=2, cooldown_epochs=0, batch_size=8, lr=1e-3,
        warmup_epochs=1, model_ema_decay=0.9, workers=0, track_images=8, progress=False, pin_memory=False,
    ),
}

PRESET_HELP = {
    "paper": "official DeepViT ImageNet recipe (DeiT-style, 300 epochs, batch 256 over 8 GPUs); needs --data-dir",
    "paper32": "the 32-block variant: mixup 0.1, no cutmix, cosine regulariser 0.1; needs --data-dir",
    "digits": "scikit-learn digits at 32 px, patch 4, on a CPU, 80 epochs, light augmentation (the bundled "
              "checkpoints)",
    "smoke": "synthetic images, 2 epochs of a 2-block model, for tests",
}
# keys that change how a run is executed or logged, not what it computes: they may differ on --resume
RESUME_FREE = frozenset({"output", "resume", "resume_from", "initial_checkpoint", "progress", "device", "workers",
                         "pin_memory", "compile", "save_every", "preset", "extended"})
# keys a resume may change on purpose (the schedule is stretched to the new length): see ``resume.plan_epochs``
RESUME_EXTENDS = frozenset({"epochs"})
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the type of TrainConfig field ``key``, or BadArgumentError saying what was expected."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint

    def bad(what: str) -> BadArgumentError:
        return BadArgumentError(f"config key {key} must be {what}, got {value!r}")
    if origin is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise bad("a finite number") from None
    if origin is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} numbers, e.g. [0.08, 1.0]")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping with string keys, e.g. {\"depth\": 16}")
        if args and args[1] is not Any:
            return {k: _coerce(key, v, args[1]) for k, v in value.items()}
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(key, v, args[0]) for v in value]
    return value


def merge_patch(base: Any, patch: Any) -> Any:
    """``patch`` applied to ``base`` as a JSON merge patch (RFC 7386): mappings merge key by key (recursively), a None
    value inside a mapping removes that key, anything else replaces."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v) if isinstance(v, dict) else v
    return out


def merge_layers(*layers: dict[str, Any]) -> dict[str, Any]:
    """Config layers, lowest precedence first, into one: top-level keys replace (a None is kept: ``auto_augment:
    null`` switches it off), mapping values merge (``merge_patch``)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            both = isinstance(v, dict) and isinstance(out.get(k), dict)
            out[k] = merge_patch(out[k], v) if both else v
    return out


def resolve_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then ``PRESETS[preset]``, then ``overrides`` (unknown keys are a ``BadArgumentError``); mappings
    (``model_args``) merge key by key (``merge_layers``)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise BadArgumentError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise BadArgumentError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    values = merge_layers(values, overrides)
    values = {k: _coerce(k, v, _HINTS[k]) for k, v in values.items()}
    values["model_args"] = dict(values.get("model_args") or {})
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    if cfg.dataset not in ("folder", "digits", "synthetic"):
        raise BadArgumentError(f"dataset must be folder, digits or synthetic, got '{cfg.dataset}'")
    if cfg.dataset == "folder" and not cfg.data_dir:
        raise BadArgumentError("dataset 'folder' needs data_dir (a folder with train/ and val/ class sub-folders)")
    if cfg.amp not in ("auto", "bf16", "fp16", "none"):
        raise BadArgumentError(f"amp must be auto, bf16, fp16 or none, got '{cfg.amp}'")
    check_ranges(cfg)
    if cfg.mixup_mode == "batch" and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise BadArgumentError(f"mixup/cutmix need an even batch size, got {cfg.batch_size}")


def changed_on_resume(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Keys whose value differs between a checkpoint's config and ``cfg`` (ignoring ``RESUME_FREE`` and the
    ``RESUME_EXTENDS`` keys a resume may change on purpose)."""
    now = cfg.to_dict()
    return sorted(k for k in now if k not in RESUME_FREE | RESUME_EXTENDS and k in saved and saved[k] != now[k])
