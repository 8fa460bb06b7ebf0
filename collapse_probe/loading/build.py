"""Turn a checkpoint into a model: the architecture decided once (name, stored config, folder config, ``arch``, or
inferred from the weight shapes), shapes compared before loading, and a typed description of what was built.

    ckpt = read_checkpoint("model.safetensors")
    model, info = build_model(ckpt, model_name=None)     # info: ModelInfo (architecture, heads and who decided them)

``create_model`` is ``timm.create_model`` that never downloads and fails with one line for unknown names.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .. import models  # noqa: F401  (registers our presets with timm)
from ..errors import BadArgumentError, UnsupportedLayoutError, first_line, printable
from ..hooks.capture import attention_plans, probe_notes
from . import official
from .grid import fit_grid
from .hf import build_transformers, hf_data_config
from .infer import ArchSpec, infer_architecture
from .info import LoadedModel, ModelInfo
from .read import Checkpoint, num_classes, read_checkpoint, timm_folder_args
from .usercode import UserModel, check_runs, fit_wrapper, guess_input, parse_model_args, user_model
from .vitpytorch import build_vit_pytorch
from .weights import compare, real_elements, within_weights  # noqa: F401  (re-exported)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without any download, with a clear error for unknown names."""
    if not timm.is_model(name):
        raise BadArgumentError(f"unknown model '{name}'; see timm.list_models('vit*') or our presets (deepvit_32b ...)")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, AttributeError, NotImplementedError) as e:
        # arguments that came from a file (an unknown act_layer, a wrong type): the file's problem, one line
        raise UnsupportedLayoutError(f"cannot build {name} with {kwargs}: {first_line(e)}") from e


def instantiate(spec: ArchSpec) -> nn.Module:
    """A randomly initialised model for ``spec`` (timm via ``create_model``; never downloads)."""
    if spec.family == "timm":
        return create_model(spec.name, **spec.kwargs)
    if spec.family == "torchvision":
        from torchvision.models import VisionTransformer

        kw = dict(spec.kwargs)
        chans = kw.pop("in_channels", 3)
        model = VisionTransformer(**kw)
        if chans != 3:  # torchvision has no channel argument: its conv_proj always takes RGB
            p = kw["patch_size"]
            model.conv_proj = nn.Conv2d(chans, kw["hidden_dim"], kernel_size=p, stride=p)
        return model
    if spec.family == "vit-pytorch":
        return build_vit_pytorch(spec)
    raise ValueError(f"unknown family {spec.family!r}")


