"""Record per-head attention maps (and block outputs) from a ViT with hooks that are always removed.

    >>> with capture(model) as cap:                       # store the maps of the last forward
    ...     model(images)
    >>> cap.maps["blocks.3.attn.probs"].shape            # [B, H, N, N], rows sum to 1
    >>> with capture(model, kinds=("probs", "out"), callback=fn):   # stream: fn(site, tensor) per block, nothing kept
    ...     model(images)

Site names follow the module path of the attention module plus a kind, TransformerLens style:
    ``<attn path>.probs``  post-softmax map [B, H, N, N]
    ``<attn path>.mixed``  Re-attention map after Theta, Norm and scale [B, H, N, N] (our DeepViT blocks only)
    ``<block path>.out``   block output tokens [B, N, C]

Supported: our models (``collapse_probe.models``) and any model built from timm's ``Attention`` (vit_*, deit_*, ...).
timm's fused scaled-dot-product path never builds the map, so while capturing we switch ``fused_attn`` off on each
attention instance and restore it afterwards. The unfused path computes the same function (outputs agree to float
rounding, see tests/test_capture.py). Capture neither changes ``model.training`` nor requires grad to be off.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from timm.layers import Attention as TimmAttention
from torch import nn

from .errors import UnsupportedModelError
from .models.attention import Attention as OurAttention

KINDS = ("probs", "mixed", "out")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Site:
    """One recorded tensor per forward: ``name`` (e.g. ``blocks.3.attn.probs``), ``kind`` and 0-based ``block``."""

    name: str
    kind: str
    block: int


Callback = Callable[[Site, torch.Tensor], None]


@dataclass
class Capture:
    """What a ``capture`` context found and (unless streaming to a callback) recorded during the last forward."""

    sites: list[Site]
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.maps[name]

    def kind(self, kind: str) -> list[torch.Tensor]:
        """The recorded tensors of one kind, in block order."""
        return [self.maps[s.name] for s in self.sites if s.kind == kind and s.name in self.maps]

    def stack(self, kind: str = "probs") -> torch.Tensor:
        """[L, B, H, N, N] for maps (or [L, B, N, C] for ``out``); all blocks of the kind must share a shape."""
        return torch.stack(self.kind(kind))


def _clean(path: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if path.startswith(p):
                path, changed = path[len(p):], True
    return path.replace("._orig_mod.", ".").replace(".module.", ".") if path else path


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


@dataclass
class _Hook:
    site: Site
    module: nn.Module
    use_input: bool  # True: record the hooked module's first input (timm attn_drop), else its output


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(cleaned path, module) of every supported attention module, in registration (= execution) order."""
    found = [(_clean(p), m) for p, m in model.named_modules() if isinstance(m, (OurAttention, TimmAttention))]
    return found


def find_sites(model: nn.Module, kinds: Sequence[str] = ("probs",)) -> tuple[list[_Hook], list[nn.Module]]:
    """Plan the hooks for ``kinds``; returns the hooks and the timm attention modules that must be unfused."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown capture kind(s) {bad}; choose from {KINDS}")
    attns = attention_modules(model)
    if not attns:
        raise UnsupportedModelError(
            f"no attention module found in {type(model).__name__}: looked for collapse_probe Attention and "
            "timm.layers.Attention (timm vit_*/deit_*); is this a Vision Transformer?"
        )
    modules = dict(model.named_modules())
    clean_to_raw = {_clean(p): p for p in modules}
    hooks: list[_Hook] = []
    unfuse: list[nn.Module] = []
    for block, (path, attn) in enumerate(attns):
        if "probs" in kinds:
            site = Site(f"{path}.probs", "probs", block)
            if isinstance(attn, OurAttention):
                hooks.append(_Hook(site, attn.probs, use_input=False))
            else:
                hooks.append(_Hook(site, attn.attn_drop, use_input=True))
                unfuse.append(attn)
        if "mixed" in kinds and isinstance(attn, OurAttention) and attn.reattention:
            hooks.append(_Hook(Site(f"{path}.mixed", "mixed", block), attn.mixed, use_input=False))
        if "out" in kinds:
            parent = _parent(path)
            hooks.append(_Hook(Site(f"{parent}.out" if parent else "out", "out", block),
                               modules[clean_to_raw[parent]], use_input=False))
    return hooks, unfuse


@contextlib.contextmanager
def capture(
    model: nn.Module,
    kinds: Sequence[str] = ("probs",),
    callback: Callback | None = None,
    store: bool | None = None,
) -> Iterator[Capture]:
    """Hook ``model`` for the duration of the ``with`` block.

    Args:
        model: one of our models or a timm ViT (a DDP / torch.compile wrapper is fine).
        kinds: any of "probs", "mixed", "out".
        callback: called as ``callback(site, tensor)`` inside each hook, block by block; the tensor is detached.
        store: keep the tensors of the last forward in ``Capture.maps`` (default: only when there is no callback).

    Hooks are removed and ``fused_attn`` flags restored on exit, also when the body raises.
    """
    hooks, unfuse = find_sites(model, kinds)
    store = callback is None if store is None else store
    result = Capture(sites=[h.site for h in hooks])
    handles = []
    saved = [(m, m.fused_attn) for m in unfuse]

    def make(h: _Hook):
        def hook(_module, inputs, output):
            t = (inputs[0] if h.use_input else output).detach()
            if store:
                result.maps[h.site.name] = t
            if callback is not None:
                callback(h.site, t)
        return hook

    try:
        for m, _ in saved:
            m.fused_attn = False
        for h in hooks:
            handles.append(h.module.register_forward_hook(make(h)))
        yield result
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in saved:
            m.fused_attn = flag
