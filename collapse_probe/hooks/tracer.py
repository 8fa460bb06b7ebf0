"""See every softmax and ``F.scaled_dot_product_attention`` call of a model's forward, with the module that made it.

    tracer = Tracer(model, handler)      # handler.wants(call) -> bool; handler.seen(call, map) -> new map or None
    remove = tracer.install()            # module-stack hooks; the mode is on only inside the model's own forward
    model(x)                             # handler.seen(call, [.., N, N] map) per square softmax / SDPA call
    remove()

What is seen: ``torch.softmax``, ``F.softmax`` (also inside an ``nn.Softmax`` module), ``Tensor.softmax`` and
``torch.special.softmax`` over the last dim of a 3-D or 4-D tensor whose last two dims are equal (N x N, N >= 2), and
``F.scaled_dot_product_attention`` with as many queries as keys; its map softmax(q k^T * scale + mask) is recomputed
from the q, k, attn_mask, is_causal, scale and enable_gqa of the call (``sdpa_map``), only when the handler wants it.
The call itself still runs fused and its output is returned untouched unless the handler replaces the map; then the
output is ``new_map @ V`` (``sdpa_output``). A softmax's output *is* its map; a replacement is returned in its place.

Each call is attributed to its *owner*: the innermost module on the module stack (forward pre-hooks push, forward
hooks with ``always_call`` pop, so an exception cannot leave a stale frame) that holds parameters. Parameter-free
helpers (``nn.Softmax``, a ``ScaledDotProduct()`` module, dropout) are not attention modules of their own; the module
with the q/k projections is. ``Call.key`` = (owner path, how many times the owner ran before in this forward, index of
the call among the owner call's square calls) names a call the same way in every forward of the same structure.

Why a ``TorchFunctionMode`` (and not forward hooks or ``torch.fx``): a hand-written ``softmax(q @ k^T)`` is a function
call, not a module, so no module hook sees it; ``torch.fx`` needs a traceable forward (no data-dependent Python, no
``einops`` pattern strings parsed at run time) and a rewritten copy of the model, while the mode sees every call of
the unmodified model, however it was written, including ``from torch.nn.functional import softmax``. Its cost is one
Python call per torch function inside the forward (benchmarks/bench_universal.py measures it). The mode is entered by
the root module's forward pre-hook and left by its forward hook, so code around the forward is not slowed down.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModelError

SOFTMAX = frozenset({torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax})
SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)

Key = tuple[str, int, int]  # (owner module path, its call number in this forward, square call number in that call)


@dataclass
class Frame:
    """One module call on the stack."""

    module: nn.Module
    path: str
    occurrence: int  # calls of this module earlier in the same forward
    first: torch.Tensor | None = None  # its first tensor argument (kept only while discovering)
    calls: int = 0  # square softmax / SDPA calls made so far with this frame as owner


@dataclass
class Call:
    """One square softmax or SDPA call: who made it and what it looked like."""

    owner: Frame
    seq: int
    op: str  # "softmax" or "sdpa"
    tokens_ok: bool | None = None  # N is a token count some module received in this forward (only when discovering)
    key: Key = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.owner.path, self.owner.occurrence, self.seq)


class Handler(Protocol):
    def reset(self) -> None: ...  # a new forward starts

    def wants(self, call: Call) -> bool: ...

    def seen(self, call: Call, probs: torch.Tensor) -> torch.Tensor | None: ...  # a replacement map, or None


def sdpa_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of an ``F.scaled_dot_product_attention`` call by name, defaults filled in."""
    named = dict(zip(_SDPA_ARGS, _SDPA_DEFAULTS))
    named.update(zip(_SDPA_ARGS, args))
    named.update(kwargs)
    return named


def sdpa_map(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False, **_: Any) -> torch.Tensor:
    """The map SDPA applies: softmax(q k^T * scale + mask) [.., L, S], computed in at least float32, returned in q's
    dtype. A boolean mask keeps True entries (False -> -inf); a float mask is added; ``is_causal`` keeps the lower
    triangle; with ``enable_gqa`` each key head serves a group of query heads, as in SDPA."""
    work = torch.promote_types(query.dtype, torch.float32)
    q, k = query.to(work), key.to(work)
    if enable_gqa and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    L, S = logits.shape[-2:]
    if is_causal:
        logits = logits.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else logits + attn_mask.to(work)
    return logits.softmax(-1).to(query.dtype)


