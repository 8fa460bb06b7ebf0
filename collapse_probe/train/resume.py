"""Continuing a run from its last.pt: every part checked before anything is loaded, and files are written only after.

    state = read_state(path, max_bytes)                          # safety checks, weights-only load (exit 3 / 4)
    plan = plan_resume(state, cfg, path, epochs_from_checkpoint)  # config, epochs, history, RNG, types: exit 2 / 4
    apply_state(state, plan, model, ema, optimizer, scaler, reference_scheduler, rank, path)  # shapes: exit 4 / 5

A last.pt is a file like any other: it may be damaged, hand-edited or hostile. ``read_state`` goes through the
structural checks of ``loading.safety`` (no compressed entries, no TorchScript, pickle globals scanned, size bounded
by the model being trained). ``plan_resume`` and ``apply_state`` then check each entry: the config is a valid
TrainConfig equal to this run's in every key that changes the numbers; ``epoch`` a count in 0..the run's length;
``rng`` one complete state per rank that the RNG setters accept; weights of this model's shapes, finite; the optimizer
state of this model's parameters (same groups and settings, moments of each parameter's shape, finite); the grad
scaler's numbers in range; and the scheduler state, which is never loaded (the schedule is a function of the config
and the steps per epoch), equal to the one this config gives, so an altered length or a changed data set is named
rather than trained on.

``--resume --epochs N`` (N different from the run's length) changes the length: the schedule is rebuilt for N epochs
and continues from the current step (as timm's train.py does on resume), recorded in the config's ``extended``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BadArgumentError, CollapseProbeError, MalformedFileError, UnsupportedLayoutError, first_line
from .config import TrainConfig, changed_on_resume, resolve_config
from .limits import MAX_EPOCHS
from .state import load_training_state, rng_state, set_rng_state

STATE_ENTRIES = ("model", "optimizer", "scheduler", "scaler", "epoch", "num_updates", "rng")
MAX_UPDATES = 1 << 48
MAX_PROCESSES = 4096  # RNG states a last.pt may hold (one per rank of the job that wrote it)
_SCALAR = (int, float, str, bool, type(None))


@dataclass
class ResumePlan:
    cfg: TrainConfig  # the config to continue with (its epochs and ``extended`` decided here)
    start_epoch: int  # epochs finished (the last logged epoch number)
    num_updates: int
    history: list[dict[str, Any]]
    saved_epochs: int  # the checkpoint's own length, for the scheduler check
    note: str | None = None  # what changed, for stderr (a stretched schedule)


def read_state(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """The training state in ``path`` through the safety checks; ``max_bytes`` bounds the file (exit 3 beyond)."""
    from ..errors import RefusedContentError

    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadArgumentError(f"--resume {path}: {e.strerror or type(e).__name__}") from e
    if max_bytes is not None and size > max_bytes:
        raise RefusedContentError(f"refused {path}: {size / 2**20:.0f} MiB is far more than this model's training "
                                  f"state needs (at most {max_bytes / 2**20:.0f} MiB); is it the right last.pt?")
    return load_training_state(path)


def _bad(path: Path, what: str) -> MalformedFileError:
    return MalformedFileError(f"cannot resume from {path}: {what}; not an unaltered last.pt of collapse-probe train "
                              "(start from its weights with --initial-checkpoint, or delete it to start over)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _state_dict(sd: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise _bad(path, f"its {what} is not a mapping of names to tensors")
    return sd


def plan_resume(state: Any, cfg: TrainConfig, path: Path, epochs_from_checkpoint: bool = False) -> ResumePlan:
    """Check everything that does not need the model; decide the epochs. Raises before any file is touched."""
    missing = [k for k in STATE_ENTRIES if not isinstance(state, dict) or k not in state]
    if missing:
        raise MalformedFileError(f"{path} has no {', '.join(repr(k) for k in missing[:3])} entry: not a last.pt of "
                                 "collapse-probe train; start from its weights with --initial-checkpoint instead")
    saved_cfg = cfg
    if "config" in state:
        saved = state["config"]
        if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
            raise _bad(path, f"its config is a {type(saved).__name__}, not a mapping")
        # keys of other versions are ignored; "preset" only names where the values came from (they are all here)
        known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__ and k != "preset"}
        try:
            saved_cfg = resolve_config(None, **known)
        except BadArgumentError as e:
            raise _bad(path, f"its config is not valid ({first_line(e, 120)})") from e
        if epochs_from_checkpoint:
            cfg = dataclasses.replace(cfg, epochs=saved_cfg.epochs)
        diff = [k for k in changed_on_resume(saved_cfg.to_dict(), cfg) if k in saved]  # keys of earlier versions
        if diff:
            old, now = saved_cfg.to_dict(), cfg.to_dict()
            shown = "; ".join(f"{k}: {old[k]!r} -> {now[k]!r}" for k in diff[:4])
            raise BadArgumentError(f"--resume {path}: settings differ from the checkpoint's ({shown}); resume with "
                                   "its settings, or start a new run with --initial-checkpoint")
    epoch, updates = state["epoch"], state["num_updates"]
    saved_total = saved_cfg.epochs + saved_cfg.cooldown_epochs
    if not _is_int(epoch) or not 0 <= epoch <= saved_total:
        raise _bad(path, f"epoch {str(epoch)[:40]!r} is not a count of finished epochs (0 to {saved_total})")
    if not _is_int(updates) or not 0 <= updates <= MAX_UPDATES:
        raise _bad(path, f"num_updates {str(updates)[:40]!r} is not a step count")
    history = _history(state.get("history", []), path, legacy=state.get("epoch_base") != 1)
    ranks = state["rng"]
    if not isinstance(ranks, list) or not 1 <= len(ranks) <= MAX_PROCESSES:
        raise _bad(path, "its rng entry is not a list of per-process RNG states")
    for r in ranks:
        check_rng(r, path)
    for key in ("scheduler", "scaler", "optimizer"):
        if not isinstance(state[key], dict):
            raise _bad(path, f"its {key} state is a {type(state[key]).__name__}, not a mapping")
    _state_dict(state["model"], path, "model")
    if cfg.model_ema:
        _state_dict(state.get("model_ema"), path, "model_ema (this run keeps an EMA)")
    return _plan_epochs(cfg, saved_cfg, epoch, updates, history, path)


def _plan_epochs(cfg: TrainConfig, saved: TrainConfig, epoch: int, updates: int, history: list, path: Path
                 ) -> ResumePlan:
    """Keep the checkpoint's length, or change it (``--resume --epochs N``) from the current step."""
    plan = ResumePlan(dataclasses.replace(cfg, extended=list(saved.extended)), epoch, updates, history, saved.epochs)
    if cfg.epochs == saved.epochs:
        return plan
    total = cfg.epochs + cfg.cooldown_epochs
    if epoch > total:
        raise BadArgumentError(f"run {path.parent} has already trained {epoch} epochs, more than --epochs "
                               f"{cfg.epochs}; give more epochs to train longer")
    if epoch == total:  # nothing left either way: the finished-run message says so, nothing is recorded
        plan.cfg = dataclasses.replace(plan.cfg, epochs=cfg.epochs)
        return plan
    how = "stretched" if cfg.epochs > saved.epochs else "shortened"
    plan.cfg = dataclasses.replace(cfg, extended=[*saved.extended, {"at_epoch": epoch, "from": saved.epochs,
                                                                     "to": cfg.epochs}])
    plan.note = (f"note: --epochs {cfg.epochs} changes run {path.parent} from {saved.epochs} epochs ({epoch} done): "
                 f"the {cfg.sched} schedule is {how} to {cfg.epochs} epochs from the current step (update {updates}); "
                 "recorded as 'extended' in config.json")
    return plan


