"""Read checkpoints without executing their code, and turn them into models.

    ckpt = read_checkpoint("model.safetensors")               # or a torch.save file (weights_only=True)
    model, info = build_model(ckpt, model_name=None)          # our files carry their config; timm ones need a name
    save_checkpoint(model, "out.safetensors")                 # safetensors + our config as metadata

Formats are recognised by content, not extension: safetensors (8-byte header length, then JSON), torch zip archives
and legacy torch pickles, and folders: HuggingFace (config.json with model_type + model.safetensors or
pytorch_model.bin) and timm (config.json with architecture). Torch files are opened with
``torch.load(weights_only=True)``, which refuses any global that is not a tensor type; full pickle only with
``trust_pickle=True``, an explicit per-run choice.

Layouts: a bare state dict or one entry of a training checkpoint (``STATE_KEYS``, or ``key``); wrapper prefixes
(``module.``, ``_orig_mod.``, Lightning's ``model.``) shared by every key are stripped, repeatedly. Without a name or
config, ``collapse_probe.infer`` reads the architecture from the weight shapes (and says which source decided heads).
"""
from __future__ import annotations

import json
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import BadArgumentError, MalformedFileError, RefusedContentError, UnsupportedLayoutError
from .outputs import write_file
from .safety import check_finite, check_model_args, check_safetensors, check_torch_file