def sdpa_output(probs: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0, enable_gqa: bool = False,
                **_: Any) -> torch.Tensor:
    """What SDPA returns when its map is ``probs``: probs @ V (GQA key/value heads repeated as SDPA does)."""
    if dropout_p:
        raise UnsupportedModelError("scaled_dot_product_attention with dropout_p > 0 (training mode): its map cannot "
                                    "be replaced; intervene in eval mode")
    if enable_gqa and value.dim() >= 3 and value.shape[-3] != probs.shape[-3]:
        value = value.repeat_interleave(probs.shape[-3] // value.shape[-3], dim=-3)
    return probs.to(value.dtype) @ value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def _square_softmax(args: tuple, kwargs: dict, out: Any) -> bool:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return (isinstance(out, torch.Tensor) and isinstance(dim, int) and out.dim() in (3, 4)
            and dim % out.dim() == out.dim() - 1 and out.shape[-1] == out.shape[-2] >= 2)


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # the mode is off while this runs
        kwargs = kwargs or {}
        if func in SOFTMAX:
            out = func(*args, **kwargs)
            if _square_softmax(args, kwargs, out):
                new = self.tracer.found("softmax", out)
                return out if new is None else new.to(out.dtype).reshape(out.shape)
            return out
        if func is SDPA:
            named = sdpa_args(args, kwargs)
            q, k = named["query"], named["key"]
            if q.dim() in (3, 4) and q.shape[-2] == k.shape[-2] >= 2:
                new = self.tracer.found("sdpa", None, named)
                if new is not None:
                    return sdpa_output(new.reshape(q.shape[:-1] + (k.shape[-2],)), **named)
        return func(*args, **kwargs)


class Tracer:
    """The module stack of ``model``'s forward and a torch-function mode that reports square softmax / SDPA calls."""

    def __init__(self, model: nn.Module, handler: Handler, discovering: bool = False) -> None:
        self.model, self.handler, self.discovering = model, handler, discovering
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.owners = {id(m) for m in model.modules() if next(m.parameters(), None) is not None}
        self.stack: list[Frame] = []
        self.counts: dict[int, int] = {}
        self.tokens: set[int] = set()  # token counts seen in module inputs (discovering only)
        self.depth = 0
        self.mode = _Mode(self)

    # -- module stack
    def _push(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is self.model:
            if self.depth == 0:
                self.stack.clear()
                self.counts.clear()
                self.tokens.clear()
                self.handler.reset()
                self.mode.__enter__()
            self.depth += 1
        n = self.counts.get(id(module), 0)
        self.counts[id(module)] = n + 1
        first = None
        if self.discovering:
            first = _first_tensor(args, kwargs)
            for t in (*args, *kwargs.values()):
                if isinstance(t, torch.Tensor) and t.dim() == 3:  # [B, N, C] or [N, B, C]
                    self.tokens.update(int(s) for s in t.shape[:2])
        self.stack.append(Frame(module, self.paths[id(module)], n, first))

    def _pop(self, module: nn.Module) -> None:
        while self.stack:
            if self.stack.pop().module is module:
                break
        if module is self.model and self.depth > 0:  # (0: another pre-hook raised before ours ran)
            self.depth -= 1
            if self.depth == 0:
                self.mode.__exit__(None, None, None)

    def found(self, op: str, probs: torch.Tensor | None, sdpa: dict[str, Any] | None = None) -> torch.Tensor | None:
        """A square call: ask the handler, computing an SDPA map only when it is wanted."""
        owner = next((f for f in reversed(self.stack) if id(f.module) in self.owners), None)
        if owner is None:
            return None
        call = Call(owner, owner.calls, op)
        owner.calls += 1
        if not self.handler.wants(call):
            return None
        if probs is None:  # recomputed outside autograd: the call's own output keeps its graph
            with torch.no_grad():
                probs = sdpa_map(**sdpa)
        if self.discovering:
            call.tokens_ok = int(probs.shape[-1]) in self.tokens
        return self.handler.seen(call, probs)

    def install(self) -> Callable[[], None]:
        """Register the stack hooks on every module of the model; returns the function that removes them (and leaves
        the mode if a forward was interrupted between its hooks)."""
        handles = []
        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(self._push, with_kwargs=True))
            handles.append(m.register_forward_hook(lambda mod, _a, _o: self._pop(mod), always_call=True))

        def remove() -> None:
            for h in handles:
                h.remove()
            if self.depth > 0:  # only if the forward never reached its own forward hook
                self.depth = 0
                self.mode.__exit__(None, None, None)
            self.stack.clear()
        return remove
