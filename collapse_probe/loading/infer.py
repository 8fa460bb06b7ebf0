"""Guess a ViT's architecture from the shapes in its state dict (pure functions; nothing is downloaded or executed).

    spec = infer_architecture(state_dict, num_heads=None)   # -> ArchSpec or UnsupportedLayoutError
    model = instantiate(spec)                                # random init; load the weights afterwards
    print(spec.name, spec.kwargs, spec.heads, spec.heads_source)

Recognised layouts: timm VisionTransformer / DeiT (incl. distilled) / BEiT / CaiT, torchvision VisionTransformer and
vit-pytorch ViT, DeepViT, CaiT, SimpleViT, T2TViT, CrossViT (``loading.vitpytorch``). Depth, width, patch size,
channels, MLP ratio, class / distillation / register tokens, layer scale and class count are read from shapes.
Anything else is refused in one line naming the attention form recognised (``loading.scratch``: nn.MultiheadAttention,
per-head q/k/v modules, ...) and pointing to ``--model-code``. Recognised and refused with the reason (exit 5): timm
EVA / EVA-02 (its rotary position embedding is set by the model name, not stored: pass --model NAME), Swin (windowed
attention) and XCiT (attention over channels).

Heads rule: the number of heads is not visible in fused qkv weights, so it is decided, in order, by
  1. a per-head shape anywhere in the file (``head_evidence``): per-head q/k-norm weights ([head_dim]),
     relative-position bias tables ([R, heads]) or MLPs ([heads, hidden]), re-attention Θ ([heads, heads, 1, 1],
     ours and official) or talking-heads matrices ([heads, heads]); two that disagree are an error;
  2. ``--num-heads`` (an error if it contradicts 1);
  3. a known family by width and MLP ratio (384 wide, ratio 3: the DeepViT paper's ViT-16B/24B/32B, 12 heads;
     384, ratio 4: timm/DeiT ViT-S, 6 heads), else the standard width -> heads table of ViT papers / timm
     (192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, ...). Both are guesses and ``heads_source`` says "guess";
     any other width is an error asking for --num-heads (vit-pytorch files: its default head size 64, also a guess).
``ArchSpec.heads_source`` says which one decided, and it is printed in every report.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import UnsupportedLayoutError, UnsupportedModelError
from ..hooks.adapters import REFUSED
from . import official
from .heads import GUESS, SD, ArchSpec, decide_heads, head_evidence  # noqa: F401  (re-exported: the heads rule)
from .heads import layer_count as _depth
from .heads import square_side as _square
from .scratch import EXAMPLE, scratch_refusal
from .vitpytorch import infer_vit_pytorch


def _timm(sd: SD, num_heads: int | None) -> ArchSpec:
    w = sd["patch_embed.proj.weight"]
    dim, chans, ph, pw = (int(s) for s in w.shape)
    depth = _depth(sd, r"blocks\.(\d+)\.")
    b0 = "blocks.0."
    beit = any(k.endswith("relative_position_bias_table") for k in sd) or f"{b0}attn.q_bias" in sd
    attn_dim = int(sd[f"{b0}attn.qkv.weight"].shape[0]) // 3
    evidence = head_evidence(sd, attn_dim)
    table = sd.get(f"{b0}attn.relative_position_bias_table", sd.get("rel_pos_bias.relative_position_bias_table"))
    mlp_ratio = int(sd[f"{b0}mlp.fc1.weight"].shape[0]) / dim if f"{b0}mlp.fc1.weight" in sd else 4.0
    heads, source = decide_heads(attn_dim, evidence, num_heads, mlp_ratio)
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    kw: dict[str, Any] = dict(patch_size=(ph, pw) if ph != pw else ph, in_chans=chans, embed_dim=dim, depth=depth,
                              num_heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes)
    notes = []
    if beit:
        grid = None
        if table is not None:
            side = _square(int(table.shape[0]) - 3)  # (2W-1)^2 relative offsets + 3 class-token entries
            grid = (side + 1) // 2 if side else None
        if grid is None and "pos_embed" in sd:
            grid = _square(int(sd["pos_embed"].shape[1]) - 1)
        if grid is None and table is None and "pos_embed" not in sd:  # timm's RoPE ViTs (eva.py) store no positions
            raise UnsupportedLayoutError("no position embedding or relative-position table in the weights: rotary "
                                         "position embedding (timm RoPE ViT / EVA), whose settings are not stored; "
                                         "pass --model NAME")
        if grid is None:
            raise UnsupportedLayoutError("BEiT-like checkpoint without a readable grid size; pass --model NAME")
        kw.update(img_size=grid * ph, qkv_bias=f"{b0}attn.q_bias" in sd, use_abs_pos_emb="pos_embed" in sd,
                  use_rel_pos_bias=f"{b0}attn.relative_position_bias_table" in sd,
                  use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in sd,
                  init_values=0.1 if f"{b0}gamma_1" in sd else None, use_fc_norm="fc_norm.weight" in sd,
                  global_pool="avg" if "fc_norm.weight" in sd else "token")
        return ArchSpec("timm", "beit_base_patch16_224", kw, heads, source, (chans, grid * ph, grid * pw), notes)
    cls_tok, dist = "cls_token" in sd, "dist_token" in sd
    regs = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    prefix = int(cls_tok) + int(dist) + regs
    if "pos_embed" not in sd:
        raise UnsupportedLayoutError("timm ViT without pos_embed (rope or no position embedding); pass --model NAME")
    tokens = int(sd["pos_embed"].shape[1])
    no_embed_class = False
    grid = _square(tokens - prefix)
    if grid is None and _square(tokens):
        grid, no_embed_class = _square(tokens), True
    if grid is None:
        raise UnsupportedLayoutError(f"cannot read a square patch grid from pos_embed {tuple(sd['pos_embed'].shape)} "
                                     f"with {prefix} prefix tokens; pass --model NAME")
    kw.update(img_size=grid * ph, qkv_bias=f"{b0}attn.qkv.bias" in sd, qk_norm=f"{b0}attn.q_norm.weight" in sd,
              init_values=1e-5 if f"{b0}ls1.gamma" in sd else None, class_token=cls_tok, reg_tokens=regs,
              no_embed_class=no_embed_class, pre_norm="norm_pre.weight" in sd)
    if "attn_pool.latent" in sd:  # SigLIP-style attention-pool (MAP) head; its one-query map is not probed
        kw.update(global_pool="map", fc_norm=False)
        notes.append("attn_pool present: attention-pool (MAP) head, as SigLIP")
    elif "fc_norm.weight" in sd:
        kw.update(fc_norm=True, global_pool="avg")
        notes.append("fc_norm present: global average pooling assumed")
    elif not cls_tok:
        kw.update(global_pool="avg")
    name = "deit_base_distilled_patch16_224" if dist else "vit_base_patch16_224"
    return ArchSpec("timm", name, kw, heads, source, (chans, grid * ph, grid * pw), notes)


def _cait(sd: SD, num_heads: int | None) -> ArchSpec:
    """timm Cait: talking-heads blocks, then class-attention blocks (``blocks_token_only``); pos_embed has no class
    token entry."""
    dim, chans, ph, pw = (int(s) for s in sd["patch_embed.proj.weight"].shape)
    b0, t0 = "blocks.0.", "blocks_token_only.0."
    grid = _square(int(sd["pos_embed"].shape[1]))
    if grid is None or "cls_token" not in sd:
        raise UnsupportedLayoutError(f"CaiT-like checkpoint with pos_embed {tuple(sd['pos_embed'].shape)}: not a "
                                     "square patch grid (or no class token); pass --model NAME")
    attn_dim = int(sd[f"{b0}attn.qkv.weight"].shape[0]) // 3
    mlp_ratio = int(sd[f"{b0}mlp.fc1.weight"].shape[0]) / dim
    heads, source = decide_heads(attn_dim, head_evidence(sd, attn_dim), num_heads, mlp_ratio)
    kw: dict[str, Any] = {"img_size": grid * ph, "patch_size": (ph, pw) if ph != pw else ph, "in_chans": chans,
                          "embed_dim": dim, "depth": _depth(sd, r"blocks\.(\d+)\."), "num_heads": heads,
                          "mlp_ratio": mlp_ratio, "qkv_bias": f"{b0}attn.qkv.bias" in sd,
                          "depth_token_only": _depth(sd, r"blocks_token_only\.(\d+)\."),
                          "mlp_ratio_token_only": int(sd[f"{t0}mlp.fc1.weight"].shape[0]) / dim,
                          "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0}
    return ArchSpec("timm", "cait_xxs24_224", kw, heads, source, (chans, grid * ph, grid * pw))


_EVA_MARKS = {"blocks.0.mlp.fc1_g.weight": "SwiGLU MLP", "blocks.0.mlp.norm.weight": "MLP sub-norm",
              "blocks.0.attn.norm.weight": "attention sub-norm", "blocks.0.attn.q_proj.weight": "separate q/k/v"}


def _eva_mark(sd: SD) -> str | None:
    """What makes ``sd`` a timm EVA / EVA-02 (not BEiT) state dict, or None."""
    for key, what in _EVA_MARKS.items():
        if key in sd and "patch_embed.proj.weight" in sd:
            return f"{what}, {key}"
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if "blocks.0.attn.q_bias" in sd and not any(k.endswith("relative_position_bias_table") for k in sd) \
            and fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        return f"packed SwiGLU MLP {tuple(fc1.shape)} -> {tuple(fc2.shape)}, q/v bias, no relative-position table"
    return None


_SWIN = re.compile(r"layers\.\d+\.blocks\.\d+\.attn\.(relative_position_bias_table|logit_scale|cpb_mlp)")
_XCIT = re.compile(r"blocks\.\d+\.attn\.temperature$")


def _refuse_family(sd: SD) -> None:
    """Families whose weights are recognisable but whose maps are not token-to-token (exit 5, the reason)."""
    for rx, (module, cls), family in ((_SWIN, ("timm.", "WindowAttention"), "Swin"),
                                      (_XCIT, ("timm.", "XCA"), "XCiT")):
        hit = next((k for k in sd if rx.match(k)), None)
        if hit is not None:
            raise UnsupportedModelError(f"{family} state dict ({hit}): {REFUSED[(module, cls)]}")


def _torchvision(sd: SD, num_heads: int | None) -> ArchSpec:
    dim, chans, p, _ = (int(s) for s in sd["conv_proj.weight"].shape)
    depth = _depth(sd, r"encoder\.layers\.encoder_layer_(\d+)\.")
    l0 = "encoder.layers.encoder_layer_0."
    fc1 = sd.get(f"{l0}mlp.0.weight", sd.get(f"{l0}mlp.linear_1.weight"))
    grid = _square(int(sd["encoder.pos_embedding"].shape[1]) - 1)
    if grid is None or fc1 is None:
        raise UnsupportedLayoutError("torchvision ViT with an unreadable grid or MLP; pass --model NAME")
    heads, source = decide_heads(dim, None, num_heads, int(fc1.shape[0]) / dim)
    rep = sd.get("heads.pre_logits.weight")
    kw = dict(image_size=grid * p, patch_size=p, num_layers=depth, num_heads=heads, hidden_dim=dim,
              mlp_dim=int(fc1.shape[0]), num_classes=int(sd["heads.head.weight"].shape[0]),
              representation_size=int(rep.shape[0]) if rep is not None else None)
    notes = []
    if chans != 3:  # torchvision builds conv_proj for 3 channels; ``build.instantiate`` swaps in a chans-channel one
        kw["in_channels"] = chans
        notes.append(f"{chans} input channel(s) (conv_proj {tuple(sd['conv_proj.weight'].shape)}): torchvision's "
                     "patch convolution rebuilt for them")
    return ArchSpec("torchvision", "VisionTransformer", kw, heads, source, (chans, grid * p, grid * p), notes)


def infer_architecture(sd: SD, num_heads: int | None = None) -> ArchSpec:
    """The architecture a state dict (wrapper prefixes already stripped) was saved from, by its shapes."""
    sd = official.to_ours(sd)
    _refuse_family(sd)
    try:
        if official.is_ours(sd):
            return official.infer_deepvit(sd, num_heads)
        eva = _eva_mark(sd)
        if eva is not None:
            raise UnsupportedLayoutError(f"timm EVA / EVA-02 state dict ({eva}): its rotary position embedding is set "
                                         "by the model name, not stored in the weights, so it cannot be inferred; pass "
                                         "--model NAME (e.g. eva02_tiny_patch14_224, eva02_base_patch14_224)")
        if "patch_embed.proj.weight" in sd and "blocks_token_only.0.attn.q.weight" in sd \
                and "blocks.0.attn.qkv.weight" in sd:
            return _cait(sd, num_heads)
        if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
            return _timm(sd, num_heads)
        if "conv_proj.weight" in sd and "encoder.pos_embedding" in sd:
            return _torchvision(sd, num_heads)
        spec = infer_vit_pytorch(sd, num_heads)
        if spec is not None:
            return spec
    except KeyError as e:
        raise UnsupportedLayoutError(f"partly recognised layout, but key {e} is missing; pass --model NAME (a timm "
                                     f"name), or your model's code: {EXAMPLE}") from e
    if any(k.startswith(("embeddings.patch_embeddings", "vit.", "deit.", "dinov2.")) for k in sd):
        raise UnsupportedLayoutError("this looks like a HuggingFace transformers state dict: pass the model folder "
                                     "(config.json + model.safetensors) instead of the weights file")
    raise scratch_refusal(sd)
