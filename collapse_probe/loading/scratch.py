"""What a state dict of no library layout looks like, so the refusal can say what was recognised and where to go.

    raise scratch_refusal(state_dict)   # UnsupportedLayoutError (exit 5), one line:
    # "cannot infer the architecture from the file alone: it is a ViT built on nn.MultiheadAttention:
    #  blocks.N.attn.in_proj_weight, a model of your own rather than a library layout we know (keys: ...); pass its
    #  code: --model-code my_vit.py --model MyViT --model-args '{"depth": 6}' (the class or function that builds it)"

From-scratch ViTs (the code researchers write themselves) have attention weights in one of a few recognisable forms:
``nn.MultiheadAttention`` (``in_proj_weight``; inside ``nn.TransformerEncoder`` as ``layers.N.self_attn``), per-head
``nn.Linear`` query / key / value modules, separate q / k / v projections, or a fused qkv projection. None of them
fixes the forward (norm placement, pooling, scale, token layout), so the file alone never suffices: the user's code
does.
"""
from __future__ import annotations

import re

from ..errors import UnsupportedLayoutError
from .heads import SD

EXAMPLE = "--model-code my_vit.py --model MyViT --model-args '{\"depth\": 6}'"
# (pattern on a key, what it shows); first match wins, so the more specific forms come first
_FORMS = (
    (re.compile(r"(^|\.)layers\.\d+\.self_attn\.in_proj_weight$"),
     "nn.TransformerEncoder layers (nn.MultiheadAttention)"),
    (re.compile(r"(^|\.)in_proj_weight$"), "a ViT built on nn.MultiheadAttention"),
    (re.compile(r"(^|\.)heads?\.\d+\.(q|k|v|query|key|value|to_q|to_k|to_v|q_proj|k_proj|v_proj)\.weight$"),
     "per-head query/key/value nn.Linear modules"),
    (re.compile(r"(^|\.)(q|query|q_proj|to_q|wq|q_linear)\.weight$"), "separate query/key/value projections"),
    (re.compile(r"(^|\.)(qkv|to_qkv|qkv_proj|c_attn|wqkv|qkv_linear)\.weight$"), "a fused qkv projection"),
)


def generic(key: str) -> str:
    """``blocks.3.attn.heads.1.q.weight`` -> ``blocks.N.attn.heads.N.q.weight``."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "N", key)


def recognise(sd: SD) -> str | None:
    """What attention the keys show ("a ViT built on nn.MultiheadAttention: blocks.N.attn.in_proj_weight"), or None."""
    for rx, what in _FORMS:
        hit = next((k for k in sd if rx.search(k)), None)
        if hit is not None:
            return f"{what}: {generic(hit)}"
    return None


_LIBRARY_MARKS = ("patch_embed.proj.weight", "conv_proj.weight", "to_patch_embedding.2.weight",
                  "to_patch_embedding.1.weight", "patch_to_embedding.weight")


def scratch_refusal(sd: SD) -> UnsupportedLayoutError:
    """The one-line refusal for a layout of no library we know, naming what was recognised and pointing to
    ``--model-code`` (or to ``--prefix`` when library models sit under first-level names, e.g. teacher / student)."""
    nested = sorted({k.split(".", 1)[0] for k in sd if "." in k and k.split(".", 1)[1] in _LIBRARY_MARKS})
    if nested:
        return UnsupportedLayoutError(f"cannot infer the architecture: the file holds library models under "
                                      f"{', '.join(repr(n + '.') for n in nested)}; pass --prefix NAME to choose one")
    what = recognise(sd)
    keys = ", ".join(dict.fromkeys(generic(k) for k in sd))
    keys = keys if len(keys) <= 120 else keys[:117].rsplit(", ", 1)[0] + ", ..."
    if what is None:
        return UnsupportedLayoutError(f"cannot infer the architecture: no attention layout we know in the keys "
                                      f"({keys}); if it is your own model, pass its code: {EXAMPLE}")
    return UnsupportedLayoutError(f"cannot infer the architecture from the file alone: it is {what}, a model of your "
                                  f"own rather than a library layout we know (keys: {keys}); pass its code: "
                                  f"{EXAMPLE} (the class or function that builds it)")
