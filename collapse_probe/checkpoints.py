"""Read checkpoints without executing their code, and turn them into models.

    ckpt = read_checkpoint("model.safetensors")               # or a torch.save file (weights_only=True)
    model, info = build_model(ckpt, model_name=None)          # our files carry their config; timm ones need a name
    save_checkpoint(model, "out.safetensors")                 # safetensors + our config as metadata

Formats are recognised by content, not extension: safetensors (8-byte header length, then JSON), torch zip archives
and legacy torch pickles. Torch files are opened with ``torch.load(weights_only=True)``, which refuses any global that
is not a tensor type; full pickle only with ``trust_pickle=True``, an explicit per-run choice.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import BadArgumentError, MalformedFileError, RefusedContentError, UnsupportedLayoutError

META_KEY = "collapse_probe"  # safetensors metadata key / torch dict key holding our model config
STATE_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema", "teacher", "student")  # first found wins
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class Checkpoint:
    path: Path
    format: str  # "safetensors" | "torch-zip" | "torch-legacy"
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)  # our config if the file carries one
    key: str | None = None  # which entry of a training checkpoint held the weights


def sniff_format(path: Path) -> str:
    """What a file is, by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 0:
        raise MalformedFileError(f"{path} is empty; expected a safetensors or torch.save checkpoint")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "torch-legacy"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    raise MalformedFileError(f"{path} is neither a safetensors file nor a torch.save checkpoint (unknown header)")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MalformedFileError(f"{path} is a corrupt or truncated safetensors file ({_first_line(e)})") from None
    ours = {}
    if META_KEY in meta:
        try:
            ours = json.loads(meta[META_KEY])
        except json.JSONDecodeError:
            raise MalformedFileError(f"{path} has unreadable '{META_KEY}' metadata; re-save it") from None
    return tensors, ours


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy format or unreadable: the load error itself says enough
        names = []
    return ", ".join(names[:5]) or "non-tensor objects"


def _read_torch(path: Path, fmt: str, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise RefusedContentError(
                f"refused {path}: loading it would run code ({_unsafe_globals(path)}); convert it to safetensors, or "
                "pass --trust-pickle for this run only if you trust its author") from None
        raise MalformedFileError(f"{path} is a corrupt torch checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, struct.error) as e:
        raise MalformedFileError(f"{path} is a corrupt or truncated torch checkpoint ({_first_line(e)})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP / torch.compile / Lightning wrappers (``module.``, ``_orig_mod.``, ``model.``) shared by every key."""
    changed = True
    while changed and sd:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd, changed = {k[len(p):]: v for k, v in sd.items()}, True
    return sd


def extract_state_dict(obj: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The model weights inside a loaded object: a bare state dict, or one of ``STATE_KEYS`` (``key`` to choose)."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = list(obj)[:8] if isinstance(obj, dict) else []
            raise UnsupportedLayoutError(f"no entry '{key}' in the checkpoint (top-level keys: {keys})")
        if not _is_state_dict(obj[key]):
            raise UnsupportedLayoutError(f"entry '{key}' is not a dict of tensors")
        return strip_prefixes(obj[key]), key
    if _is_state_dict(obj):
        return strip_prefixes(obj), None
    if isinstance(obj, dict):
        for k in STATE_KEYS:
            if _is_state_dict(obj.get(k)):
                return strip_prefixes(obj[k]), k
        raise UnsupportedLayoutError(
            f"no state dict found: top-level keys are {list(obj)[:8]}; pass --key to say which holds the weights")
    raise UnsupportedLayoutError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")


def read_checkpoint(path: str | Path, trust_pickle: bool = False, key: str | None = None) -> Checkpoint:
    """Open ``path`` safely; raises a ``CollapseProbeError`` subclass with a one-line message on any problem."""
    path = Path(path)
    if not path.exists():
        raise BadArgumentError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise BadArgumentError(f"{path} is a folder; pass a checkpoint file (.safetensors, .pt, .pth)")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        sd, meta = _read_safetensors(path)
        if key is not None:
            raise BadArgumentError("--key applies to torch checkpoints; a safetensors file holds one state dict")
        return Checkpoint(path, fmt, strip_prefixes(sd), meta)
    obj = _read_torch(path, fmt, trust_pickle)
    sd, used = extract_state_dict(obj, key)
    meta = obj.get(META_KEY, {}) if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict) else {}
    return Checkpoint(path, fmt, sd, meta, used)


def _compare(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise UnsupportedLayoutError(f"checkpoint does not fit {what}: " + "; ".join(problems))


def _num_classes(sd: dict[str, torch.Tensor]) -> int:
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else 0


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without any download, with a clear error for unknown names."""
    import collapse_probe.models  # noqa: F401  (registers our presets)

    if not timm.is_model(name):
        raise BadArgumentError(f"unknown model '{name}'; see timm.list_models('vit*') or our presets (deepvit_32b ...)")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UnsupportedLayoutError(f"cannot build {name} with {kwargs}: {_first_line(e)}") from None


def build_model(ckpt: Checkpoint, model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Instantiate the checkpoint's architecture and load its weights (strict, with a readable mismatch error).

    ``model_name`` (any timm name) wins over metadata in the file. Returns the model in eval mode and a description.
    """
    if model_name is not None:
        model = create_model(model_name, num_classes=_num_classes(ckpt.state_dict))
        arch, source = model_name, "--model"
    elif ckpt.metadata.get("architecture"):
        arch, source = ckpt.metadata["architecture"], "checkpoint metadata"
        model = create_model(arch, **ckpt.metadata.get("model_args", {}))
    else:
        raise UnsupportedLayoutError(
            f"{ckpt.path} does not say which architecture it is; pass --model NAME (a timm name, e.g. "
            "vit_small_patch16_224)")
    _compare(model, ckpt.state_dict, arch)
    model.load_state_dict(ckpt.state_dict, strict=False)
    model.eval()
    info = {"architecture": arch, "architecture_source": source, "checkpoint": str(ckpt.path),
            "format": ckpt.format, "key": ckpt.key, **describe(model)}
    return model, info


def describe(model: nn.Module) -> dict[str, Any]:
    """Depth, heads, width, tokens and parameter count of a ViT-like model (best effort)."""
    from .capture import attention_modules

    attns = attention_modules(model)
    info: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "depth": len(attns)}
    if attns:
        info["num_heads"] = attns[0][1].num_heads
    for name in ("embed_dim", "num_prefix_tokens"):
        if hasattr(model, name):
            info[name] = int(getattr(model, name))
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "num_patches", None):
        info["tokens"] = int(pe.num_patches) + int(getattr(model, "num_prefix_tokens", 0))
    if getattr(model, "reattn_block_indices", None) is not None:
        info["reattn_blocks"] = list(model.reattn_block_indices)
    return info


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """Our config for ``model`` (architecture + arguments + preprocessing), stored in every checkpoint we write."""
    args = getattr(model, "collapse_probe_args", None)
    if args is None:
        raise ValueError("model was not created by collapse_probe.models; no config to record")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    pre = {k: cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if k in cfg}
    return {**args, "pretrained_cfg": pre}


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never a partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)  # mkstemp creates 0600; give the result the permissions a plain open() would
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights as safetensors with our config (and ``extra``, e.g. accuracy) in the metadata."""
    from safetensors.torch import save_file

    meta = {**model_metadata(model), **(extra or {})}
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: json.dumps(meta)}))
