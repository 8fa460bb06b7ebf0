"""Intervene on the blocks of a ViT during a forward, through the capture adapters, and restore it exactly afterwards.

    >>> import timm, collapse_probe.models
    >>> model, x = timm.create_model("vit_micro", depth=4).eval(), torch.randn(2, 3, 32, 32)
    >>> with intervene(model, reuse={2: 1, 3: 1}) as blocks:   # blocks 2, 3 multiply their V by block 1's map
    ...     y = model(x)
    >>> [b.family for b in blocks], blocks[1].swap.kind
    (['ours', 'ours', 'ours', 'ours'], 'probs')
    >>> with intervene(model, skip=[3]):                        # residual branches removed: output = input
    ...     y = model(x)
    >>> with intervene(model, uniform=[0], replace={1: lambda m: m.transpose(-1, -2)}):   # 1/N; any map -> map
    ...     y = model(x)

Blocks are 0-based, in the order of the attention modules (capture's ``Site.block``). "The map" of a block is its
*applied* map, the one that multiplies V (``hooks.swap``): the softmax map of plain blocks, the map after Θ + Norm of
Re-attention blocks. Reuse hands block t the applied map that block s used in the same forward (after any
intervention on s). Skipping removes both residual branches: the block module returns its input, or (vit-pytorch,
whose layers are bare module lists) the attention and feed-forward branches return zeros.

Inside the ``with`` every block runs the path that materialises its map (timm's fused SDPA off, HF through its eager
attention function, torchvision's weights requested, ours via its probe point), intervened on or not, so a forward
without any intervention computes the same function as the model itself (to float rounding) and the intervened
forward differs from it only by the intervention. On exit, also after an exception inside the forward, every hook is
removed and every switch restored: the model computes bit-identically what it computed before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadArgumentError, UnsupportedModelError
from .adapters import Patch, Plan, _hf_root
from .capture import _clean, _parent, attention_plans, no_attention, unique
from .swap import HfSwapAttention, MapFn, Remover, Swap


@dataclass(frozen=True)
class Block:
    """One attention block as an intervention sees it: its index, attention module path, family, where its applied
    map is replaced (``swap``; None with ``swap_refusal``) and what skipping it removes (``skip_modules``)."""

    index: int
    path: str
    family: str
    swap: Swap | None
    swap_refusal: str | None
    skip_modules: tuple[nn.Module, ...]  # the block (returns its input) or, with zero_branches, its branches
    zero_branches: bool
    skip_refusal: str | None


def _layer_of(modules: dict[str, nn.Module], raw: str) -> str | None:
    """vit-pytorch: the path of the ModuleList [attention, feed-forward] holding the attention at ``raw``."""
    path = _parent(raw)
    while path:
        parent = _parent(path)
        if isinstance(modules[path], nn.ModuleList) and isinstance(modules.get(parent), nn.ModuleList):
            return path
        path = parent
    return None


def intervention_blocks(model: nn.Module, example: torch.Tensor | None = None) -> list[Block]:
    """Every attention block of ``model`` (``capture``'s adapters, else its universal route with ``example``), with
    how each can be intervened on."""
    return _blocks(model, attention_plans(model, example), example)


def _blocks(model: nn.Module, plans: list[tuple[str, nn.Module, Plan]], example: torch.Tensor | None) -> list[Block]:
    modules = dict(model.named_modules())
    out = []
    for index, (raw, _attn, plan) in enumerate(plans):
        skip: tuple[nn.Module, ...] = ()
        zero, why = False, None
        if plan.block_out and raw:
            skip = (modules[plan.block_path if plan.block_path is not None else _parent(raw)],)
        elif plan.family.startswith("vit-pytorch") and (layer := _layer_of(modules, raw)) is not None:
            skip, zero = tuple(modules[layer].children()), True
        else:
            why = f"{plan.family}: no block module around {raw or 'the model'} to skip"
        out.append(Block(index, _clean(raw), plan.family, plan.swap, plan.swap_refusal, skip, zero, why))
    if not out:
        raise no_attention(model, example)
    return out


def _patches(model: nn.Module, plans: list[tuple[str, nn.Module, Plan]]) -> list[Patch]:
    """The switches every intervened forward runs under: each plan's own (fused paths off, weights requested; the
    universal route's tracer once) and, per transformers model, the attention function through which its maps can be
    replaced. ``plans`` must be the ones the blocks' swaps came from (a universal swap acts through its own route)."""
    patches: list[Patch] = []
    roots: dict[int, nn.Module] = {}
    for raw, _attn, plan in plans:
        patches.extend(plan.patches)
        if plan.family == "transformers" and (root := _hf_root(model, raw)) is not None:
            roots.setdefault(id(root), root)
    return unique(patches) + [HfSwapAttention(r) for r in roots.values()]


def _identity(_module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: the block returns its input token tensor (in the structure of its output)."""
    x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    out = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, torch.Tensor) or x.shape != out.shape:
        raise UnsupportedModelError(f"cannot skip {type(_module).__name__}: its input is not a token tensor of its "
                                    "output's shape")
    return (x, *output[1:]) if isinstance(output, tuple) else x


def _zeros(_module: nn.Module, _inputs: tuple, output):
    """Forward hook: a residual branch contributes nothing."""
    return torch.zeros_like(output)


def check(blocks: list[Block], reuse: Mapping[int, int], uniform: Iterable[int], skip: Iterable[int],
          replace: Mapping[int, MapFn]) -> None:
    """Raise BadArgumentError for an impossible request (exit 2) and UnsupportedModelError for a block whose map
    cannot be replaced or that cannot be skipped (exit 5); blocks are 0-based, messages name them 1-based."""
    depth = len(blocks)
    uniform, skip = list(uniform), list(skip)
    named = [*reuse, *reuse.values(), *uniform, *skip, *replace]
    bad = sorted({b for b in named if not (isinstance(b, int) and 0 <= b < depth)})
    if bad:
        raise BadArgumentError(f"block(s) {bad} (0-based) out of range: the model has {depth} blocks")
    targets = [*reuse, *uniform, *skip, *replace]
    twice = sorted({b + 1 for b in targets if targets.count(b) > 1})
    if twice:
        raise BadArgumentError(f"block(s) {twice} given more than one intervention")
    for t, s in reuse.items():
        if s >= t:
            raise BadArgumentError(f"block {t + 1} cannot reuse block {s + 1}'s map: the source must run earlier")
        if s in skip:
            raise BadArgumentError(f"block {t + 1} cannot reuse block {s + 1}'s map: block {s + 1} is skipped")
    for b in sorted({*reuse, *reuse.values(), *uniform, *replace}):
        if blocks[b].swap is None:
            raise UnsupportedModelError(f"block {b + 1} ({blocks[b].path}): {blocks[b].swap_refusal or 'no map'}")
    for b in sorted(set(skip)):
        if blocks[b].skip_refusal:
            raise UnsupportedModelError(f"block {b + 1}: {blocks[b].skip_refusal}")


def _uniform(m: torch.Tensor) -> torch.Tensor:
    return torch.full_like(m, 1.0 / m.shape[-1])


@contextlib.contextmanager
def intervene(
    model: nn.Module,
    reuse: Mapping[int, int] | None = None,
    uniform: Iterable[int] = (),
    skip: Iterable[int] = (),
    replace: Mapping[int, MapFn] | None = None,
    example: torch.Tensor | None = None,
) -> Iterator[list[Block]]:
    """Apply interventions to ``model``'s forwards inside the ``with`` block; yields its ``Block`` list.

    Args:
        reuse: target block -> source block (earlier): the target multiplies its V by the source's applied map.
        uniform: blocks whose applied map becomes 1/N (every query attends equally to all N keys).
        skip: blocks whose residual branches are removed (block output = block input).
        replace: block -> fn(map [B, H, N, N]) -> the map to use instead (None keeps the block's own).
        example: an input like the ones to come, for a model that goes the universal route (``capture``).

    Raises BadArgumentError / UnsupportedModelError (``check``) before anything is changed.
    """
    reuse, replace, uniform, skip = dict(reuse or {}), dict(replace or {}), list(uniform), list(skip)
    plans = attention_plans(model, example)
    blocks = _blocks(model, plans, example)
    check(blocks, reuse, uniform, skip, replace)
    sources = set(reuse.values())
    store: dict[int, torch.Tensor] = {}

    def action(b: int) -> MapFn | None:
        if b in reuse:
            s = reuse[b]

            def take(m: torch.Tensor) -> torch.Tensor:
                src = store.get(s)
                if src is None:
                    raise UnsupportedModelError(f"block {b + 1} cannot reuse block {s + 1}'s map: block {s + 1} did "
                                                "not run before it in this forward")
                if src.shape != m.shape:
                    raise UnsupportedModelError(f"block {b + 1} cannot reuse block {s + 1}'s map: shapes "
                                                f"{tuple(src.shape)} and {tuple(m.shape)} differ")
                return src
            return take
        return _uniform if b in uniform else replace.get(b)

    def hook_for(b: int) -> MapFn:
        act = action(b)

        def fn(m: torch.Tensor) -> torch.Tensor | None:
            new = act(m) if act is not None else None
            if b in sources:
                store[b] = m if new is None else new
            return new
        return fn

    removers: list[Remover] = []
    applied: list[Patch] = []
    try:
        for p in _patches(model, plans):
            p.apply()
            applied.append(p)
        removers.append(model.register_forward_pre_hook(lambda *_: store.clear()).remove)
        for blk in blocks:  # every block on its materialising path, so that untouched blocks compute as before
            if blk.swap is not None:
                removers.append(blk.swap.install(hook_for(blk.index)))
        for b in skip:
            blk = blocks[b]
            for m in blk.skip_modules:
                handle = m.register_forward_hook(_zeros) if blk.zero_branches else \
                    m.register_forward_hook(_identity, with_kwargs=True)
                removers.append(handle.remove)
        yield blocks
    finally:
        store.clear()
        for remove in reversed(removers):
            remove()
        for p in reversed(applied):
            p.undo()