def _history(rows: Any, path: Path, legacy: bool) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or len(rows) > MAX_EPOCHS:
        raise _bad(path, "its history is not a list of epoch rows")
    out = []
    for r in rows:
        if not isinstance(r, dict) or not all(isinstance(k, str) and isinstance(v, _SCALAR) for k, v in r.items()):
            raise _bad(path, "its history holds a row that is not a mapping of names to numbers")
        r = dict(r)
        if legacy and _is_int(r.get("epoch")):  # written before epochs were numbered from 1
            r["epoch"] += 1
        out.append(r)
    return out


def check_rng(r: Any, path: Path) -> None:
    """One process's RNG state as ``state.rng_state`` writes it, and accepted by every setter."""
    def bad(what: str) -> MalformedFileError:
        return _bad(path, f"its rng state {what}")
    if not isinstance(r, dict) or not {"torch", "numpy", "python"} <= set(r):
        raise bad("lacks torch / numpy / python")
    t = r["torch"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
        raise bad("for torch is not a byte tensor of the generator's size")
    cuda = r.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.ndim == 1
                                             for c in cuda):
        raise bad("for CUDA is not a list of byte tensors")
    if cuda and torch.cuda.is_available() and len(cuda) > torch.cuda.device_count():
        raise bad(f"holds {len(cuda)} CUDA generators for {torch.cuda.device_count()} devices")
    n, p = r["numpy"], r["python"]
    if not isinstance(n, dict) or not isinstance(n.get("keys"), torch.Tensor) or n["keys"].shape != (624,) \
            or not all(_is_int(n.get(k)) for k in ("pos", "has_gauss")) or not isinstance(n.get("gauss"), float):
        raise bad("for numpy is not an MT19937 state")
    if not isinstance(p, dict) or not _is_int(p.get("version")) or not isinstance(p.get("state"), torch.Tensor) \
            or p["state"].shape != (625,) or not (p.get("gauss") is None or isinstance(p.get("gauss"), float)):
        raise bad("for Python's random is not a Mersenne Twister state")
    for keys in (n["keys"], p["state"][:624]):
        if keys.dtype != torch.int64 or int(keys.min()) < 0 or int(keys.max()) >= 2**32:
            raise bad("holds words outside 0..2**32-1")
    mine = rng_state()
    try:  # the setters are the final judges (positions, versions, sizes); then this process's state comes back
        set_rng_state(r)
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError, KeyError) as e:
        raise bad(f"is not accepted ({first_line(e, 80)})") from e
    finally:
        set_rng_state(mine)