META_KEY = "collapse_probe"  # safetensors metadata key / torch dict key holding our model config
STATE_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema", "teacher", "student")  # first found wins
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


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
    preprocessor: dict[str, Any] = field(default_factory=dict)  # HF preprocessor_config.json (mean, std, size)


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
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, or e.g. KeyError for a dtype this torch cannot hold: still one line
        raise MalformedFileError(f"{path} is a corrupt or truncated safetensors file ({_first_line(e)})") from None
    ours = {}
    if META_KEY in meta:
        try:
            ours = json.loads(meta[META_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise MalformedFileError(f"{path} has unreadable '{META_KEY}' metadata; re-save it") from None
        if not isinstance(ours, dict):
            raise MalformedFileError(f"{path} has '{META_KEY}' metadata that is not a JSON object; re-save it")
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
    check_torch_file(path, fmt, trust_pickle)  # zip bombs, TorchScript, tar, pickle size and globals, torch version
    try:
        with warnings.catch_warnings():  # torch warns on odd pickles; our error line says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            why = str(e).split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in str(e) else ""
            raise RefusedContentError(
                f"refused {path}: the weights-only loader rejected it ({_first_line(ValueError(why)) if why else ''}"
                f"{'; ' if why else ''}{_unsafe_globals(path)}); convert it to safetensors, or pass --trust-pickle "
                "for this run only if you trust its author") from None
        raise MalformedFileError(f"{path} is a corrupt torch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # whatever a damaged archive makes torch raise (found by fuzzing): still one line
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
    if isinstance(obj, nn.Module):  # only reachable with --trust-pickle: a whole pickled model
        return strip_prefixes(obj.state_dict()), None
    if _is_state_dict(obj):
        return strip_prefixes(obj), None
    if isinstance(obj, dict):
        for k in STATE_KEYS:
            if _is_state_dict(obj.get(k)):
                return strip_prefixes(obj[k]), k
            if isinstance(obj.get(k), nn.Module):
                return strip_prefixes(obj[k].state_dict()), k
        raise UnsupportedLayoutError(
            f"no state dict found: top-level keys are {list(obj)[:8]}; pass --key to say which holds the weights")
    raise UnsupportedLayoutError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")


def read_checkpoint(path: str | Path, trust_pickle: bool = False, key: str | None = None) -> Checkpoint:
    """Open ``path`` safely; raises a ``CollapseProbeError`` subclass with a one-line message on any problem."""
    path = Path(path)
    if not path.exists():
        raise BadArgumentError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_folder(path, trust_pickle, key)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        sd, meta = _read_safetensors(path)
        if key is not None:
            raise BadArgumentError("--key applies to torch checkpoints; a safetensors file holds one state dict")
        return Checkpoint(path, fmt, strip_prefixes(sd), meta)
    obj = _read_torch(path, fmt, trust_pickle)
    sd, used = extract_state_dict(obj, key)
    meta = obj.get(META_KEY, {}) if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict) else {}
    arch = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None
    return Checkpoint(path, fmt, sd, meta, used, arch=arch)


FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedFileError(f"{path} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise MalformedFileError(f"{path} holds a {type(obj).__name__}, not a JSON object")
    return obj


def _read_folder(path: Path, trust_pickle: bool, key: str | None) -> Checkpoint:
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
    inner = read_checkpoint(weights, trust_pickle=trust_pickle, key=key)
    pre = path / "preprocessor_config.json"
    return Checkpoint(path, fmt, inner.state_dict, inner.metadata, inner.key, config=cfg,
                      preprocessor=_read_json(pre) if pre.is_file() else {})


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
    # numel > 0: a zero-size [10**9, 0] head costs nothing to store but would make timm allocate a huge classifier
    return int(w.shape[0]) if w is not None and w.ndim == 2 and w.numel() > 0 else 0


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without any download, with a clear error for unknown names."""
    import collapse_probe.models  # noqa: F401  (registers our presets)

    if not timm.is_model(name):
        raise BadArgumentError(f"unknown model '{name}'; see timm.list_models('vit*') or our presets (deepvit_32b ...)")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UnsupportedLayoutError(f"cannot build {name} with {kwargs}: {_first_line(e)}") from None


def build_model(
    ckpt: Checkpoint,
    model_name: str | None = None,
    num_heads: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    allow_nonfinite: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Instantiate the checkpoint's architecture and load its weights (strict, with a readable mismatch error).

    Architecture, first that applies: ``model_name`` (any timm name); our config in the file; a timm folder's
    config.json; a HuggingFace folder's config.json; a timm training checkpoint's ``arch``; else inferred from the
    weight shapes (``collapse_probe.infer``; ``num_heads`` feeds the heads rule there). ``mean`` / ``std`` override the
    input normalisation. NaN/Inf weights raise ``MalformedFileError`` unless ``allow_nonfinite``. Returns the model in
    eval mode and a description (incl. ``heads_source``, ``data_source``).
    """
    sd, heads_source, data, loaded, inferred_args = ckpt.state_dict, None, {}, False, None
    num_classes = _num_classes(sd)
    if model_name is not None:
        model = create_model(model_name, num_classes=num_classes)
        arch, source = model_name, "--model"
    elif ckpt.metadata.get("architecture"):
        check_model_args(ckpt.metadata, ckpt.state_dict, ckpt.path)  # no factory options, no absurd sizes
        arch, source = ckpt.metadata["architecture"], "checkpoint metadata"
        with torch.device("meta"):  # shapes first, no memory: a config asking for a huge model fails here for free
            _compare(create_model(arch, **ckpt.metadata.get("model_args", {})), ckpt.state_dict, arch)
        model = create_model(arch, **ckpt.metadata.get("model_args", {}))
        data = ckpt.metadata.get("pretrained_cfg", {})
    elif ckpt.format == "timm-folder":
        arch, source = ckpt.config["architecture"], "timm config.json"
        args = {"num_classes": ckpt.config.get("num_classes", num_classes), **ckpt.config.get("model_args", {})}
        check_model_args({"architecture": arch, "model_args": args}, sd, ckpt.path)
        model = create_model(arch, **args)
        data = ckpt.config.get("pretrained_cfg", {})
    elif ckpt.format == "hf-folder":
        model, arch = _build_transformers(ckpt)
        source, data, loaded = "HuggingFace config.json", _hf_data_config(ckpt), True
    elif ckpt.arch:
        arch, source = ckpt.arch, "timm checkpoint 'arch' entry"
        model = create_model(arch, num_classes=num_classes)
    else:
        from .infer import infer_architecture, instantiate

        spec = infer_architecture(sd, num_heads)
        model, arch, source, heads_source = instantiate(spec), spec.architecture, "inferred from weight shapes", \
            spec.heads_source
        inferred_args = {"built_from": spec.name, **spec.kwargs}
        data = {"input_size": spec.input_size} if spec.family != "timm" else {}
    if not allow_nonfinite:
        check_finite(sd, ckpt.path)
    if not loaded:
        _compare(model, sd, arch)
        model.load_state_dict(sd, strict=False)
    model.eval()
    info = {"architecture": arch, "architecture_source": source, "checkpoint": str(ckpt.path),
            "format": ckpt.format, "key": ckpt.key, **describe(model)}
    if num_heads is not None and info.get("num_heads") not in (None, num_heads):
        raise BadArgumentError(f"--num-heads {num_heads} contradicts the model built from {source} "
                               f"({info['num_heads']} heads)")
    info["heads_source"] = heads_source or f"model definition ({source})"
    info.update(_set_data_config(model, data, mean, std))
    if inferred_args is not None:
        info["model_args"] = inferred_args
        if info["data_source"] != "--mean/--std":
            info["data_source"] += (f" of {inferred_args['built_from']} (a guess for an inferred model; set "
                                    "--mean/--std if trained otherwise)")
    return model, info


def _build_transformers(ckpt: Checkpoint) -> tuple[nn.Module, str]:
    """A transformers model from a local folder's config.json and the weights we read safely: no network, no remote
    code. transformers itself maps older key names (``attention.attention.query`` ...) onto the current modules.
    """
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True,
                                                         trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedLayoutError(f"cannot read {ckpt.path}/config.json with transformers: {_first_line(e)}") \
            from None
    names = [n for n in (config.architectures or []) if isinstance(n, str)]
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        cls = transformers.AutoModel._model_mapping.get(type(config), None) if hasattr(
            transformers.AutoModel, "_model_mapping") else None
        if cls is None:
            raise UnsupportedLayoutError(f"{ckpt.path}/config.json names no transformers model class we can build "
                                         f"(architectures: {names or 'none'})")
    what = f"transformers:{cls.__name__}"
    try:
        model, loading = cls.from_pretrained(None, config=config, state_dict=ckpt.state_dict,
                                             output_loading_info=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UnsupportedLayoutError(f"checkpoint does not fit {what}: {_first_line(e)}") from None
    problems = [f"{len(v)} {k.replace('_', ' ')} (e.g. {', '.join(sorted(map(str, v))[:3])})"
                for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    if problems:
        raise UnsupportedLayoutError(f"checkpoint does not fit {what}: " + "; ".join(problems))
    return model, what


def _hf_data_config(ckpt: Checkpoint) -> dict[str, Any]:
    pre, cfg = ckpt.preprocessor, ckpt.config
    out: dict[str, Any] = {}
    if pre.get("image_mean") and pre.get("image_std"):
        out.update(mean=tuple(pre["image_mean"]), std=tuple(pre["image_std"]))
    size = cfg.get("image_size")
    if isinstance(size, int):
        out["input_size"] = (int(cfg.get("num_channels", 3)), size, size)
    return out


def _model_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) the model was built for, where it says so (timm's pretrained_cfg keeps the name's default)."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None:
        proj = getattr(pe, "proj", None)
        chans = int(proj.weight.shape[1]) if isinstance(getattr(proj, "weight", None), torch.Tensor) else 3
        return (chans, int(img[0]), int(img[1]))
    if isinstance(getattr(model, "image_size", None), int):  # torchvision
        return (3, model.image_size, model.image_size)
    return None


def _set_data_config(model: nn.Module, data: dict[str, Any], mean, std) -> dict[str, Any]:
    """Attach the preprocessing to ``model.pretrained_cfg`` (read by timm's resolve_model_data_config)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    had_norm = "mean" in cfg and "std" in cfg
    source = "timm pretrained config" if had_norm else "ImageNet default"
    cfg.setdefault("mean", IMAGENET_DEFAULT_MEAN)
    cfg.setdefault("std", IMAGENET_DEFAULT_STD)
    if data.get("mean") is not None and data.get("std") is not None:
        source = "checkpoint metadata"
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if v is not None})
    size = _model_input_size(model)
    if size is not None:
        cfg["input_size"] = size
    if mean is not None or std is not None:
        if mean is None or std is None or len(mean) != len(std):
            raise BadArgumentError("give --mean and --std together, with the same number of values")
        cfg.update(mean=tuple(mean), std=tuple(std))
        source = "--mean/--std"
    cfg.setdefault("input_size", (3, 224, 224))
    model.pretrained_cfg = cfg
    return {"data_source": source, "input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]),
            "std": list(cfg["std"])}


def describe(model: nn.Module) -> dict[str, Any]:
    """Depth, heads, width, tokens and parameter count of a ViT-like model (best effort)."""
    from .capture import attention_plans

    attns = attention_plans(model)
    info: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "depth": len(attns)}
    if attns:
        info["num_heads"] = attns[0][2].num_heads
        info["family"] = attns[0][2].family
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


def save_checkpoint(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights as safetensors with our config (and ``extra``, e.g. accuracy) in the metadata."""
    from safetensors.torch import save_file

    meta = {**model_metadata(model), **(extra or {})}
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_file(path, lambda tmp: save_file(sd, tmp, metadata={META_KEY: json.dumps(meta)}))
