"""How to find the attention modules of each ViT family and where their per-head post-softmax map lives.

    from collapse_probe.hooks.adapters import match, LOOKED_FOR
    plan = match(module)          # None, or a Plan: family, heads, hook points per kind, temporary patches

An adapter answers, for one module: is this an attention module of my family, which sub-module (input or output)
carries the [B, H, N, N] map, and what must be switched while capturing (fused paths off, weights requested).
``capture.capture`` applies the patches on entry and undoes them on exit, so fused kernels stay fused otherwise.

family (Plan.family)   attention module -> where "probs" is taken -> what is switched while probing
  ours                 collapse_probe Attention -> ``probs`` HookPoint output -> nothing
  timm                 timm Attention / AttentionRope, BEiT, EVA, RelPosAttention (vit_relpos_*) -> ``attn_drop``
                       input -> ``fused_attn = False``
  timm-cait            timm cait TalkingHeadAttn -> ``proj_w`` input, i.e. after the softmax -> nothing (never fused)
  vit-pytorch          vit_pytorch ``Attention`` with ``attend`` (ViT, CaiT, ...) -> ``attend`` output -> nothing
  vit-pytorch-deepvit  vit_pytorch.deepvit Attention -> ``dropout`` input (after softmax) -> nothing
  transformers         HF ``*Attention`` (ViT, DeiT, DINOv2, CLIP, SigLIP, ViT-MAE, ...) -> its returned weights ->
                       eager attention
  transformers-beit    HF BEiT / Data2VecVision ``*SelfAttention`` (relative position bias inside) -> ``dropout``
                       input, i.e. after the softmax -> the sdpa class swapped for its eager base class (the
                       implementation is picked per module at construction, so ``set_attn_implementation`` cannot)
  torch-mha            ``nn.MultiheadAttention`` (torchvision ViT, also inside ``nn.TransformerEncoderLayer``) -> its
                       returned weights -> need_weights=True, average_attn_weights=False, torch's MHA fast paths off
                       (``torch._transformer_encoder_layer_fwd`` and the nested-tensor path never call the module)
  universal            anything else: softmax / scaled_dot_product_attention calls seen in a dry run (``universal``),
                       only when no adapter above matched any module of the model

Each plan also names where its block's *applied* map (the one that multiplies V) can be replaced (``Plan.swap``, see
``hooks.swap``; ``hooks.intervene`` uses it for attention reuse and uniform attention), or why not (``swap_refusal``).

Talking heads (CaiT) and re-attention (DeepViT) mix heads after the softmax; "probs" is always the row-stochastic
map before that mixing, and "mixed" the map after it (not row-stochastic) where the family exposes it.
Not captured: class-attention layers (timm ``ClassAttn``, vit-pytorch CaiT ``cls_transformer``) and SigLIP's
attention-pooling head: one query token, a [B, H, 1, N] map, not a token-to-token map.
Refused with one line (exit 5, ``REFUSED``): Swin window attention and XCiT cross-covariance attention.
Which of the modules found are probed when a model's stacks run on different token counts (T2T-ViT, CrossViT) or
include a pre-training decoder (ViT-MAE) is decided in ``selection``; ViT-MAE's random masking is switched off while
probing in ``masking``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.attention import Attention as OurAttention
from .swap import HfSwap, MhaSwap, OutputSwap, Patch, Swap, mha_refusal

Getter = Callable[[tuple, Any], torch.Tensor]  # (inputs, output) of the hooked module -> [B, H, N, N]


def _input0(inputs: tuple, _output: Any) -> torch.Tensor:
    return inputs[0]


def _output(_inputs: tuple, output: Any) -> torch.Tensor:
    return output


def _output1(_inputs: tuple, output: Any) -> torch.Tensor:
    weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
    if weights is None:  # e.g. a transformers model that refused to switch to eager attention
        raise UnsupportedModelError("the attention module returned no attention weights while probing; for a "
                                    "transformers model load it with attn_implementation='eager'")
    return weights


def _heads_last_input(inputs: tuple, _output: Any) -> torch.Tensor:
    return inputs[0].permute(0, 3, 1, 2)  # timm cait feeds proj_w [B, N, N, H]


Sink = Callable[[torch.Tensor], None]


@dataclass
class Point:
    """A hook point: record ``get(inputs, output)`` of ``module`` each forward; or, where ``install`` is set (the
    universal route), ``install(sink)`` delivers each map to ``sink`` itself and returns the function that stops it."""

    module: nn.Module
    get: Getter
    install: Callable[[Sink], Callable[[], None]] | None = None


class SetAttr(Patch):
    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name, self.value, self.saved = obj, name, value, None

    def apply(self) -> None:
        self.saved = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def undo(self) -> None:
        setattr(self.obj, self.name, self.saved)


class MhaWeights(Patch):
    """Make an ``nn.MultiheadAttention`` return per-head weights, whatever its caller asked for.

    torchvision's EncoderBlock calls it with ``need_weights=False``; a forward pre-hook rewrites the call to
    ``need_weights=True, average_attn_weights=False`` (positional or keyword) and is removed on ``undo``.
    """

    def __init__(self, module: nn.MultiheadAttention) -> None:
        self.module, self.handle = module, None

    @staticmethod
    def _hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for pos, name, value in ((4, "need_weights", True), (6, "average_attn_weights", False)):
            if len(args) > pos:
                args[pos] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def apply(self) -> None:
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def undo(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class MhaFastPathOff(Patch):
    """Turn torch's MHA fast paths off (``torch.backends.mha.set_fastpath_enabled(False)``), then back.

    In eval mode without grad, ``nn.TransformerEncoderLayer`` may run ``torch._transformer_encoder_layer_fwd``, which
    never calls ``self_attn.forward`` (its hooks, ``MhaWeights`` included, would see nothing; torch 2.14 itself leaves
    that path when hooks are attached, older versions did not), and ``nn.TransformerEncoder`` may pack a padded batch
    into a nested tensor. The flag gates all of them and ``nn.MultiheadAttention``'s own fused path, whatever the
    version; the plain path computes the same function. The flag is global: the previous value is restored.
    """

    def __init__(self) -> None:
        self.saved: bool | None = None

    def apply(self) -> None:
        self.saved = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def undo(self) -> None:
        if self.saved is not None:
            torch.backends.mha.set_fastpath_enabled(self.saved)
            self.saved = None


class HfEager(Patch):
    """Switch a transformers model to the eager attention (the only one that returns maps), then back."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.saved = model, None

    def apply(self) -> None:
        self.saved = self.model.config._attn_implementation
        if self.saved != "eager":
            self.model.set_attn_implementation("eager")

    def undo(self) -> None:
        if self.saved is not None and self.saved != "eager":
            self.model.set_attn_implementation(self.saved)


