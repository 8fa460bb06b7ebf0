"""Find the attention maps of a model no adapter knows (research code written from scratch) and capture them.

    plans = universal_plans(model, example)   # [(name, module, Plan)], family "universal"; [] if none found
    found, note = discover(model, example)    # the blocks themselves, and how they were found (or why none)

``capture`` / ``attention_plans`` / ``describe`` use this route only when no adapter (``adapters``) matched any module
of the model: adapters know exactly where their families keep the map and cost nothing before a forward, while this
route needs one *dry run*: a forward of one example image (the ``example`` given, else a guess: ``guesses``) in eval
mode under no_grad, training flags restored afterwards, with a ``tracer.Tracer`` watching every softmax and
``F.scaled_dot_product_attention`` call. The result is cached per model structure and example shape. Why adapters
first and this route only as a fallback (not module by module): deciding per module would need the dry run for every
model, also the many that adapters already cover exactly; the price is that a model mixing an adapter-recognised module
with hand-written attention is probed through the adapter's modules only. ``describe(model)`` knows depth and heads
only after a dry run: it uses a guessed input; ``probe`` passes its first batch to ``capture`` (and to ``describe``
when no guess ran), so what is measured never depends on the guess.

Which calls are attention maps (token-to-token, [B, H, N, N]):
  - a softmax over the last dim of a 3-D or 4-D tensor whose last two dims are equal (queries = keys), or an SDPA call
    with as many queries as keys. Classifier softmaxes ([B, classes]), class attention with one query ([B, H, 1, N])
    and cross attention to another token set are not square and are ignored.
  - N must be a token count: the length of a [B, N, C] (or [N, B, C]) tensor that some module received earlier in the
    same forward. This rejects square maps over other axes, e.g. XCiT-style channel attention [B, H, d, d], whose d is
    a feature width. The dry run uses one image, so the batch size (1) cannot pass for a token count.
How calls become blocks (order = execution order):
  - each call belongs to its owner, the innermost module on the stack with parameters (``tracer``). A 4-D map is
    one block; consecutive 3-D maps [B, N, N] of one owner call are the heads of one block (a loop over heads), and a
    3-D map [B*H, N, N] (heads folded into the batch, ``bmm`` style) is unfolded batch-major to [B, H, N, N].
  - per-head modules (e.g. a ``MultiHeadAttention`` holding a ModuleList of ``Head`` modules, each making one map)
    are grouped into one block: consecutive calls of *different* owners that share their nearest non-container
    ancestor and were called with the *same input tensor* (heads run in parallel on one x; sequential layers run on
    each other's outputs) become one block at that ancestor, their maps stacked into [B, H, N, N].
  - the block is named by its module path (``<path>.probs``); a module that runs more than once per forward (shared
    weights) gives one block per run, named ``<path>[k].probs``.
"out" (block output): the nearest ancestor of the attention module, above it and not a ModuleList/ModuleDict nor the
model itself, that holds no other attention block and holds a weight matrix outside the attention module (the MLP):
``encoder.layers.3`` for ``encoder.layers.3.self_attention``. vit-pytorch-style ``layers.N.0.fn`` (PreNorm around the
attention, residuals added by the stack's loop) has no such module, and no "out" (nor skipping, ``intervene``).
Interventions (``hooks.swap``): a block made by one softmax call has its map replaced by returning the replacement
from that call (whatever the module does next, dropout or head mixing, still applies); one made by one SDPA call gets
``replacement @ V`` as that call's output. Per-head blocks are refused with the reason (``swap_refusal``): their
[B, H, N, N] map exists only after the last head ran.
Known limits: models only run eagerly (not under ``torch.compile``); a forward must take one tensor; a model with any
adapter-recognised module is probed through adapters only; maps whose structure depends on the input may differ
from the dry run's (calls the dry run did not see are ignored).
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import one_line
from .adapters import Plan, Point
from .swap import MapFn, Patch, Remover, Swap
from .tracer import Call, Key, Tracer

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)
_SIZES = (224, 32, 28, 64, 96, 128, 256, 384)  # image sizes tried when the model says none
_MAX_TRIES = 12


@dataclass(frozen=True)
class Slot:
    """One softmax / SDPA call that contributes heads to a block."""

    key: Key
    heads: int  # 4-D map: its H; 3-D map: its leading dim per image (1, or H when heads are folded into the batch)


@dataclass(frozen=True)
class Found:
    """One attention block found in the dry run."""

    path: str  # raw module path of the attention module (the heads' common parent for per-head modules)
    occurrence: int  # which run of that module (0 unless it runs more than once per forward)
    repeats: int  # how many blocks this module gives per forward
    slots: tuple[Slot, ...]
    tokens: int  # N
    out_path: str | None  # raw path of the block whose output is "out", or None

    @property
    def num_heads(self) -> int:
        return sum(s.heads for s in self.slots)

    @property
    def name(self) -> str:
        return self.path if self.repeats == 1 else f"{self.path}[{self.occurrence}]"


class _Recorder:
    """Dry-run handler: every square call, with its map's shape."""

    def __init__(self) -> None:
        self.calls: list[tuple[Call, tuple[int, ...]]] = []

    def reset(self) -> None:
        self.calls.clear()

    def wants(self, call: Call) -> bool:
        return True

    def seen(self, call: Call, probs: torch.Tensor) -> None:
        self.calls.append((call, tuple(probs.shape)))


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _home(path: str, modules: dict[str, nn.Module]) -> str | None:
    """The nearest ancestor of ``path`` that is not a ModuleList / ModuleDict (None for the model itself)."""
    if not path:
        return None
    up = _parent(path)
    while up and isinstance(modules[up], _CONTAINERS):
        up = _parent(up)
    return up


