"""How many images fit a memory budget: ``parse_bytes("2GiB")``, ``estimate_bytes_per_image`` and ``fit_batch``.

    max_batch = fit_batch(model, images, kinds=("probs",), max_memory="2GiB")

See benchmarks/README.md for how the estimate compares with measured RSS.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import BadArgumentError
from ..hooks.capture import capture
from ..metrics.streaming import (
    CrossLayerAccumulator,
)

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """"2GiB", "500MB", "1.5g", 10**9 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BadArgumentError(f"cannot read memory size {text!r}; write e.g. 2GiB, 500MB or 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def estimate_bytes_per_image(shapes: dict[str, tuple[int, ...]], storage_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one image adds to a probe batch, from the per-site shapes of a 1-image forward ({name: shape}).

    Held for the whole batch: every captured map's centred columns and unit rows (2 x H*N*N * storage bytes per block
    and kind) with two float32 numbers per column (H*N*8), and every block output's unit tokens (N*C * 4) and centred
    token Gram (N*N * 4). Transient, one block at a time: the unfused attention of the forward (logits, softmax, and
    for re-attention the mixed, normalised and scaled maps), our float32 centred columns, log and JSD temporaries and
    the previous block's map held for the JSD, counted as 11 float32 maps, and the MLP / residual activations, counted
    as 12 float32 N x C tensors.
    """
    storage = torch.empty(0, dtype=storage_dtype).element_size()
    maps = [s for s in shapes.values() if len(s) == 4]
    feats = [s for s in shapes.values() if len(s) == 3]
    held = sum(2 * h * n * n2 * storage + h * n2 * 8 for _, h, n, n2 in maps)
    held += sum(n * c * 4 + n * n * 4 for _, n, c in feats)
    big_map = max((h * n * n2 for _, h, n, n2 in maps), default=0)
    big_feat = max((n * c for _, n, c in feats), default=0)
    return held + 11 * big_map * 4 + 12 * big_feat * 4


def fit_batch(model: nn.Module, image: torch.Tensor, kinds: Sequence[str], max_memory: int | str,
              storage_dtype: torch.dtype = torch.float32) -> int:
    """Largest batch whose estimated probe memory (parameters + batch) fits ``max_memory`` (one 1-image forward)."""
    budget = parse_bytes(max_memory)
    shapes: dict[str, tuple[int, ...]] = {}
    with capture(model, kinds, callback=lambda site, t: shapes.__setitem__(site.name, tuple(t.shape)), store=False,
                 example=image):
        model(image[:1])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_image = estimate_bytes_per_image(shapes, storage_dtype)
    # end-of-batch Gram: float32 chunks of the stored maps, their Gram and comparison, at most 3 x chunk_bytes, and
    # never more than 3 x the batch's maps in float32 or their per-token (L*H)^2 Gram, whichever is larger
    chunk = CrossLayerAccumulator(1).chunk_bytes
    maps32 = sum(h * n * n2 * 4 for s in shapes.values() if len(s) == 4 for h, n, n2 in [s[1:]])
    kinds4 = {}
    for name, s in shapes.items():
        if len(s) == 4:
            kinds4.setdefault(name.rsplit(".", 1)[-1], []).append(s)
    gram32 = max((s[0][2] * (len(s) * s[0][1]) ** 2 * 4 for s in kinds4.values()), default=0)
    maps32 = max(maps32, gram32)
    batch = max((budget - params - 3 * chunk) // per_image, (budget - params) // (per_image + 3 * maps32))
    if batch < 1:
        need = params + min(3 * chunk, 3 * maps32) + per_image
        raise BadArgumentError(
            f"--max-memory {max_memory} is too small: the model needs ~{params / 2**20:.0f} MiB and each image "
            f"~{per_image / 2**20:.0f} MiB; allow at least {need / 2**20:.0f} MiB or use --storage float16")
    return int(batch)