@dataclass
class Plan:
    """What ``capture`` needs for one attention module."""

    family: str
    num_heads: int
    points: dict[str, Point]  # kind ("probs", "mixed") -> hook point
    patches: list[Patch] = field(default_factory=list)
    block_out: bool = True  # the parent module (or ``block_path``) is a block whose output is the token tensor
    block_path: str | None = None  # raw path of that block where it is not the attention module's parent
    swap: Swap | None = None  # where the applied map (the one that multiplies V) is replaced (``hooks.swap``)
    swap_refusal: str | None = None  # why it cannot be, when swap is None


def _timm_classes() -> tuple[type, ...]:
    import timm.layers as tl
    from timm.models import beit, eva
    from timm.models import vision_transformer_relpos as relpos

    return tuple(c for c in (getattr(tl, "Attention", None), getattr(tl, "AttentionRope", None),
                             getattr(beit, "Attention", None), getattr(eva, "EvaAttention", None),
                             getattr(relpos, "RelPosAttention", None)) if c is not None)


# attention we recognise but refuse to measure, with the reason (class module prefix, class name) -> why
REFUSED = {
    ("timm.", "WindowAttention"): "windowed attention is not supported (Swin: maps are per window, not token-to-token "
                                  "over the image)",
    ("transformers.", "SwinSelfAttention"): "windowed attention is not supported (Swin: maps are per window, not "
                                            "token-to-token over the image)",
    ("timm.", "XCA"): "cross-covariance attention is over channels, not tokens (XCiT); its maps are not attention "
                      "between tokens",
}


def _refuse(m: nn.Module, path: str) -> None:
    """One-line exit-5 refusal for attention kinds whose maps are not the token-to-token maps collapse is about."""
    cls = type(m)
    for (module, name), why in REFUSED.items():
        if cls.__name__ == name and cls.__module__.startswith(module):
            raise UnsupportedModelError(f"{cls.__name__} at {path or 'the model'}: {why}")


def _ours(m: nn.Module, _path: str) -> Plan | None:
    if not isinstance(m, OurAttention):
        return None
    points = {"probs": Point(m.probs, _output)}
    if m.reattention:
        points["mixed"] = Point(m.mixed, _output)
    # a block that already reuses a published map (attn_reuse_from) sends it through ``probs`` and never runs ``mixed``
    swap = OutputSwap(m.mixed, "mixed") if m.reattention and m.reuse is None else OutputSwap(m.probs, "probs")
    return Plan("ours", m.num_heads, points, swap=swap)


def _timm(m: nn.Module, _path: str) -> Plan | None:
    if not isinstance(m, _timm_classes()):
        return None
    patches: list[Patch] = [SetAttr(m, "fused_attn", False)] if hasattr(m, "fused_attn") else []
    return Plan("timm", m.num_heads, {"probs": Point(m.attn_drop, _input0)}, patches, swap=OutputSwap(m.attn_drop))


def _timm_cait(m: nn.Module, _path: str) -> Plan | None:
    from timm.models.cait import TalkingHeadAttn

    if not isinstance(m, TalkingHeadAttn):
        return None
    return Plan("timm-cait", m.num_heads, {"probs": Point(m.proj_w, _heads_last_input),
                                           "mixed": Point(m.attn_drop, _input0)},
                swap=OutputSwap(m.attn_drop, "mixed"))