def _run(model: nn.Module, example: torch.Tensor) -> list[tuple[Call, tuple[int, ...]]]:
    """One eval-mode, no-grad forward of ``example`` under a discovering tracer; training flags restored."""
    recorder = _Recorder()
    flags = [(m, m.training) for m in model.modules()]
    remove = Tracer(model, recorder, discovering=True).install()
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        remove()
        for m, flag in flags:
            m.training = flag
    return recorder.calls


def _group(model: nn.Module, calls: list[tuple[Call, tuple[int, ...]]]) -> list[Found]:
    """Token-to-token calls -> blocks in execution order (module docstring: heads, per-head modules, repeats)."""
    modules = dict(model.named_modules())
    units: list[list[tuple[Call, tuple[int, ...]]]] = []  # calls of one owner call that form one block
    for call, shape in calls:
        if not call.tokens_ok:
            continue
        last = units[-1][-1] if units else None
        if last is not None and last[0].owner is call.owner and len(last[1]) == len(shape) == 3:
            units[-1].append((call, shape))
        else:
            units.append([(call, shape)])
    groups: list[list[list[tuple[Call, tuple[int, ...]]]]] = []
    for unit in units:
        owner, prev = unit[0][0].owner, groups[-1][-1][0][0].owner if groups else None
        if (prev is not None and all(u[0][0].owner.module is not owner.module for u in groups[-1])
                and _home(prev.path, modules) == _home(owner.path, modules) is not None
                and owner.first is not None and owner.first is prev.first
                and groups[-1][-1][0][1][-1] == unit[0][1][-1]):
            groups[-1].append(unit)
        else:
            groups.append([unit])
    blocks: list[tuple[str, tuple[Slot, ...], int]] = []
    for group in groups:
        owner = group[0][0][0].owner
        path = owner.path if len(group) == 1 else _home(owner.path, modules)
        slots = tuple(Slot(c.key, s[1] if len(s) == 4 else s[0]) for unit in group for c, s in unit)
        blocks.append((path, slots, group[0][0][1][-1]))
    counts: dict[str, int] = {}
    for path, _, _ in blocks:
        counts[path] = counts.get(path, 0) + 1
    found, seen = [], dict.fromkeys(counts, 0)
    for path, slots, tokens in blocks:
        found.append(Found(path, seen[path], counts[path], slots, tokens, None))
        seen[path] += 1
    return [_with_out(f, found, modules) for f in found]