def load_model(
    path: str | Path,
    model_name: str | None = None,
    *,
    num_heads: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    key: str | None = None,
    trust_pickle: bool = False,
    allow_nonfinite: bool = False,
    prefix: str | None = None,
    model_code: str | Path | None = None,
    model_args: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """The one safe entry point from a file or folder to a model: ``read_checkpoint`` (every check) + ``build_model``.

    >>> loaded = load_model("checkpoints/vit_micro_d4.safetensors")
    >>> loaded.info.architecture, loaded.info.depth, loaded.info.num_heads
    ('vit_micro', 4, 4)

    ``trust_pickle`` allows full unpickling for this call (it can execute code: only for files you trust);
    ``prefix``: only the keys under it are the model's (``loading.prefixes``). ``model_code``: your own model's .py
    file or module name, imported (it runs: your choice) so that ``model_name`` names a class or function in it, called
    with ``model_args`` (a dict or JSON object; also passed to a timm name); the weights are still read with every check
    and loaded strictly (``loading.usercode``). ``path`` may be a Hugging Face Hub id (``loading.hub``).
    """
    user = user_model(model_code, model_name, model_args) if model_code is not None else None
    args = user.args if user is not None else parse_model_args(model_args)
    if args and model_name is None:
        raise BadArgumentError("--model-args needs --model NAME (a timm name, or a class or function in --model-code)")
    ckpt = read_checkpoint(path, trust_pickle=trust_pickle, key=key, allow_nonfinite=allow_nonfinite, prefix=prefix)
    model, info = build_model(ckpt, model_name, num_heads=num_heads, mean=mean, std=std, user=user, model_args=args)
    return LoadedModel(model, info, ckpt, factory=user.build if user is not None else None)


def build_model(
    ckpt: Checkpoint,
    model_name: str | None = None,
    num_heads: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    user: UserModel | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Instantiate the checkpoint's architecture and load its weights (strict, with a readable mismatch error).

    Architecture, first that applies: ``user`` (the user's own code, ``loading.usercode``); ``model_name`` (any timm
    name, built with ``model_args``, or an official DeepViT name); our config in the
    file; a timm folder's config.json; a HuggingFace folder's config.json; a timm training checkpoint's ``arch`` (or
    ``args.model``); else inferred from the weight shapes (``loading.infer``; ``num_heads`` feeds the heads rule
    there). Official DeepViT files (``loading.official``) are renamed to our keys first; an official name takes the
    shapes from the weights and the scales the weights cannot show from the name. ``mean`` / ``std`` override the input
    normalisation. Every safety check already ran in ``read_checkpoint``. Returns the model in eval mode and a
    description (incl. ``heads_source``, ``data_source``, and ``adjustments``: what was changed or left out so the
    maps could be measured, e.g. a name built at the file's grid, ``loading.grid``).
    """
    sd = official.to_ours(ckpt.state_dict)  # an official DeepViT file loads into our modules under our names
    heads_source, data, loaded, spec = None, {}, False, None
    notes, adjustments = [ckpt.selection.note()] if ckpt.selection else [], []
    notes += ckpt.notes
    arch_entry = _arch_entry(ckpt)
    if user is not None:
        arch, source = user.shown, f"--model-code {user.code} (your code, run at your request)"
        heads_source = f"model definition (your code, {user.shown})"
        model = user.build()
        sd = fit_wrapper(model, sd)
        size, where = guess_input(model, user.args)
        data = {"input_size": size} if size is not None else {}
        notes.append(f"input size {list(size)} from {where}" if size is not None else
                     "input size not found in --model-args or the model: 3x224x224 assumed")
    elif model_name is not None and official.official_variant(model_name) is not None:
        spec, source = official.infer_deepvit(sd, num_heads, model_name), f"--model {model_name} (official DeepViT)"
    elif model_name is not None:
        arch, source = model_name, "--model"
        model = _named(model_name, sd, adjustments, model_args)
    elif ckpt.metadata.get("architecture"):
        arch, source = ckpt.metadata["architecture"], "checkpoint metadata"
        model = within_weights(lambda: create_model(arch, **ckpt.metadata.get("model_args", {})), sd, arch)
        data = ckpt.metadata.get("pretrained_cfg", {})
    elif ckpt.format == "timm-folder":
        arch, source = ckpt.config["architecture"], "timm config.json"
        model = within_weights(lambda: create_model(arch, **timm_folder_args(ckpt)), sd, arch)
        data = ckpt.config.get("pretrained_cfg", {})
    elif ckpt.format == "hf-folder":
        model, arch = build_transformers(ckpt)
        source, data, loaded = "HuggingFace config.json", hf_data_config(ckpt), True
    elif arch_entry is not None and official.official_variant(arch_entry[0]) is not None:
        spec, source = official.infer_deepvit(sd, num_heads, arch_entry[0]), f"{arch_entry[1]} (official DeepViT)"
    elif arch_entry is not None:
        arch, source = arch_entry[0], arch_entry[1]
        model = _named(arch, sd, adjustments)
    else:
        if ckpt.arch:
            notes.append(f"the file's arch entry {ckpt.arch[:60]!r} names no model we know: inferred from shapes")
        spec, source = infer_architecture(sd, num_heads), "inferred from weight shapes"
    if spec is not None:
        arch, heads_source, notes = spec.architecture, spec.heads_source, notes + spec.notes
        adjustments += spec.adjustments
        model = within_weights(lambda: instantiate(spec), sd, arch)
        if source == "inferred from weight shapes":
            data = {"input_size": spec.input_size} if spec.family != "timm" else {}
    if not loaded:
        compare(model, sd, arch)
        model.load_state_dict(sd, strict=False)
    model.eval()
    described = describe(model)
    adjustments += described.adjustments
    info = dataclasses.replace(described, architecture=arch, architecture_source="; ".join([source, *adjustments]),
                               checkpoint=ckpt.hub_id or printable(ckpt.path), format=ckpt.format, key=ckpt.key,
                               notes=notes,
                               layout=official.LAYOUT if official.is_official(ckpt.state_dict) else None,
                               adjustments=adjustments, prefix=ckpt.selection.prefix if ckpt.selection else None)
    if num_heads is not None and info.num_heads not in (None, num_heads):
        raise BadArgumentError(f"--num-heads {num_heads} contradicts the model built from {source} "
                               f"({info.num_heads} heads)")
    info.heads_source = heads_source or f"model definition ({source})"
    info.input_size, info.mean, info.std, info.data_source = _set_data_config(model, data, mean, std)
    if user is not None:
        info.model_args = dict(user.args)
        check_runs(model, info.input_size, user.shown, user.origin)
    elif model_args:
        info.model_args = dict(model_args)
    if spec is not None:
        info.model_args = {"built_from": spec.name, **spec.kwargs}
        if info.data_source != "--mean/--std" and source == "inferred from weight shapes":
            info.data_source += (f" of {spec.name} (a guess for an inferred model; set --mean/--std if trained "
                                 "otherwise)")
    return model, info


def _named(name: str, sd: dict[str, torch.Tensor], adjustments: list[str],
           model_args: dict[str, Any] | None = None) -> nn.Module:
    """The timm model ``name`` for a file without a stored config (``--model``, a training file's ``arch``), built at
    the file's patch grid when the name's default differs (``loading.grid``; the note joins ``adjustments``);
    ``model_args`` (--model-args) win over both."""
    base = {"num_classes": num_classes(sd), **(model_args or {})}
    extra, note = fit_grid(name, sd, lambda **kw: create_model(name, **{**base, **kw}))
    extra = {k: v for k, v in extra.items() if k not in (model_args or {})}
    if note and extra:
        adjustments.append(note)
    return within_weights(lambda: create_model(name, **base, **extra), sd, name)


def _arch_entry(ckpt: Checkpoint) -> tuple[str, str] | None:
    """(name, where it was found) from a timm training file: ``arch`` if it is a model name, else ``args.model``.

    timm's train.py writes ``arch`` as the model's class name lowered (``visiontransformer``) in some versions and
    the registered name in others; ``args.model`` is always the name passed on its command line.
    """
    for name, where in ((ckpt.arch, "timm checkpoint 'arch' entry"), (ckpt.args_model, "timm checkpoint args.model")):
        if isinstance(name, str) and (official.official_variant(name) is not None or timm.is_model(name)):
            return name, where
    return None


def _model_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) the model was built for, where it says so (timm's pretrained_cfg keeps the name's default)."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None:
        proj = getattr(pe, "proj", None)
        chans = int(proj.weight.shape[1]) if isinstance(getattr(proj, "weight", None), torch.Tensor) else 3
        return (chans, int(img[0]), int(img[1]))
    conv = getattr(model, "conv_proj", None)
    if isinstance(getattr(model, "image_size", None), int) and isinstance(conv, nn.Conv2d):  # torchvision
        return (conv.in_channels, model.image_size, model.image_size)
    return None


def _set_data_config(model: nn.Module, data: dict[str, Any], mean, std) -> tuple[list, list, list, str]:
    """Attach the preprocessing to ``model.pretrained_cfg`` (read by timm's resolve_model_data_config); returns
    (input_size, mean, std, where they came from)."""
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
        channels = int((size or cfg.get("input_size", (3,)))[0])
        if len(mean) != channels:
            raise BadArgumentError(f"--mean/--std give {len(mean)} values but the model takes {channels} channels")
        if not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
            raise BadArgumentError(f"--mean must be finite and --std finite and positive, got {list(mean)} / "
                                   f"{list(std)}")
        cfg.update(mean=tuple(mean), std=tuple(std))
        source = "--mean/--std"
    cfg.setdefault("input_size", (3, 224, 224))
    channels = int(cfg["input_size"][0])
    if len(cfg["mean"]) != channels and len(cfg["mean"]) == len(cfg["std"]):  # e.g. ImageNet's 3 for a grey model
        n = len(cfg["mean"])
        cfg.update(mean=(sum(cfg["mean"]) / n,) * channels, std=(sum(cfg["std"]) / n,) * channels)
        source += (f" averaged over its {n} channels for this {channels}-channel model (a guess; set --mean/--std, "
                   "e.g. 0.1307 / 0.3081 for MNIST)")
    model.pretrained_cfg = cfg
    return list(cfg["input_size"]), list(cfg["mean"]), list(cfg["std"]), source


def describe(model: nn.Module, example: torch.Tensor | None = None) -> ModelInfo:
    """Depth, heads, family, width, tokens and parameter count of a ViT-like model (best effort), and what probing it
    changes or leaves out (``adjustments``: blocks not probed, masking off; also in ``architecture_source``).

    A model no adapter knows is described from a dry run (``hooks.universal``) on ``example[:1]``, else on a guessed
    input; depth 0 when none ran."""
    plans = attention_plans(model, example)
    adjustments = probe_notes(model)
    pe = getattr(model, "patch_embed", None)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    return ModelInfo(
        params=sum(p.numel() for p in model.parameters()), depth=len(plans),
        num_heads=plans[0][2].num_heads if plans else None, family=plans[0][2].family if plans else None,
        embed_dim=int(model.embed_dim) if hasattr(model, "embed_dim") else None,
        num_prefix_tokens=prefix if hasattr(model, "num_prefix_tokens") else None,
        tokens=int(pe.num_patches) + prefix if pe is not None and getattr(pe, "num_patches", None) else None,
        reattn_blocks=list(model.reattn_block_indices) if getattr(model, "reattn_block_indices", None) is not None
        else None, adjustments=adjustments,
        architecture_source="; ".join(["model passed in", *adjustments]) if adjustments else None)
