"""Sizes a file may ask for, bounded before anything is built: a HuggingFace config's depth and widths, and the
attention maps per image of the model a file describes.

    check_hf_config(ckpt.config, ckpt.state_dict, ckpt.path)   # before transformers builds even a meta-device model
    check_map_size(meta_model, real_elements(sd), "vit_micro")    # the meta-device twin, before the real model

Why both: a 256-byte config.json that says ``num_hidden_layers: 100000`` makes transformers spend minutes and
gigabytes building 100 000 meta-device layers, so its numbers are compared with the weights first (depth with the
layers stored, every other size with the largest stored dimension, as ``safety.check_model_args`` does for our own
metadata and timm folders). And a model whose every size matches its weights can still be a bomb at run time: a
1 MB file of a tiny ViT at 512 px with 8 px patches has 4097 tokens, so each image's attention maps take 0.5 GB per
copy. ``check_map_size`` refuses maps per image far beyond what the file's parameters justify (real ViTs stay two
orders of magnitude below the limit; ``COLLAPSE_PROBE_MAX_MAP_MB`` raises the floor for a file you trust).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RefusedContentError, UnsupportedLayoutError
from ..hooks.capture import attention_plans

MAX_DEPTH = 1024  # layers a config may ask for (the same limit as ``safety.MAX_DEPTH``)
MAP_FLOOR_MB = 256  # float32 attention maps per image always allowed (ViT-B/8 at 224 px needs 340 MB: the ratio)
MAPS_PER_PARAMETER = 64  # beyond the floor: map values per image per stored weight (ViT-B/16 at 384 px: 0.7)
UNSTORED_HEAD = 8192  # sizes a config may give a head (decoder, MIM vocabulary) whose weights the file may not hold
_DEPTH_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "num_blocks", "encoder_layers")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|blocks|block|h|resblocks)\.(\d+)\.")
_NOT_SIZES = ("id2label", "label2id")  # names, not sizes (the classifier's size is checked against its weights)
_POSITIONS = ("pos_embed", "position_embeddings", "pos_embedding", "position_embedding.weight")


def stored_layers(sd: dict[str, Any]) -> int:
    """The most layers any stack of the state dict holds (``encoder.layer.11.`` -> 12), 0 when none is recognised."""
    found = [int(m.group(1)) for k in sd for m in _LAYER_INDEX.finditer(k)]
    return max(found) + 1 if found else 0


def _largest_dimension(sd: dict[str, Any]) -> int:
    # zero-size tensors cost nothing to forge, so they size nothing
    return max((max(t.shape) for t in sd.values() if t.ndim > 0 and t.numel() > 0), default=1)


def _sizes(cfg: dict[str, Any], where: str = "") -> list[tuple[str, float]]:
    """(dotted key, number) for every size-like number in a config: integers, and floats named like ratios."""
    out: list[tuple[str, float]] = []
    for key, value in cfg.items():
        name = f"{where}{key}"
        if key in _NOT_SIZES or key.endswith("_token_id") or isinstance(value, bool):
            continue
        if isinstance(value, dict):
            out += _sizes(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            out += [(name, v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
        elif isinstance(value, int) or (isinstance(value, float) and "ratio" in key):
            out.append((name, value))
    return out


def check_hf_config(cfg: dict[str, Any], sd: dict[str, Any], path: Path | str) -> None:
    """Refuse a HuggingFace config.json asking for more layers than its weights hold (exit 5), or for sizes far
    beyond its largest stored dimension (exit 3), before any model, even a meta-device one, is built."""
    layers = stored_layers(sd)
    dicts = [cfg, *(v for v in cfg.values() if isinstance(v, dict))]  # vision_config, text_config, ...
    for d in dicts:
        for key in _DEPTH_KEYS:
            depth = d.get(key)
            if not isinstance(depth, int) or isinstance(depth, bool):
                continue
            if depth > MAX_DEPTH or (layers and depth > layers):
                held = f"the weights hold {layers}" if layers else f"the limit is {MAX_DEPTH}"
                raise UnsupportedLayoutError(f"{path}/config.json asks for {key}={depth} layers but {held}; the "
                                             "config does not describe these weights")
    bound = 16 * _largest_dimension(sd)
    # an encoder-only file keeps its config's sizes of heads it does not hold (ViTMAEModel's decoder_*, defaults 512 /
    # 2048; BEiT's masked-image-modelling vocab_size, 8192): they get a fixed bound instead; a file that stores a
    # decoder has them checked like the rest
    has_decoder = any("decoder" in k for k in sd)
    for key, x in _sizes(cfg):
        unstored = (key.startswith("decoder_") and not has_decoder) or key.rsplit(".", 1)[-1] == "vocab_size"
        limit = max(bound, UNSTORED_HEAD) if unstored else bound
        if not math.isfinite(x) or abs(x) > limit:
            raise RefusedContentError(f"refused {path}: config.json has {key}={str(x)[:20]}, far larger than its "
                                      f"weights could fit (limit {limit}: 16 x the largest stored dimension)")


def tokens_of(model: nn.Module) -> int | None:
    """Tokens per image a model is built for: its patch count plus prefix tokens, or its position embedding's
    length (timm, torchvision, transformers, vit-pytorch); None when it shows neither."""
    found = []
    pe = getattr(model, "patch_embed", None)
    if isinstance(getattr(pe, "num_patches", None), int):
        found.append(pe.num_patches + int(getattr(model, "num_prefix_tokens", 0) or 0))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(_POSITIONS) and t.ndim in (2, 3):
            found.append(int(t.shape[-2]))
    return max(found) if found else None


def max_map_values(params: int) -> int:
    """Float32 attention-map values per image allowed for a file holding ``params`` weights."""
    floor = MAP_FLOOR_MB
    env = os.environ.get("COLLAPSE_PROBE_MAX_MAP_MB")
    if env and env.strip().isdigit():
        floor = max(int(env), MAP_FLOOR_MB)
    return max(floor * 2**20 // 4, MAPS_PER_PARAMETER * params)


def check_map_size(meta: nn.Module, params: int, what: str) -> None:
    """Refuse (exit 3) a model whose attention maps per image (tokens^2 x heads, summed over blocks) are far beyond
    what ``params`` stored weights justify; ``meta`` is the model built on the meta device (nothing allocated)."""
    tokens = tokens_of(meta)
    if tokens is None:
        return
    plans = attention_plans(meta)
    values = sum(max(int(p.num_heads or 1), 1) for _, _, p in plans) * tokens * tokens
    if values > max_map_values(params):
        raise RefusedContentError(
            f"refused: {what} runs on {tokens} tokens, so the attention maps of one image hold {values:,} values "
            f"({values * 4 / 2**30:.1f} GiB), far beyond what its {params:,} stored weights justify; if the file is "
            "genuine, raise COLLAPSE_PROBE_MAX_MAP_MB")
