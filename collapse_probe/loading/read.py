"""Read a checkpoint file or model folder without executing its code, with every safety check applied.

    ckpt = read_checkpoint("model.safetensors")        # or a torch.save file (weights_only=True), or a folder
    ckpt.state_dict, ckpt.metadata, ckpt.format         # weights, our stored config, what the file was

Formats are recognised by content, not extension: safetensors (8-byte header length, then JSON), torch zip archives
and legacy torch pickles, and folders: HuggingFace (config.json with model_type + model.safetensors or
pytorch_model.bin) and timm (config.json with architecture). Torch files are opened with
``torch.load(weights_only=True)``, which refuses any global that is not a tensor type; full pickle only with
``trust_pickle=True``, an explicit per-run choice.

Layouts: a bare state dict or one entry of a training checkpoint (``STATE_KEYS``, or ``key``); which keys are the
model's (``prefix``, a Lightning file's model next to its loss buffers) and the wrapper prefixes shared by every key
(``module.``, ``_orig_mod.``, ``model.``) are decided in ``loading.prefixes``.

Every check lives behind ``read_checkpoint`` (``loading.safety``): the file's structure before torch reads it, stored
configs that could steer timm's factory or ask for more than the weights hold, and NaN/Inf weights, so a caller of
this function alone gets nothing unchecked. ``loading.build`` turns the result into a model.
"""
from __future__ import annotations

import json
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    BadArgumentError,
    MalformedFileError,
    RefusedContentError,
    UnsupportedLayoutError,
    first_line,
    one_line,
)
from .hub import hub_id
from .hub import resolve as resolve_hub
from .native import native_name
from .prefixes import WRAPPER_PREFIXES, KeySelection, model_keys, strip_prefixes  # noqa: F401  (re-exported)
from .safety import check_finite, check_model_args, check_safetensors, check_torch_file, plain_data_classes

META_KEY = "collapse_probe"  # safetensors metadata key / torch dict key holding our model config


STATE_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema", "teacher", "student")  # first found wins


@dataclass
class Checkpoint:
    path: Path
    format: str  # "safetensors" | "torch-zip" | "torch-legacy" ("torch-tar" is sniffed but always refused)
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)  # our config if the file carries one
    key: str | None = None  # which entry of a training checkpoint held the weights
    # folders have format "hf-folder" or "timm-folder" and keep their config.json here
    config: dict[str, Any] = field(default_factory=dict)
    arch: str | None = None  # timm training checkpoints name their architecture in an "arch" entry
    args_model: str | None = None  # ... and in args.model (an argparse.Namespace of train.py's options)
    preprocessor: dict[str, Any] = field(default_factory=dict)  # HF preprocessor_config.json (mean, std, size)
    selection: KeySelection | None = None  # only the keys under a prefix were the model's (--prefix, Lightning)
    notes: list[str] = field(default_factory=list)  # what reading decided (the entry found, a Hub id's folder)
    hub_id: str | None = None  # the Hugging Face Hub id ``path`` was resolved from (``loading.hub``)


def sniff_format(path: Path) -> str:
    """What a file is, by its first bytes."""
    if not path.is_file():  # a FIFO or device would block or never end
        raise BadArgumentError(f"{path} is not a regular file; pass a checkpoint file (.safetensors, .pt, .pth)")
    with open(path, "rb") as f:
        head = f.read(512)
    size = path.stat().st_size
    if len(head) == 0:
        raise MalformedFileError(f"{path} is empty; expected a safetensors or torch.save checkpoint")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head[257:262] == b"ustar":  # torch < 0.4 tar checkpoints; refused by safety.check_torch_file
        return "torch-tar"
    raise MalformedFileError(f"{path} is neither a safetensors file nor a torch.save checkpoint (unknown header)")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    check_safetensors(path)  # header, dtypes and offsets, so every defect is one clean line
    try:
        with native_name(path) as name, safe_open(name, framework="pt", device="cpu") as f:  # any name the OS allows
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except BadArgumentError:
        raise
    except Exception as e:  # SafetensorError, or e.g. KeyError for a dtype this torch cannot hold: still one line
        raise MalformedFileError(f"{path} is a corrupt or truncated safetensors file ({first_line(e)})") from e
    ours = {}
    if META_KEY in meta:
        try:
            ours = json.loads(meta[META_KEY])
        except (json.JSONDecodeError, RecursionError) as e:
            raise MalformedFileError(f"{path} has unreadable '{META_KEY}' metadata; re-save it") from e
        if not isinstance(ours, dict):
            raise MalformedFileError(f"{path} has '{META_KEY}' metadata that is not a JSON object; re-save it")
    return tensors, ours


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy format or unreadable: the load error itself says enough
        names = []
    return ", ".join(names[:5]) or "non-tensor objects"