def _vit_pytorch(m: nn.Module, path: str) -> Plan | None:
    if not type(m).__module__.startswith("vit_pytorch.") or type(m).__name__ != "Attention":
        return None
    if "cls_transformer" in path.split("."):
        return None  # CaiT class attention: [B, H, 1, N]
    if isinstance(getattr(m, "attend", None), nn.Softmax):
        if hasattr(m, "mix_heads_post_attn"):  # CaiT: the applied map is an einsum with a Parameter, no module's output
            return Plan("vit-pytorch", m.heads, {"probs": Point(m.attend, _output)}, block_out=False,
                        swap_refusal="vit-pytorch CaiT mixes heads after the softmax with a bare parameter (talking "
                        "heads): no module carries the map that multiplies V, so it cannot be replaced")
        return Plan("vit-pytorch", m.heads, {"probs": Point(m.attend, _output)}, block_out=False,
                    swap=OutputSwap(m.attend))
    if hasattr(m, "reattn_weights") and isinstance(getattr(m, "dropout", None), nn.Dropout):
        return Plan("vit-pytorch-deepvit", m.heads, {"probs": Point(m.dropout, _input0),
                                                     "mixed": Point(m.reattn_norm, _output)}, block_out=False,
                    swap=OutputSwap(m.reattn_norm, "mixed"))
    return None


def _hf_root(model: nn.Module, path: str) -> nn.Module | None:
    """The outermost transformers PreTrainedModel on the way from ``model`` to ``path``."""
    node = model
    if hasattr(node, "set_attn_implementation") and hasattr(node, "config"):
        return node
    for part in path.split(".")[:-1]:
        node = getattr(node, part)
        if hasattr(node, "set_attn_implementation") and hasattr(node, "config"):
            return node
    return None


def _hf(m: nn.Module, _path: str) -> Plan | None:
    cls = type(m)
    if not cls.__module__.startswith("transformers.") or not cls.__name__.endswith("Attention"):
        return None
    # ViT / DeiT / DINOv2 call it num_attention_heads, CLIP / SigLIP num_heads
    heads = getattr(m, "num_attention_heads", None) or getattr(m, "num_heads", None)
    if not hasattr(getattr(m, "config", None), "_attn_implementation") or not isinstance(heads, int):
        return None
    return Plan("transformers", heads, {"probs": Point(m, _output1)}, swap=HfSwap(m))  # HfEager added by caller


def _hf_beit(m: nn.Module, _path: str) -> Plan | None:
    """HF BEiT-like self-attention (BEiT, Data2VecVision): returns its map only when asked per call, and its sdpa
    subclass never builds one; the eager parent class computes the same function with the map."""
    cls = type(m)
    if not cls.__module__.startswith("transformers.") or not cls.__name__.endswith("SelfAttention") or not hasattr(
            m, "has_relative_position_bias") or not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return None
    eager = next((c for c in cls.__mro__ if c.__name__ == cls.__name__.replace("Sdpa", "", 1)), None)
    if eager is None or not isinstance(getattr(m, "num_attention_heads", None), int):
        return None
    patches: list[Patch] = [SetAttr(m, "__class__", eager)] if eager is not cls else []
    return Plan("transformers-beit", m.num_attention_heads, {"probs": Point(m.dropout, _input0)}, patches)


def _mha(m: nn.Module, path: str) -> Plan | None:
    if not isinstance(m, nn.MultiheadAttention):
        return None
    if path.endswith("head.attention"):  # SigLIP's pooling head: one learned query, a [B, H, 1, N] map
        return None
    why = mha_refusal(m)
    return Plan("torch-mha", m.num_heads, {"probs": Point(m, _output1)}, [MhaFastPathOff(), MhaWeights(m)],
                swap=None if why else MhaSwap(m), swap_refusal=why)


ADAPTERS: tuple[Callable[[nn.Module, str], Plan | None], ...] = (
    _ours, _timm_cait, _timm, _vit_pytorch, _hf_beit, _hf, _mha)
LOOKED_FOR = ("collapse_probe Attention; timm Attention/AttentionRope/BEiT/EVA/RelPos attention and CaiT "
              "TalkingHeadAttn; vit-pytorch Attention (ViT, SimpleViT, T2TViT, CrossViT, CaiT, DeepViT); "
              "transformers *Attention modules (ViT, DeiT, DINOv2, CLIP, SigLIP, ViT-MAE, BEiT, Data2VecVision, ...); "
              "torch.nn.MultiheadAttention (torchvision vit_b_16)")


def match(m: nn.Module, path: str = "") -> Plan | None:
    """The first adapter's plan for module ``m`` at ``path`` (raw module path), or None."""
    _refuse(m, path)
    for adapter in ADAPTERS:
        plan = adapter(m, path)
        if plan is not None:
            return plan
    return None
