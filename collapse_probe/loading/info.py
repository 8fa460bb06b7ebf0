"""What a probe ran on, typed: the model (``ModelInfo``) and the images (``ImageInfo``), and a loaded model bundle.

    loaded = load_model("model.safetensors")       # LoadedModel(model, info, checkpoint)
    loaded.info.num_heads, loaded.info.heads_source  # 4, 'model definition (checkpoint metadata)'

Both records travel inside ``ProbeResult`` and round-trip through its JSON (unknown keys from other versions are
ignored, missing ones take the defaults below).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from torch import nn


class _Record:
    """JSON round trip of a record dataclass: unknown keys (other versions) ignored, missing ones take defaults."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


@dataclass
class ModelInfo(_Record):
    """The model a probe measured: where it came from, how its architecture and heads were decided, its input."""

    checkpoint: str | None = None  # the file or folder; None for a model passed in directly
    format: str | None = None  # safetensors, torch-zip, torch-legacy, hf-folder, timm-folder, or None (in memory)
    key: str | None = None  # entry of a training checkpoint that held the weights
    architecture: str | None = None  # timm name, transformers:Class, torchvision:..., vit-pytorch:...
    architecture_source: str | None = None  # --model, checkpoint metadata, inferred from weight shapes, ...
    family: str | None = None  # capture adapter family (ours, timm, hf, mha, vit-pytorch)
    depth: int = 0  # attention blocks found
    num_heads: int | None = None
    heads_source: str | None = None  # who decided the head count (see the heads rule in the README)
    embed_dim: int | None = None
    num_prefix_tokens: int | None = None
    tokens: int | None = None  # patches + prefix tokens at the model's input size
    params: int = 0
    reattn_blocks: list[int] | None = None  # 0-based blocks with Re-attention (our models)
    input_size: list[int] | None = None  # [C, H, W]
    mean: list[float] | None = None
    std: list[float] | None = None
    data_source: str | None = None  # where mean / std / size came from
    model_args: dict[str, Any] | None = None  # arguments an inferred model was built with
    layout: str | None = None  # a foreign key layout that was renamed to ours (official DeepViT)
    notes: list[str] = field(default_factory=list)  # what the loader decided that the weights could not show
    # what was changed or left out so the maps could be measured: the file's grid instead of the name's default, an
    # assumed image size, masking off, blocks not probed. Also appended to architecture_source, so the text header
    # and the audit model table show it
    adjustments: list[str] = field(default_factory=list)
    prefix: str | None = None  # only keys under this prefix were the model's (--prefix, or a Lightning file's model.)


@dataclass
class ImageInfo(_Record):
    """The images a probe ran on and how they were preprocessed."""

    source: str | None = None  # a folder, builtin:..., or "in-memory batches"
    count: int | None = None  # images requested (None: unknown, e.g. a loader passed in)
    input_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class LoadedModel:
    """A model built from a checkpoint, what we know about it, and the checkpoint it came from (weights, metadata)."""

    model: nn.Module
    info: ModelInfo
    checkpoint: Any = field(repr=False, default=None)  # loading.read.Checkpoint
    # the user's own factory (--model-code): ``factory(seed)`` builds the same model again, e.g. the untrained twin
    factory: Callable[..., nn.Module] | None = field(repr=False, default=None)
