"""Where each family's *applied* attention map (the one that multiplies V) is read and how a replacement is put back.

    swap = adapters.match(attn).swap          # None where the family's map cannot be replaced (then: swap_refusal)
    remove = swap.install(lambda m: torch.full_like(m, 1 / m.shape[-1]))   # fn(map [B, H, N, N]) -> new map or None
    ...model(x)...                             # this block now multiplies V by 1/N
    remove()

The applied map is the softmax map of plain blocks and the map after head mixing where a family mixes heads after
the softmax (Re-attention: after Θ + Norm; timm CaiT: after the post-softmax talking-heads projection). ``fn`` sees
that map every forward and returns the map to use instead, or None to keep it.

family               applied map read and replaced at            how the replacement reaches V
  ours                 ``probs`` HookPoint (``mixed`` with        forward hook returns it (the hook also turns the
                       Re-attention)                              fused SDPA path off: the map is materialised)
  timm, timm-cait      ``attn_drop`` output                       forward hook returns it (``fused_attn`` off)
  vit-pytorch          ``attend`` output; DeepViT ``reattn_norm``  forward hook returns it
  transformers         the attention function                     our registered attention function runs the model
                                                                  file's own eager function, then weights @ value
  torch-mha            the returned per-head weights               V and the output projection recomputed from the
                                                                  module's own in_proj / out_proj weights
  universal            a softmax call's output, or the map of an   the softmax call returns it in place of its output;
                       SDPA call recomputed from its q, k, mask    the SDPA call returns replacement @ V
                                                                  (``universal.RouteSwap``)
Refused (``swap_refusal``): vit-pytorch CaiT, whose post-softmax talking heads are an einsum with a bare Parameter
(no module output carries the applied map), and ``nn.MultiheadAttention`` with bias_k / zero attention / separate
k, v widths (V cannot be recomputed from ``in_proj_weight``), and universal blocks whose heads come from separate
softmax calls (per-head modules: the [B, H, N, N] map exists only after the last head ran).
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError

MapFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # applied map [B, H, N, N] -> replacement, or None: keep it
Remover = Callable[[], None]


class Patch:
    """A temporary change applied while capturing; ``undo`` restores exactly what ``apply`` changed."""

    def apply(self) -> None:
        raise NotImplementedError

    def undo(self) -> None:
        raise NotImplementedError


class Swap:
    """A point where a block's applied map can be read and replaced during a forward; ``kind`` names that map
    ("probs": a softmax map, "mixed": after head mixing)."""

    kind: str = "probs"

    def install(self, fn: MapFn) -> Remover:
        """Call ``fn(map)`` on every forward of this block; returns the function that removes it again."""
        raise NotImplementedError


class OutputSwap(Swap):
    """The applied map is the output of ``module`` (an identity point, a dropout, a softmax or a norm)."""

    def __init__(self, module: nn.Module, kind: str = "probs") -> None:
        self.module, self.kind = module, kind

    def install(self, fn: MapFn) -> Remover:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return fn(output)
        return self.module.register_forward_hook(hook).remove


def _arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name)


def mha_refusal(m: nn.MultiheadAttention) -> str | None:
    """Why V of this ``nn.MultiheadAttention`` cannot be recomputed from its own weights, or None."""
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return ("nn.MultiheadAttention with separate k/v widths, bias_k/bias_v or add_zero_attn: the map cannot be "
                "replaced (V is not recomputable from in_proj_weight)")
    return None


def mha_output(m: nn.MultiheadAttention, value: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """What ``m`` returns as its output when its per-head map is ``attn`` [B, H, L, S]: out_proj(attn @ V).

    ``value`` is the module's value input ([B, S, E] with batch_first, else [S, B, E]); the result has the layout of
    the module's own output.
    """
    v = value if m.batch_first else value.transpose(0, 1)
    B, S, E = v.shape
    H = m.num_heads
    bias = m.in_proj_bias[2 * E:] if m.in_proj_bias is not None else None
    v = F.linear(v, m.in_proj_weight[2 * E:], bias).view(B, S, H, E // H).transpose(1, 2)  # [B, H, S, d]
    out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, attn.shape[-2], E)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    return out if m.batch_first else out.transpose(0, 1)


class MhaSwap(Swap):
    """``nn.MultiheadAttention`` (torchvision ViT): the map is its returned per-head weights (``MhaWeights`` asks for
    them); a replacement recomputes the output from V and the output projection (eval mode: no attention dropout)."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        self.module = module

    def install(self, fn: MapFn) -> Remover:
        def hook(m: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> Any:
            weights = output[1]
            if weights is None or weights.dim() != 4:
                raise UnsupportedModelError("nn.MultiheadAttention returned no per-head weights while intervening")
            new = fn(weights)
            if new is None:
                return None
            if _arg(args, kwargs, 3, "key_padding_mask") is not None or _arg(args, kwargs, 5, "attn_mask") is not None:
                raise UnsupportedModelError("masked nn.MultiheadAttention: the map cannot be replaced")
            if m.training and m.dropout > 0:
                raise UnsupportedModelError("nn.MultiheadAttention in training mode with dropout: intervene in eval")
            return mha_output(m, _arg(args, kwargs, 2, "value"), new), new
        return self.module.register_forward_hook(hook, with_kwargs=True).remove


# transformers: attention modules whose map is being replaced -> fn; read by the attention function below
_HF_FNS: weakref.WeakKeyDictionary[nn.Module, MapFn] = weakref.WeakKeyDictionary()
HF_ATTENTION = "collapse_probe_swap"


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The model file's own eager attention; where a swap is installed, its map replaced before it multiplies V.

    query, key, value [B, H, N, d] -> (output [B, N, H, d], weights [B, H, N, N]), the eager function's layout.
    """
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModelError(f"{type(module).__name__}: its model file has no eager_attention_forward, so "
                                    "its attention map cannot be replaced")
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    fn = _HF_FNS.get(module)
    new = fn(weights) if fn is not None else None
    if new is None:
        return out, weights
    return torch.matmul(new.to(value.dtype), value).transpose(1, 2).contiguous(), new


class HfSwap(Swap):
    """A transformers attention module run through ``_hf_attention`` (``HfSwapAttention`` switches the model)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def install(self, fn: MapFn) -> Remover:
        _HF_FNS[self.module] = fn
        return lambda: _HF_FNS.pop(self.module, None)


class HfSwapAttention(Patch):
    """Switch a transformers model to ``_hf_attention`` (registered with transformers' AttentionInterface while any
    model uses it), then back to the implementation it had."""

    _users = 0

    def __init__(self, model: nn.Module) -> None:
        self.model, self.saved = model, None

    def apply(self) -> None:
        from transformers import AttentionInterface

        if HfSwapAttention._users == 0:
            AttentionInterface.register(HF_ATTENTION, _hf_attention)
        HfSwapAttention._users += 1
        self.saved = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation(HF_ATTENTION)
        except BaseException:
            self.saved = None
            self._release()
            raise
        if self.model.config._attn_implementation != HF_ATTENTION:
            self.undo()
            raise UnsupportedModelError(f"{type(self.model).__name__} cannot switch its attention implementation, so "
                                        "its attention maps cannot be replaced")

    def _release(self) -> None:
        from transformers import AttentionInterface

        HfSwapAttention._users -= 1
        if HfSwapAttention._users == 0:
            AttentionInterface._global_mapping.pop(HF_ATTENTION, None)

    def undo(self) -> None:
        if self.saved is None:
            return
        try:
            if self.model.config._attn_implementation != self.saved:
                self.model.set_attn_implementation(self.saved)
        finally:
            self.saved = None
            self._release()
