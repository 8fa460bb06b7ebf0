"""Fit the weights before anything is allocated: shapes compared on the meta device, sizes capped by the file's bytes.

    model = within_weights(lambda: timm.create_model(name), state_dict, name)   # one-line error on any mismatch

``within_weights`` builds the model's meta-device twin first: an attention kind we refuse (Swin, XCiT) is named there,
before any shape comparison; then every shape must match (``compare``: missing, unexpected and mismatched keys, a few
of each) and the model may not need more parameters than the file's tensors really hold, so a few bytes of config
cannot make us allocate gigabytes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import MalformedFileError, RefusedContentError, UnsupportedLayoutError
from ..hooks.capture import attention_plans
from .bounds import check_map_size


def compare(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """``sd`` fits ``model`` key for key and shape for shape, else one line naming a few of each problem."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:  # with their shapes: a missing block and a different width read differently
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(_shaped(k, expected) for k in missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(_shaped(k, sd) for k in unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise UnsupportedLayoutError(f"checkpoint does not fit {what}: " + "; ".join(problems))


def _shaped(key: str, tensors: dict[str, torch.Tensor]) -> str:
    t = tensors.get(key)
    return f"{key} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else key


def check_dtypes(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Floating-point weights must come as floating-point tensors: integer, boolean or complex values would be cast
    silently (a uint64 file of float bits becomes 1e9-sized weights and NaN maps), so they are the file's problem."""
    bad = [f"{k} ({str(sd[k].dtype).removeprefix('torch.')})" for k, v in model.state_dict().items()
           if k in sd and v.is_floating_point() and not sd[k].is_floating_point()]
    if bad:
        raise MalformedFileError(f"the checkpoint stores {len(bad)} floating-point weights as other types (e.g. "
                                 f"{', '.join(bad[:3])}); it is corrupt or not a model's weights: re-save it in "
                                 "float32, float16 or bfloat16")


def real_elements(sd: dict[str, torch.Tensor]) -> int:
    """How many values the file's tensors really hold: each storage counted once, by its bytes."""
    storages: dict[tuple[int, int], float] = {}
    for t in sd.values():
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        storages[key] = max(storages.get(key, 0.0), st.nbytes() / max(t.element_size(), 1))
    return int(sum(storages.values()))


def within_weights(make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], what: str, strict: bool = True
                   ) -> nn.Module:
    """``make()`` for real only after its meta-device twin fits ``sd``: every shape (``strict``) and no more
    parameters than the file's tensors really hold, so a few bytes of config cannot make us allocate gigabytes."""
    with torch.device("meta"):  # shapes only, no memory
        meta = make()
    attention_plans(meta)  # a refused attention kind says why before any shape talk (exit 5)
    if strict:
        compare(meta, sd, what)
    check_dtypes(meta, sd)
    need, have = sum(p.numel() for p in meta.parameters()), real_elements(sd)
    if need > have * 1.01 + 100_000:  # slack: a few buffers or tied copies a file may legitimately omit
        raise RefusedContentError(f"refused: {what} needs {need:,} parameters but the file's tensors hold only "
                                  f"{have:,} values; pass --model NAME matching the weights")
    check_map_size(meta, have, what)  # tokens from the file (img_size, patch, pos_embed) bound the maps per image
    del meta
    return make()
