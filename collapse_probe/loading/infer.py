"""Guess a ViT's architecture from the shapes in its state dict (pure functions; nothing is downloaded or executed).

    spec = infer_architecture(state_dict, num_heads=None)   # -> ArchSpec or UnsupportedLayoutError
    model = instantiate(spec)                                # random init; load the weights afterwards
    print(spec.name, spec.kwargs, spec.heads, spec.heads_source)

Recognised layouts: timm VisionTransformer / DeiT (incl. distilled) / BEiT, torchvision VisionTransformer and
vit-pytorch ViT, DeepViT and CaiT. Depth, width, patch size, channels, MLP ratio, class / distillation / register
tokens, layer scale and class count are read from shapes.

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

import math
import re
from typing import Any

from ..errors import UnsupportedLayoutError
from . import official
from .heads import GUESS, SD, ArchSpec, decide_heads, head_evidence  # noqa: F401  (re-exported: the heads rule)


def _depth(sd: SD, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def _square(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n and r > 0 else None


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
    if "fc_norm.weight" in sd:
        kw.update(fc_norm=True, global_pool="avg")
        notes.append("fc_norm present: global average pooling assumed")
    elif not cls_tok:
        kw.update(global_pool="avg")
    name = "deit_base_distilled_patch16_224" if dist else "vit_base_patch16_224"
    return ArchSpec("timm", name, kw, heads, source, (chans, grid * ph, grid * pw), notes)


def _torchvision(sd: SD, num_heads: int | None) -> ArchSpec:
    dim, chans, p, _ = (int(s) for s in sd["conv_proj.weight"].shape)
    depth = _depth(sd, r"encoder\.layers\.encoder_layer_(\d+)\.")
    l0 = "encoder.layers.encoder_layer_0."
    fc1 = sd.get(f"{l0}mlp.0.weight", sd.get(f"{l0}mlp.linear_1.weight"))
    if chans != 3:
        raise UnsupportedLayoutError(f"torchvision ViT with {chans} input channels is not supported (3 expected)")
    grid = _square(int(sd["encoder.pos_embedding"].shape[1]) - 1)
    if grid is None or fc1 is None:
        raise UnsupportedLayoutError("torchvision ViT with an unreadable grid or MLP; pass --model NAME")
    heads, source = decide_heads(dim, None, num_heads, int(fc1.shape[0]) / dim)
    rep = sd.get("heads.pre_logits.weight")
    kw = dict(image_size=grid * p, patch_size=p, num_layers=depth, num_heads=heads, hidden_dim=dim,
              mlp_dim=int(fc1.shape[0]), num_classes=int(sd["heads.head.weight"].shape[0]),
              representation_size=int(rep.shape[0]) if rep is not None else None)
    return ArchSpec("torchvision", "VisionTransformer", kw, heads, source, (3, grid * p, grid * p))


def _vit_pytorch(sd: SD, num_heads: int | None) -> ArchSpec:
    dim, patch_dim = (int(s) for s in sd["to_patch_embedding.2.weight"].shape)
    chans = 3 if _square(patch_dim // 3) and patch_dim % 3 == 0 else 1
    p = _square(patch_dim // chans)
    cait = any(k.startswith("patch_transformer.") for k in sd)
    tokens = int(sd["pos_embedding"].shape[-2])
    grid = _square(tokens if cait else tokens - 1)
    if p is None or grid is None:
        raise UnsupportedLayoutError("vit-pytorch model with an unreadable patch size or grid; pass --model NAME")
    if cait:
        pre, name = "patch_transformer.layers.", "CaiT"
        inner = int(sd[f"{pre}0.0.fn.to_q.weight"].shape[0])
        mix = sd[f"{pre}0.0.fn.mix_heads_pre_attn"]
        evidence = (int(mix.shape[0]), f"talking-heads matrix shape {tuple(mix.shape)}")
        mlp = int(sd[f"{pre}0.1.fn.net.1.weight"].shape[0])
    else:
        pre = "transformer.layers."
        inner = int(sd[f"{pre}0.0.to_qkv.weight"].shape[0]) // 3
        mlp = int(sd[f"{pre}0.1.net.1.weight"].shape[0])
        reattn = sd.get(f"{pre}0.0.reattn_weights")
        name = "DeepViT" if reattn is not None else "ViT"
        evidence = (int(reattn.shape[0]), f"re-attention matrix shape {tuple(reattn.shape)}") if reattn is not None \
            else None
    if evidence is None and num_heads is None and inner % 64 == 0:
        # vit-pytorch's to_qkv holds heads x dim_head columns for any split: 64 is only its default dim_head
        heads, source = inner // 64, f"vit-pytorch default head size 64 (dim_head); {GUESS}"
    else:
        heads, source = decide_heads(inner, evidence, num_heads)
    head = sd.get("mlp_head.weight", sd.get("mlp_head.1.weight"))
    kw: dict[str, Any] = dict(image_size=grid * p, patch_size=p, num_classes=int(head.shape[0]) if head is not None
                              else 0, dim=dim, depth=_depth(sd, re.escape(pre) + r"(\d+)\."), heads=heads,
                              mlp_dim=mlp, dim_head=inner // heads)
    if cait:
        kw["cls_depth"] = _depth(sd, r"cls_transformer\.layers\.(\d+)\.")
    else:
        kw["channels"] = chans
    return ArchSpec("vit-pytorch", name, kw, heads, source, (chans, grid * p, grid * p),
                    ["vit-pytorch pooling cannot be read from weights: 'cls' assumed"] if not cait else [])


def infer_architecture(sd: SD, num_heads: int | None = None) -> ArchSpec:
    """The architecture a state dict (wrapper prefixes already stripped) was saved from, by its shapes."""
    sd = official.to_ours(sd)
    try:
        if official.is_ours(sd):
            return official.infer_deepvit(sd, num_heads)
        if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
            return _timm(sd, num_heads)
        if "conv_proj.weight" in sd and "encoder.pos_embedding" in sd:
            return _torchvision(sd, num_heads)
        if "to_patch_embedding.2.weight" in sd and "pos_embedding" in sd:
            return _vit_pytorch(sd, num_heads)
    except KeyError as e:
        raise UnsupportedLayoutError(f"partly recognised layout, but key {e} is missing; pass --model NAME") from e
    if any(k.startswith(("embeddings.patch_embeddings", "vit.", "deit.", "dinov2.")) for k in sd):
        raise UnsupportedLayoutError("this looks like a HuggingFace transformers state dict: pass the model folder "
                                     "(config.json + model.safetensors) instead of the weights file")
    some = ", ".join(list(sd)[:4])
    raise UnsupportedLayoutError(f"cannot infer the architecture from the weights (keys like {some}); pass "
                                 "--model NAME (a timm name, e.g. vit_small_patch16_224)")
