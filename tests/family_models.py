"""Tiny random-init models of every supported family and ways to save them (layouts x formats), for the tests.

    model = FAMILIES["timm-beit"]()               # eval mode, 32 px input (EVA: 28 px)
    path = save_weights(model.state_dict(), tmp_path / "w.pt", "lightning", "torch")
    folder = save_folder("hf-vit", model, tmp_path / "hf")
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

import collapse_probe.models  # noqa: F401  (registers our presets)

TIMM_SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
TIMM_W192 = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=10)
VP = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)
HF = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=64, num_labels=10)


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    cfg_cls, model_cls = {"vit": (tf.ViTConfig, tf.ViTForImageClassification),
                          "deit": (tf.DeiTConfig, tf.DeiTForImageClassificationWithTeacher),
                          "dinov2": (tf.Dinov2Config, tf.Dinov2Model)}[kind]
    return model_cls(cfg_cls(**HF))


def _vp(name: str) -> nn.Module:
    from vit_pytorch import ViT
    from vit_pytorch.cait import CaiT
    from vit_pytorch.deepvit import DeepViT

    return {"ViT": lambda: ViT(**VP), "CaiT": lambda: CaiT(**VP, cls_depth=1), "DeepViT": lambda: DeepViT(**VP)}[name]()


EVA_ARGS = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=4, num_classes=10)
CAIT_ARGS = dict(TIMM_SMALL, depth_token_only=1)

# name -> builder; every model expects [B, 3, 32, 32] except EVA (28 px)
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "ours": lambda: timm.create_model("deepvit_micro", depth=3),
    "timm-vit": lambda: timm.create_model("vit_tiny_patch16_224", **TIMM_W192),
    "timm-vit-reg-qknorm-ls": lambda: timm.create_model("vit_tiny_patch16_224", qk_norm=True, init_values=1e-5,
                                                        reg_tokens=2, no_embed_class=True, **TIMM_SMALL),
    "timm-deit-distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", **TIMM_W192),
    "timm-beit": lambda: timm.create_model("beit_base_patch16_224", **TIMM_SMALL),
    "timm-eva": lambda: timm.create_model("eva02_tiny_patch14_224", **EVA_ARGS),
    "timm-cait": lambda: timm.create_model("cait_xxs24_224", **CAIT_ARGS),
    "torchvision": lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                num_heads=3, hidden_dim=192, mlp_dim=384,
                                                                num_classes=10),
    "hf-vit": lambda: _hf("vit"),
    "hf-deit": lambda: _hf("deit"),
    "hf-dinov2": lambda: _hf("dinov2"),
    "vit-pytorch-vit": lambda: _vp("ViT"),
    "vit-pytorch-cait": lambda: _vp("CaiT"),
    "vit-pytorch-deepvit": lambda: _vp("DeepViT"),
}
# families that need a folder (config.json) because their weights do not determine the architecture
TIMM_FOLDER = {"timm-eva": ("eva02_tiny_patch14_224", EVA_ARGS), "timm-cait": ("cait_xxs24_224", CAIT_ARGS)}
# expected heads source (substring) when the architecture is inferred from shapes, and --num-heads to pass
INFERRED = {
    "timm-vit": ("standard width->heads table", None), "timm-vit-reg-qknorm-ls": ("q/k-norm", None),
    "timm-deit-distilled": ("standard width->heads table", None), "timm-beit": ("relative-position table", None),
    "torchvision": ("standard width->heads table", None), "vit-pytorch-vit": ("--num-heads", 4),
    "vit-pytorch-cait": ("talking-heads matrix", None), "vit-pytorch-deepvit": ("re-attention matrix", None),
}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().eval()


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    size = 28 if name == "timm-eva" else 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    if isinstance(y, torch.Tensor):
        return y
    return y.logits if getattr(y, "logits", None) is not None else y.last_hidden_state


LAYOUTS: dict[str, Callable[[dict], object]] = {
    "bare": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "state_dict_ema": lambda sd: {"state_dict_ema": sd, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
    "model": lambda sd: {"model": sd, "epoch": 3},
    "model_ema": lambda sd: {"model_ema": sd, "step": 7},
    "teacher_student": lambda sd: {"teacher": sd, "student": {k: v + 1 for k, v in sd.items()}, "epoch": 1},
    "lightning": lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1,
                             "global_step": 10, "pytorch-lightning_version": "2.4.0"},
    "ddp_compile": lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
    "prefixed_bare": lambda sd: {f"_orig_mod.module.{k}": v for k, v in sd.items()},
}
FLAT_LAYOUTS = ("bare", "prefixed_bare")  # the only ones a safetensors file can hold


def save_weights(sd: dict[str, torch.Tensor], path: Path, layout: str, fmt: str) -> Path:
    obj = LAYOUTS[layout]({k: v.detach().clone().contiguous() for k, v in sd.items()})
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def save_folder(name: str, model: nn.Module, folder: Path, weights: str = "model.safetensors") -> Path:
    """A HuggingFace folder (save_pretrained) or a timm folder (config.json with architecture + model_args)."""
    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("hf-"):
        model.save_pretrained(folder)
    else:
        arch, args = TIMM_FOLDER[name]
        cfg = {"architecture": arch, "num_classes": args["num_classes"],
               "model_args": {k: v for k, v in args.items() if k != "num_classes"},
               "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
        (folder / "config.json").write_text(json.dumps(cfg))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    if weights == "pytorch_model.bin":
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        (folder / "model.safetensors").unlink()
        torch.save(sd, folder / "pytorch_model.bin")
    return folder
