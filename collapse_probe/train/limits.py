"""Ranges of the training settings: every value a config can hold, checked before anything is built or written.

    check_ranges(cfg)       # BadArgumentError (exit 2, one line) naming the key, the allowed range and the value

Types are checked by ``config._coerce``; here the values: finite floats, probabilities in [0, 1], counts that cannot
be negative, seeds numpy and torch both accept, epoch counts a run can finish, model arguments that are plain JSON
data of bounded size. The model's size against the machine's memory is checked later, on the meta device
(``sizing``), because it needs the architecture. Nothing here imports torch (``--print-config`` stays fast).
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..errors import BadArgumentError

MAX_EPOCHS = 100_000  # a 300-epoch ImageNet recipe is long; a million epochs is a typo or a hostile file
MAX_SEED = 2**32 - 1  # numpy's seed range (torch accepts more): one seed that both accept
MAX_DEPTH = 1024  # as loading.safety.MAX_DEPTH: blocks a config may ask for (the paper's deepest model has 32)
MAX_CONFIG_NODES = 10_000  # values (scalars, list items, mapping entries) inside model_args, after YAML aliases
MAX_CONFIG_NESTING = 32  # lists / mappings inside each other

# key: (lowest, highest) for integers; None as highest means no bound beyond the type
INT_RANGES: dict[str, tuple[int, int]] = {
    "epochs": (1, MAX_EPOCHS), "cooldown_epochs": (0, MAX_EPOCHS), "warmup_epochs": (0, MAX_EPOCHS),
    "batch_size": (1, 1 << 16), "workers": (0, 256), "synthetic_size": (1, 100_000), "recount": (0, 16),
    "bn_recalib_batches": (0, 100_000), "eval_every": (0, MAX_EPOCHS), "track_every": (0, MAX_EPOCHS),
    "track_images": (1, 4096), "cosine_reg_pairs": (1, MAX_DEPTH), "seed": (0, MAX_SEED),
    "save_every": (0, MAX_EPOCHS), "max_steps_per_epoch": (1, 2**31), "attn_reuse_from": (0, MAX_DEPTH - 1),
}
# key: (lowest, highest, what to say); every float must also be finite
FLOAT_RANGES: dict[str, tuple[float, float, str]] = {
    "lr": (0.0, math.inf, "a finite number >= 0"), "warmup_lr": (0.0, math.inf, "a finite number >= 0"),
    "min_lr": (0.0, math.inf, "a finite number >= 0"), "weight_decay": (0.0, math.inf, "a finite number >= 0"),
    "opt_eps": (1e-300, 1.0, "a number in (0, 1]"), "clip_grad": (1e-300, math.inf, "a finite number > 0"),
    "drop_path": (0.0, 1.0, "a number in [0, 1]"), "drop": (0.0, 1.0, "a number in [0, 1]"),
    "val_fraction": (1e-6, 1.0 - 1e-6, "a number in (0, 1)"), "hflip": (0.0, 1.0, "a number in [0, 1]"),
    "reprob": (0.0, 1.0, "a number in [0, 1]"), "mixup": (0.0, math.inf, "a finite number >= 0"),
    "cutmix": (0.0, math.inf, "a finite number >= 0"), "mixup_prob": (0.0, 1.0, "a number in [0, 1]"),
    "mixup_switch_prob": (0.0, 1.0, "a number in [0, 1]"), "smoothing": (0.0, 0.999, "a number in [0, 1)"),
    "color_jitter": (0.0, math.inf, "a finite number >= 0"), "model_ema_decay": (0.0, 1.0, "a number in [0, 1]"),
    "track_threshold": (0.0, 1.0, "a number in [0, 1]"), "cosine_reg": (0.0, math.inf, "a finite number >= 0"),
    "attn_drop_max": (0.0, 0.999, "a number in [0, 1)"),
}
CHOICES = {"mixup_mode": ("batch", "pair", "elem"), "remode": ("pixel", "const", "rand")}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


def _bad(key: str, what: str, value: Any) -> BadArgumentError:
    return BadArgumentError(f"config key {key} must be {what}, got {str(value)[:80]}")


def check_ranges(cfg: Any) -> None:
    """Raise BadArgumentError for the first value of ``cfg`` (a TrainConfig) outside its range."""
    for key, (lo, hi) in INT_RANGES.items():
        v = getattr(cfg, key)
        if v is not None and not lo <= v <= hi:
            raise _bad(key, f"an integer from {lo} to {hi}", v)
    for key, (lo, hi, what) in FLOAT_RANGES.items():
        v = getattr(cfg, key)
        if v is not None and not (math.isfinite(v) and lo <= v <= hi):
            raise _bad(key, what, v)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise _bad(key, "one of " + ", ".join(allowed), getattr(cfg, key))
    if not _DEVICE.match(cfg.device):
        raise BadArgumentError(f"unknown device {str(cfg.device)[:40]!r} (config key device): use auto, cpu, mps, "
                               "cuda or cuda:N")
    lo, hi = cfg.scale
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 1):
        raise _bad("scale", "two numbers 0 < low <= high <= 1", list(cfg.scale))
    if cfg.attn_temperature is not None and not all(math.isfinite(t) and t > 0 for t in cfg.attn_temperature):
        raise _bad("attn_temperature", "two finite numbers > 0", list(cfg.attn_temperature))
    if not cfg.model or not isinstance(cfg.model, str):
        raise _bad("model", "an architecture name", repr(cfg.model))
    check_model_args(cfg.model_args)
    if len(cfg.extended) > 1000:
        raise _bad("extended", "a list of at most 1000 changes of length", f"{len(cfg.extended)} entries")
    for i, e in enumerate(cfg.extended):
        if set(e) != {"at_epoch", "from", "to"} or not all(type(v) is int and 0 <= v <= MAX_EPOCHS for v in e.values()):
            raise _bad(f"extended[{i}]", "{at_epoch, from, to} epoch counts (written by --resume --epochs)", e)


def check_model_args(args: dict[str, Any]) -> None:
    """model_args: string keys, plain JSON values (finite numbers), at most MAX_CONFIG_NODES values, depth bounded."""
    count = 0

    def walk(x: Any, where: str, level: int = 0) -> None:
        nonlocal count
        count += 1
        if count > MAX_CONFIG_NODES:
            raise _bad("model_args", f"at most {MAX_CONFIG_NODES} values", f"more ({where})")
        if level > MAX_CONFIG_NESTING:
            raise _bad("model_args", f"nested at most {MAX_CONFIG_NESTING} levels deep", f"deeper ({where[:60]})")
        if isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, str):
                    raise _bad("model_args", "a mapping with string keys", f"key {str(k)[:20]!r} in {where}")
                walk(v, f"{where}.{k}", level + 1)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]", level + 1)
        elif isinstance(x, float):
            if not math.isfinite(x):
                raise _bad(where, "a finite number", x)
        elif x is not None and not isinstance(x, (str, int, bool)):
            raise _bad(where, "a number, string, true/false, null, list or mapping", type(x).__name__)

    walk(args, "model_args")
    depth = args.get("depth")
    if depth is not None and (type(depth) is not int or not 1 <= depth <= MAX_DEPTH):
        raise _bad("model_args.depth", f"an integer from 1 to {MAX_DEPTH}", depth)