def _with_out(f: Found, found: list[Found], modules: dict[str, nn.Module]) -> Found:
    """``f`` with its "out" block (module docstring), if it has one."""
    if f.repeats > 1:
        return f
    cand = _parent(f.path) if f.path else None
    while cand:
        m = modules[cand]
        if not isinstance(m, _CONTAINERS):
            inside = {id(x) for x in m.modules()}
            if sum(id(modules[g.path]) in inside for g in found) > 1:
                break
            if any(p.dim() >= 2 and not f"{cand}.{n}".startswith(f"{f.path}.") for n, p in m.named_parameters()):
                return Found(f.path, f.occurrence, f.repeats, f.slots, f.tokens, cand)
        cand = _parent(cand)
    return f


def guesses(model: nn.Module) -> Iterator[torch.Tensor]:
    """Example images [1, C, S, S] for a dry run, most likely first: C from the first Conv2d (else 3, then 1); S from
    the model's ``image_size`` / ``img_size`` / ``input_size`` attributes, from a position embedding [1, T, D]
    (T = g*g + prefix tokens) times the patch size (the first Conv2d's stride, or a first Linear's p*p*C inputs),
    then 224, 32, 28, 64, 96, 128, 256, 384."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = [conv.in_channels] if conv is not None else [3, 1]
    patches = [conv.stride[0]] if conv is not None else []
    linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if conv is None and linear is not None:
        patches += [p for c in chans if (p := math.isqrt(linear.in_features // c)) ** 2 * c == linear.in_features]
    sizes: list[int] = []
    for m in model.modules():
        for attr in ("image_size", "img_size", "input_size"):
            v = getattr(m, attr, None)
            v = v[-1] if isinstance(v, (tuple, list)) and v and isinstance(v[-1], int) else v
            if isinstance(v, int) and not isinstance(v, bool) and 4 <= v <= 4096:
                sizes.append(v)
    for name, p in model.named_parameters():
        if "pos" in name.lower() and p.dim() in (2, 3) and p.shape[-2] > 1:
            for prefix in range(0, 9):
                g = math.isqrt(max(int(p.shape[-2]) - prefix, 0))
                if g > 0 and g * g == p.shape[-2] - prefix:
                    sizes += [g * patch for patch in patches]
                    break
    tried = 0
    for size in dict.fromkeys([*sizes, *_SIZES]):
        for c in chans:
            if tried == _MAX_TRIES:
                return
            tried += 1
            yield torch.randn(1, c, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def discover(model: nn.Module, example: torch.Tensor | None = None) -> tuple[list[Found], str]:
    """The attention blocks of ``model`` from a dry run on ``example[:1]`` (else on ``guesses``), and a note saying
    how they were found or why none were. Cached per model structure and example shape; an error of the model on a
    given example propagates, errors on guessed inputs only make the next guess."""
    structure = tuple(id(m) for m in model.modules())
    shape = None if example is None else (tuple(example.shape[1:]), example.dtype, str(example.device))
    cache = _CACHE.setdefault(model, {})
    if (structure, shape) in cache:
        return cache[(structure, shape)]
    tries = [example[:1]] if example is not None else guesses(model)
    result: tuple[list[Found], str] = ([], "no example input: give one (capture(model, example=images))")
    for x in tries:
        try:
            calls = _run(model, x)
        except Exception as e:  # a wrong guess of the input size or channels: try the next
            if example is not None:
                raise
            result = ([], f"no guessed input ran (last, {list(x.shape)}: {one_line(e, 100)}); pass an example input")
            continue
        found = _group(model, calls)
        how = "given" if example is not None else "guessed"
        square = sum(1 for c, _ in calls if not c.tokens_ok)
        result = (found, f"a dry run on a {how} {list(x.shape)} input found {len(found)} softmax/SDPA attention "
                         f"map(s) over tokens" + (f" and ignored {square} square softmax(es) over other axes"
                                                  if square else ""))
        break
    for old in [k for k in cache if k[0] != structure]:  # the model was changed: those results are stale
        del cache[old]
    cache[(structure, shape)] = result
    return result


class Route(Patch):
    """While applied: one tracer for all universal blocks of a model, delivering each block's [B, H, N, N] map to its
    sinks (``connect``) and replacing maps where a swap is installed (``RouteSwap``). One route per model and dry run
    (``universal_plans`` reuses it), so a capture inside an intervention sees the map the block applied."""

    def __init__(self, model: nn.Module, found: list[Found]) -> None:
        self.model, self.found = weakref.ref(model), found  # weak: routes are cached per model (``_ROUTES``)
        self.table = {s.key: (b, i) for b, f in enumerate(found) for i, s in enumerate(f.slots)}
        self.sinks: dict[int, list[Callable[[torch.Tensor], None]]] = {}
        self.swaps: dict[int, MapFn] = {}
        self.parts: dict[int, dict[int, torch.Tensor]] = {}
        self.remove: Remover | None = None
        self.users = 0

    def apply(self) -> None:  # shared by a capture and an intervention nested in each other: installed once
        self.users += 1
        if self.users == 1:
            self.remove = Tracer(self.model(), self).install()

    def undo(self) -> None:
        self.users -= 1
        if self.users == 0 and self.remove is not None:
            self.remove()
            self.remove = None
            self.parts.clear()

    def connect(self, block: int, sink: Callable[[torch.Tensor], None]) -> Remover:
        self.sinks.setdefault(block, []).append(sink)
        return lambda: self.sinks.get(block, []).remove(sink)

    # tracer handler
    def reset(self) -> None:
        self.parts.clear()

    def wants(self, call: Call) -> bool:
        hit = self.table.get(call.key)
        return hit is not None and (bool(self.sinks.get(hit[0])) or hit[0] in self.swaps)

    def seen(self, call: Call, probs: torch.Tensor) -> torch.Tensor | None:
        block, i = self.table[call.key]
        slots = self.found[block].slots
        m = probs if probs.dim() == 4 else probs.reshape(-1, slots[i].heads, *probs.shape[-2:])
        new = self.swaps[block](m) if block in self.swaps else None
        m = m if new is None else new
        if self.sinks.get(block):
            parts = self.parts.setdefault(block, {})
            parts[i] = m
            if len(parts) == len(slots):
                del self.parts[block]
                full = m if len(slots) == 1 else torch.cat([parts[j] for j in range(len(slots))], dim=1)
                for sink in list(self.sinks[block]):
                    sink(full)
        return None if new is None else new.reshape(probs.shape)


class RouteSwap(Swap):
    """The applied map of a universal block made by one softmax / SDPA call (``Route.seen`` returns the replacement
    from that call)."""

    def __init__(self, route: Route, block: int) -> None:
        self.route, self.block = route, block

    def install(self, fn: MapFn) -> Remover:
        self.route.swaps[self.block] = fn
        return lambda: self.route.swaps.pop(self.block, None)


_ROUTES: weakref.WeakKeyDictionary[nn.Module, Route] = weakref.WeakKeyDictionary()


def _unused(_inputs: tuple, _output: object) -> torch.Tensor:
    raise AssertionError("universal points deliver through Route.connect, not through a module hook")


def universal_plans(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, nn.Module, Plan]]:
    """(name, attention module, Plan) per block found by ``discover``; every plan shares one ``Route`` patch."""
    found, _ = discover(model, example)
    if not found:
        return []
    modules = dict(model.named_modules())
    route = _ROUTES.get(model)
    if route is None or route.found != found:  # the same blocks (e.g. found on a guessed and on a given input)
        route = _ROUTES[model] = Route(model, found)
    plans = []
    for b, f in enumerate(found):
        why = None if len(f.slots) == 1 else (
            f"{f.name or 'the model'}: its {f.num_heads} heads come from {len(f.slots)} separate softmax/SDPA calls "
            "(per-head modules or a loop over heads), so the block's [B, H, N, N] map exists only after the last "
            "head ran and cannot be replaced")
        point = Point(modules[f.path], _unused, install=partial(route.connect, b))
        plans.append((f.name, modules[f.path], Plan(
            "universal", f.num_heads, {"probs": point}, [route], block_out=f.out_path is not None,
            block_path=f.out_path, swap=None if why else RouteSwap(route, b), swap_refusal=why)))
    return plans