def _read_torch(path: Path, fmt: str, trust_pickle: bool) -> Any:
    check_torch_file(path, fmt, trust_pickle)  # zip bombs, TorchScript, tar, pickle size and globals, torch version
    try:
        # scoped, not add_safe_globals: the allowlist grows only for our own loads, never for the caller's process
        with warnings.catch_warnings(), torch.serialization.safe_globals(plain_data_classes()):
            warnings.simplefilter("ignore")  # torch warns on odd pickles; our error line says what matters
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            why = str(e).split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in str(e) else ""
            raise RefusedContentError(
                f"refused {path}: the weights-only loader rejected it ({first_line(ValueError(why)) if why else ''}"
                f"{'; ' if why else ''}{_unsafe_globals(path)}); convert it to safetensors, or pass --trust-pickle "
                "for this run only if you trust its author") from e
        raise MalformedFileError(f"{path} is a corrupt torch checkpoint ({first_line(e)})") from e
    except Exception as e:  # whatever a damaged archive makes torch raise (found by fuzzing): still one line
        raise MalformedFileError(f"{path} is a corrupt or truncated torch checkpoint ({first_line(e)})") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _entry(obj: Any, key: str) -> Any:
    """``obj[key]``, else the nested entry a dotted ``key`` names (``train.model``); None when there is none."""
    if isinstance(obj, dict) and key in obj:
        return obj[key]
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def weight_entries(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(dotted path, entry) of every entry, at any nesting, that holds a model's weights: a dict of tensors with
    module-path keys (``blocks.0.attn...``; an optimizer's per-parameter state ``exp_avg`` ... has none)."""
    if not isinstance(obj, dict) or depth > 8:  # a few levels suffice for any training dict; bounded for hostile ones
        return []
    found = []
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        here = f"{path}.{k}" if path else k
        if _is_state_dict(v) and any("." in name for name in v):
            found.append((here, v))
        elif isinstance(v, dict):
            found += weight_entries(v, here, depth + 1)
    return found


def _raw_state_dict(obj: Any, key: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The dict of tensors inside a loaded object, keys as stored, and which entry held it."""
    if key is not None:
        entry = _entry(obj, key)
        if entry is None:
            keys = list(obj)[:8] if isinstance(obj, dict) else []
            raise UnsupportedLayoutError(f"no entry '{key}' in the checkpoint (top-level keys: {keys})")
        if not _is_state_dict(entry):
            raise UnsupportedLayoutError(f"entry '{key}' is not a dict of tensors")
        return entry, key
    if isinstance(obj, nn.Module):  # only reachable with --trust-pickle: a whole pickled model
        return obj.state_dict(), None
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for k in STATE_KEYS:
            if _is_state_dict(obj.get(k)):
                return obj[k], k
            if isinstance(obj.get(k), nn.Module):
                return obj[k].state_dict(), k
        found = weight_entries(obj)
        if len(found) == 1:  # e.g. {'model_state': ..., 'config': ..., 'class_to_idx': ..., 'epoch': 3}
            return found[0][1], found[0][0]
        if found:
            sizes = ", ".join(f"{p} ({len(sd)} tensors)" for p, sd in found[:6])
            raise BadArgumentError(f"several entries hold weights: {sizes}{', ...' if len(found) > 6 else ''}; pass "
                                   "--key NAME to choose one")
        raise UnsupportedLayoutError(
            f"no state dict found: top-level keys are {list(obj)[:8]}; pass --key to say which holds the weights")
    raise UnsupportedLayoutError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")


def _found_note(obj: dict, used: str) -> str:
    others = [repr(k) for k in obj if k != used.split(".")[0]]
    beside = f" (beside {', '.join(others[:6])}{', ...' if len(others) > 6 else ''})" if others else ""
    return f"weights from entry '{used}', the only entry holding a model's weights{beside}; --key {used} to be explicit"


def extract_state_dict(obj: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The model weights inside a loaded object: a bare state dict, or one of ``STATE_KEYS`` (``key`` to choose),
    with the wrapper prefixes shared by every key stripped."""
    sd, used = _raw_state_dict(obj, key)
    return strip_prefixes(sd), used


def is_lightning(obj: Any) -> bool:
    """Whether a loaded torch object is a PyTorch Lightning checkpoint (Lightning always writes its version)."""
    return isinstance(obj, dict) and "pytorch-lightning_version" in obj


def read_checkpoint(path: str | Path, trust_pickle: bool = False, key: str | None = None,
                    allow_nonfinite: bool = False, prefix: str | None = None) -> Checkpoint:
    """Open ``path`` safely; raises a ``CollapseProbeError`` subclass with a one-line message on any problem.

    A ``path`` that does not exist but reads as a Hugging Face Hub id (``hf-hub:org/name``, ``org/name``) is the
    cached snapshot folder of that repository (``loading.hub``; ``HF_HUB_OFFLINE=1``: the cache only).

    ``prefix``: only the keys under it are the model's (``loading.prefixes``).

    Stored configs are checked against the weights (no factory options, no sizes beyond what the weights hold), and
    NaN/Inf weights raise ``MalformedFileError`` unless ``allow_nonfinite``.
    """
    path = Path(path)
    resolved = str(path.resolve()) if path.exists() else str(path)
    if any(resolved == r or resolved.startswith(r + "/") for r in ("/proc", "/sys", "/dev")):
        raise BadArgumentError(f"{path} is a system file, not a checkpoint; pass a .safetensors / .pt file")
    with warnings.catch_warnings():  # e.g. torch's complex-to-real cast warning: bad tensors get our own error
        warnings.simplefilter("ignore")
        try:
            hub = resolve_hub(str(path)) if not path.exists() else None  # a local path that exists always wins
            ckpt = _read(hub[0] if hub else path, trust_pickle, key, prefix)
        except OSError as e:  # unreadable disk sector, permissions, a file that vanished mid-read
            raise BadArgumentError(f"cannot read {path}: {e.strerror or one_line(e)}") from e
    if hub:
        ckpt.hub_id, ckpt.notes = hub_id(str(path)), [hub[1], *ckpt.notes]
    check_backed(ckpt.state_dict, ckpt.path)
    if ckpt.metadata.get("architecture"):
        check_model_args(ckpt.metadata, ckpt.state_dict, ckpt.path)
    if ckpt.format == "timm-folder":
        check_model_args({"architecture": ckpt.config["architecture"], "model_args": timm_folder_args(ckpt)},
                         ckpt.state_dict, ckpt.path)
    if not allow_nonfinite:
        check_finite(ckpt.state_dict, ckpt.path)
    return ckpt


def check_backed(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse tensors that claim more values than their stored bytes (zero or overlapping strides): a 7.7 KB file of
    views of one float must not become a 1 GB model."""
    for name, t in sd.items():
        if t.numel() and t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise RefusedContentError(f"refused {path}: tensor {name} {tuple(t.shape)} is a view larger than its "
                                      f"stored bytes (strides {tuple(t.stride())}); re-save real tensors")


def num_classes(sd: dict[str, torch.Tensor]) -> int:
    """Classifier size from ``head.weight`` (0: no head)."""
    w = sd.get("head.weight")
    # numel > 0: a zero-size [10**9, 0] head costs nothing to store but would make timm allocate a huge classifier
    return int(w.shape[0]) if w is not None and w.ndim == 2 and w.numel() > 0 else 0


def timm_folder_args(ckpt: Checkpoint) -> dict[str, Any]:
    """The model arguments a timm folder's config.json asks for."""
    return {"num_classes": ckpt.config.get("num_classes", num_classes(ckpt.state_dict)),
            **ckpt.config.get("model_args", {})}


def _read(path: Path, trust_pickle: bool, key: str | None, prefix: str | None) -> Checkpoint:
    if not path.exists():
        raise BadArgumentError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_folder(path, trust_pickle, key, prefix)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        raw, meta = _read_safetensors(path)
        if key is not None:
            raise BadArgumentError("--key applies to torch checkpoints; a safetensors file holds one state dict")
        sd, kept = model_keys(raw, prefix)
        return Checkpoint(path, fmt, sd, meta, selection=kept)
    obj = _read_torch(path, fmt, trust_pickle)
    raw, used = _raw_state_dict(obj, key)
    sd, kept = model_keys(raw, prefix, lightning=is_lightning(obj))
    meta = obj.get(META_KEY, {}) if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict) else {}
    arch = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None
    args_model = getattr(obj.get("args"), "model", None) if isinstance(obj, dict) else None
    notes = [_found_note(obj, used)] if key is None and used is not None and used not in STATE_KEYS else []
    return Checkpoint(path, fmt, sd, meta, used, arch=arch,
                      args_model=args_model if isinstance(args_model, str) else None, selection=kept, notes=notes)


FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedFileError(f"{path} is not valid JSON ({first_line(e)})") from e
    if not isinstance(obj, dict):
        raise MalformedFileError(f"{path} holds a {type(obj).__name__}, not a JSON object")
    return obj


def _read_folder(path: Path, trust_pickle: bool, key: str | None, prefix: str | None) -> Checkpoint:
    """A HuggingFace (config.json with model_type) or timm (config.json with architecture) model folder."""
    if not (path / "config.json").is_file():
        raise BadArgumentError(f"{path} is a folder without config.json; pass a checkpoint file (.safetensors, .pt) "
                               "or a HuggingFace / timm model folder")
    cfg = _read_json(path / "config.json")
    if "architecture" in cfg:
        fmt = "timm-folder"
    elif "model_type" in cfg:
        fmt = "hf-folder"
    else:
        raise UnsupportedLayoutError(f"{path}/config.json has neither 'architecture' (timm) nor 'model_type' "
                                     "(HuggingFace transformers)")
    weights = next((path / n for n in FOLDER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        sharded = any(path.glob("*.index.json"))
        raise UnsupportedLayoutError(f"{path} has sharded weights; merge them into one model.safetensors" if sharded
                                     else f"{path} has no {' or '.join(FOLDER_WEIGHTS)}")
    inner = _read(weights, trust_pickle, key, prefix)
    pre = path / "preprocessor_config.json"
    return Checkpoint(path, fmt, inner.state_dict, inner.metadata, inner.key, config=cfg, notes=inner.notes,
                      preprocessor=_read_json(pre) if pre.is_file() else {}, selection=inner.selection)
