"""Names for the checkpoints of one ``compare`` or ``figures`` run: unique, readable, printable and short.

    unique_labels(["r1/ckpt/m.safetensors", "r2/ckpt/m.safetensors"])              # ['r1/ckpt/m.safetensors', ...]
    unique_labels(["r1/ckpt/m.safetensors", "r2/ckpt/m.safetensors"], "_", stem=True)   # ['r1_ckpt_m', 'r2_ckpt_m']

A label is the file name (or its stem), with as many parent folders as it takes to tell it from every other label;
results are keyed by label, so two checkpoints named alike (``run1/ckpt/model.safetensors``,
``run2/ckpt/model.safetensors``) must not share one, or one result would silently replace the other. The same file
given twice gets ``#2``. Labels are printable (bytes that are not UTF-8 become U+FFFD) and, for file names, at most
``limit`` characters (a longer one keeps its end and a hash of the whole).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import printable


def _shorten(label: str, limit: int) -> str:
    if len(label) <= limit:
        return label
    digest = hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{digest}~{label[-(limit - 9):]}"


def unique_labels(paths: Sequence[str | Path], sep: str = "/", stem: bool = False, limit: int = 120) -> list[str]:
    """One distinct label per path (see the module docstring); ``sep`` joins folders, ``stem`` drops the extension."""
    parts = [[printable(p) for p in Path(os.path.abspath(path)).parts[1:]] or ["/"] for path in paths]
    for ps in parts:
        ps[-1] = Path(ps[-1]).stem if stem and Path(ps[-1]).stem else ps[-1]
    depth = [1] * len(parts)
    while True:
        labels = [sep.join(ps[-k:]) for ps, k in zip(parts, depth)]
        paths_of: dict[str, set[tuple[str, ...]]] = {}
        for ps, lab in zip(parts, labels):
            paths_of.setdefault(lab, set()).add(tuple(ps))
        # a label shared by different paths grows by a folder; one path given twice is numbered below instead
        grow = [i for i, lab in enumerate(labels) if len(paths_of[lab]) > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    out: list[str] = []
    for lab in labels:
        lab, n = _shorten(lab, limit), 1
        while (candidate := lab if n == 1 else f"{lab}#{n}") in out:
            n += 1
        out.append(candidate)
    return out
