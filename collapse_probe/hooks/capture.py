"""Record per-head attention maps (and block outputs) from a ViT with hooks that are always removed.

    >>> import timm, torch, collapse_probe.models
    >>> model, images = timm.create_model("vit_micro", depth=4), torch.randn(2, 3, 32, 32)
    >>> with capture(model) as cap:                       # store the maps of the last forward
    ...     _ = model(images)
    >>> cap.maps["blocks.3.attn.probs"].shape            # [B, H, N, N], rows sum to 1
    torch.Size([2, 4, 65, 65])
    >>> seen = []
    >>> with capture(model, kinds=("probs", "out"), callback=lambda site, t: seen.append(site.name)):  # stream
    ...     _ = model(images)
    >>> seen[:3]                                          # fn(site, tensor) per block, nothing kept
    ['blocks.0.attn.probs', 'blocks.0.out', 'blocks.1.attn.probs']

Site names follow the module path of the attention module plus a kind, TransformerLens style:
    ``<attn path>.probs``  post-softmax map [B, H, N, N]
    ``<attn path>.mixed``  Re-attention map after Theta, Norm and scale [B, H, N, N] (our DeepViT blocks only)
    ``<block path>.out``   block output tokens [B, N, C]

Supported families (see ``adapters`` for where each map is taken): our models, timm ViT-family models (vit,
deit incl. distilled, beit, eva, cait, anything built from timm's ``Attention``), torchvision ``vit_b_16``-style models
and ``nn.TransformerEncoder`` stacks (``nn.MultiheadAttention``), HuggingFace transformers ViT / DeiT / DINOv2 / CLIP /
SigLIP / ViT-MAE / BEiT / Data2VecVision, vit-pytorch ViT, SimpleViT, T2TViT and CrossViT (main stack only,
``selection``), CaiT and DeepViT. Any other model (written from scratch) goes the universal route (``universal``):
every token-to-token softmax / ``F.scaled_dot_product_attention`` map, found in a dry run on ``example`` (or a guessed
input) and attributed to its module; ``capture(model, example=x)`` makes the dry run use your input.
Paths that never build the map are switched only while capturing and restored afterwards: timm's fused SDPA
(``fused_attn``), HF's sdpa implementation (eager while probing), torchvision's ``need_weights=False``, torch's MHA
fast paths (``torch.backends.mha``). SDPA calls of universal models stay fused (their maps are recomputed). The switched
paths compute the same function (outputs agree to float rounding, see tests/test_capture_families.py). Capture neither
changes ``model.training`` nor requires grad to be off. One switch does change the function, and ``probe_notes``
says so: ViT-MAE's random masking is off while probing (``masking``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .adapters import LOOKED_FOR, Getter, HfEager, Patch, Plan, Sink, _hf_root, match
from .masking import masking_notes, masking_patches
from .selection import select
from .universal import discover, universal_plans

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
    num_heads: int | None = None  # heads of the first attention module, as its family's adapter reads them

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
    get: Getter  # (inputs, output) of the hooked module -> the tensor to record
    install: Callable[[Sink], Callable[[], None]] | None = None  # instead of a module hook (universal route)


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, Plan]]:
    """(raw path, module, plan) of every recognised attention module in registration (= execution) order.

    Descendants of a recognised module are not searched (e.g. no MultiheadAttention inside a matched block).
    """
    def visit(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module, Plan]]:
        for name, child in module.named_children():
            sub = f"{path}.{name}" if path else name
            plan = match(child, sub)
            if plan is not None:
                yield sub, child, plan
            else:
                yield from visit(child, sub)

    plan = match(model, "")
    if plan is not None:
        yield "", model, plan
    else:
        yield from visit(model, "")


def attention_plans(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, nn.Module, Plan]]:
    """(raw path, module, plan) per probed attention module; ``plan.family`` and ``plan.num_heads`` describe it.

    Models whose stacks run on different token counts keep only their main stack (``selection``). A model in which
    no adapter matched anything goes the universal route (``universal``: family "universal", found in a dry run on
    ``example[:1]``, or on a guessed input when ``example`` is None; the raw path of a block there may end in
    ``[k]``, the k-th run of a module that runs more than once per forward).
    """
    found = select(model, list(_walk(model)))[0]
    return found if found else universal_plans(model, example)


def probe_notes(model: nn.Module) -> list[str]:
    """What capturing ``model`` changes or leaves out, in words: blocks not probed (``selection``), masking switched
    off (``masking``). Empty for a model probed whole, as it runs."""
    return select(model, list(_walk(model)))[1] + masking_notes(model)


def find_sites(model: nn.Module, kinds: Sequence[str] = ("probs",),
               example: torch.Tensor | None = None) -> tuple[list[_Hook], list[Patch]]:
    """Plan the hooks for ``kinds``; returns the hooks and the patches (unfusing, weight requests) to apply."""
    hooks, patches, _ = _plan(model, kinds, example)
    return hooks, patches


def no_attention(model: nn.Module, example: torch.Tensor | None = None) -> UnsupportedModelError:
    """The one-line error for a model in which neither an adapter nor the universal route found attention."""
    return UnsupportedModelError(
        f"no attention module found in {type(model).__name__}: looked for {LOOKED_FOR}; and for softmax / "
        f"scaled_dot_product_attention maps over tokens ({discover(model, example)[1]}); is this a Vision Transformer?")


def unique(patches: Sequence[Patch]) -> list[Patch]:
    """``patches`` without repeats of the same object (universal plans share one ``Route``), order kept."""
    out: list[Patch] = []
    for p in patches:
        if not any(p is q for q in out):
            out.append(p)
    return out


def _plan(model: nn.Module, kinds: Sequence[str],
          example: torch.Tensor | None = None) -> tuple[list[_Hook], list[Patch], int | None]:
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown capture kind(s) {bad}; choose from {KINDS}")
    attns = attention_plans(model, example)
    if not attns:
        raise no_attention(model, example)
    modules = dict(model.named_modules())
    hooks: list[_Hook] = []
    patches: list[Patch] = []
    hf_roots: dict[int, nn.Module] = {}
    for block, (raw, attn, plan) in enumerate(attns):
        path = _clean(raw)
        for kind in ("probs", "mixed"):
            if kind in kinds and kind in plan.points:
                point = plan.points[kind]
                hooks.append(_Hook(Site(f"{path}.{kind}" if path else kind, kind, block), point.module, point.get,
                                   point.install))
        if "out" in kinds and plan.block_out and raw:
            parent_raw = plan.block_path if plan.block_path is not None else _parent(raw)
            parent = _clean(parent_raw)
            hooks.append(_Hook(Site(f"{parent}.out" if parent else "out", "out", block), modules[parent_raw],
                               _block_output))
        patches.extend(plan.patches)
        if plan.family == "transformers":
            root = _hf_root(model, raw)
            if root is not None:
                hf_roots.setdefault(id(root), root)
    patches.extend(HfEager(r) for r in hf_roots.values())
    patches.extend(masking_patches(model))
    return hooks, unique(patches), attns[0][2].num_heads


def _block_output(_inputs: tuple, output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture(
    model: nn.Module,
    kinds: Sequence[str] = ("probs",),
    callback: Callback | None = None,
    store: bool | None = None,
    example: torch.Tensor | None = None,
) -> Iterator[Capture]:
    """Hook ``model`` for the duration of the ``with`` block.

    Args:
        model: a ViT of a supported family (a DDP / torch.compile wrapper is fine).
        kinds: any of "probs", "mixed", "out".
        callback: called as ``callback(site, tensor)`` inside each hook, block by block; the tensor is detached.
        store: keep the tensors of the last forward in ``Capture.maps`` (default: only when there is no callback).
        example: an input batch like the ones to come, for a model no adapter knows: the universal route finds its
            attention in a dry run on ``example[:1]`` (default: a guessed input, see ``universal.guesses``).

    Hooks are removed and every switched path (``fused_attn``, attention implementation, ``need_weights``)
    restored on exit, also when the body raises.
    """
    hooks, patches, num_heads = _plan(model, kinds, example)
    store = callback is None if store is None else store
    result = Capture(sites=[h.site for h in hooks], num_heads=num_heads)
    removers: list[Callable[[], None]] = []
    applied: list[Patch] = []

    def make(h: _Hook) -> Sink:
        def deliver(t: torch.Tensor) -> None:
            t = t.detach()
            if store:
                result.maps[h.site.name] = t
            if callback is not None:
                callback(h.site, t)
        return deliver

    try:
        for p in patches:
            p.apply()
            applied.append(p)
        for h in hooks:
            deliver = make(h)
            if h.install is not None:
                removers.append(h.install(deliver))
            else:
                hook = (lambda get, deliver: lambda _m, inputs, output: deliver(get(inputs, output)))(h.get, deliver)
                removers.append(h.module.register_forward_hook(hook).remove)
        yield result
    finally:
        for remove in removers:
            remove()
        for p in reversed(applied):
            p.undo()