# --------------------------------------------------------------------------------------------- with the model
def load_state(module: Any, state: Any, what: str, path: Path) -> None:
    """``module.load_state_dict(state)`` with a mismatch as one line (exit 5), not an internal error."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UnsupportedLayoutError(f"{path}: its {what} does not fit this run ({first_line(e, 160)}); use the "
                                     "--model/--depth it was trained with") from e


def check_optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The saved optimizer state belongs to these parameters: same groups and settings, moments of each parameter's
    shape, finite numbers (torch itself checks only the group sizes, and a wrong-shaped moment fails mid-step)."""
    def bad(what: str) -> MalformedFileError:
        return _bad(path, f"its optimizer state {what}")
    groups, fresh = saved.get("param_groups"), optimizer.param_groups
    if set(saved) != {"state", "param_groups"} or not isinstance(groups, list) or len(groups) != len(fresh):
        raise bad(f"does not have this optimizer's {len(fresh)} parameter groups")
    params: dict[int, torch.Tensor] = {}
    for i, (g, f) in enumerate(zip(groups, fresh)):
        ids = g.get("params") if isinstance(g, dict) else None
        if not isinstance(ids, list) or len(ids) != len(f["params"]) or not all(_is_int(j) for j in ids):
            raise bad(f"group {i} does not list this group's {len(f['params'])} parameters")
        params.update(zip(ids, f["params"]))
        for k, v in g.items():
            if k == "params":
                continue
            if k not in f:
                raise bad(f"group {i} has a setting {str(k)[:30]!r} this optimizer does not know")
            if k == "lr":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                    raise bad(f"group {i} has lr {str(v)[:30]}")
            elif (list(v) if isinstance(v, (list, tuple)) else v) != (list(f[k]) if isinstance(f[k], (list, tuple))
                                                                      else f[k]):
                raise bad(f"group {i} has {k} {str(v)[:30]}, this run {f[k]!r}")
    if len(params) != sum(len(f["params"]) for f in fresh):
        raise bad("lists a parameter twice")
    entries = saved["state"]
    if not isinstance(entries, dict):
        raise bad("has no per-parameter state mapping")
    keys = _state_keys(optimizer)
    for j, entry in entries.items():
        if not _is_int(j) or j not in params or not isinstance(entry, dict):
            raise bad(f"has an entry {str(j)[:20]!r} for no parameter of this model")
        if keys is not None and set(entry) != keys:
            raise bad(f"has entries {sorted(map(str, entry))[:4]} where this optimizer keeps {sorted(keys)}")
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                if v.ndim and v.shape != params[j].shape:
                    raise bad(f"has {name} of shape {list(v.shape)} for a parameter of shape {list(params[j].shape)}")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise bad(f"has non-finite {name}")
                if name == "step" and (v.numel() != 1 or float(v) < 0):
                    raise bad("has a negative or non-scalar step")
            elif not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise bad(f"has {name} = {str(v)[:20]}")


