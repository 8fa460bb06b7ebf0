"""collapse-probe: measure attention collapse in Vision Transformers (DeepViT, Zhou et al. 2021).

    >>> import timm, collapse_probe
    >>> model = timm.create_model("deepvit_micro")
    >>> with collapse_probe.capture(model) as cap:
    ...     model(torch.randn(2, 3, 32, 32))
    >>> cap.maps["blocks.0.attn.probs"].shape     # [B, H, N, N]
"""
__version__ = "0.1.0"

from . import models  # noqa: F401  (registers the timm models)
