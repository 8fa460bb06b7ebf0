"""ViT / DeepViT models registered with timm; importing this package registers them."""
from .attention import Attention, HeadLayerNorm, HookPoint
from .presets import PAPER_PRESETS, create
from .vit import Block, ConvStemEmbed, DeepVisionTransformer, resolve_reattn_blocks

__all__ = [
    "Attention", "Block", "ConvStemEmbed", "DeepVisionTransformer", "HeadLayerNorm", "HookPoint", "PAPER_PRESETS",
    "create", "resolve_reattn_blocks",
]