def _state_keys(optimizer: torch.optim.Optimizer) -> set[str] | None:
    """The per-parameter entries this optimizer keeps (e.g. step, exp_avg, exp_avg_sq), from one step of the same
    class and settings on a one-element parameter; None when that cannot be built (then only shapes are checked)."""
    try:
        p = nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold more than it takes
        probe = type(optimizer)([p], **{k: v for k, v in optimizer.defaults.items() if k in accepted})
        probe.step()
        return set(probe.state[p])
    except Exception:  # an optimizer that needs more than its defaults (a closure, a wrapped base optimizer)
        return None


def check_scaler(saved: dict[str, Any], scaler: Any, path: Path) -> None:
    if not scaler.is_enabled():
        return  # a disabled scaler ignores its state (bf16 / fp32 runs save {})
    keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    ok = set(saved) == keys and all(isinstance(saved[k], (int, float)) and not isinstance(saved[k], bool)
                                    and math.isfinite(saved[k]) for k in keys)
    if not ok or not (saved["scale"] > 0 and saved["growth_factor"] > 1 and 0 < saved["backoff_factor"] < 1
                      and _is_int(saved["growth_interval"]) and saved["growth_interval"] >= 1
                      and _is_int(saved["_growth_tracker"]) and saved["_growth_tracker"] >= 0):
        raise _bad(path, "its fp16 grad-scaler state is not a valid GradScaler state")


def check_scheduler(saved: dict[str, Any], reference: Any, path: Path) -> None:
    """The saved schedule is the one the checkpoint's config gives (never loaded: rebuilt from the config)."""
    want = {k: v for k, v in reference.state_dict().items() if k != "metric"}
    for key in ("t_initial", "base_values"):
        if key in want and key not in saved:
            raise _bad(path, f"its scheduler state has no {key}")
    for key, v in want.items():
        if key in saved and not _same(saved[key], v):
            raise _bad(path, f"its scheduler state has {key} {str(saved[key])[:40]}, but its config gives {v!r} (or "
                             "the training data changed size since the run started)")


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    return type(a) is type(b) and a == b


def apply_state(state: dict[str, Any], plan: ResumePlan, model: Any, ema: Any, optimizer: Any, scaler: Any,
                reference_scheduler: Any, rank: int, path: Path) -> None:
    """Check what needs the model, then load weights, EMA, optimizer and scaler, and set this rank's RNG."""
    from ..loading.safety import check_finite

    load_state(model, state["model"], "model", path)  # another architecture first: its message is the useful one
    if ema is not None:
        load_state(ema.module, state["model_ema"], "model_ema", path)
    for key in ("model", "model_ema") if ema is not None else ("model",):
        try:
            check_finite(state[key], path)
        except CollapseProbeError as e:
            raise MalformedFileError(f"cannot resume: {e}") from e
    check_scheduler(state["scheduler"], reference_scheduler, path)
    check_optimizer(state["optimizer"], optimizer, path)
    check_scaler(state["scaler"], scaler, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise _bad(path, f"its optimizer or scaler state does not load ({first_line(e, 120)})") from e
    ranks = state["rng"]
    set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
