"""HuggingFace transformers model folders: a model from config.json and the weights we already read safely.

    model, what = build_transformers(ckpt)        # what: "transformers:ViTForImageClassification"
    data = hf_data_config(ckpt)                   # mean / std from preprocessor_config.json, input size from config

No network and no remote code: the config is read from the local folder only, a config that would make the loader
open other files or download (``steering_keys``) is refused, and so are quantized checkpoints.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RefusedContentError, UnsupportedLayoutError, first_line
from .bounds import check_hf_config
from .read import Checkpoint
from .safety import steering_keys
from .weights import within_weights


def build_transformers(ckpt: Checkpoint) -> tuple[nn.Module, str]:
    """A transformers model from a local folder's config.json and the weights we read safely: no network, no remote
    code. transformers itself maps older key names (``attention.attention.query`` ...) onto the current modules.
    """
    import transformers

    check_hf_config(ckpt.config, ckpt.state_dict, ckpt.path)  # a 256-byte config may not ask for 100 000 layers
    try:
        config = transformers.AutoConfig.from_pretrained(str(ckpt.path), local_files_only=True,
                                                         trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedLayoutError(f"cannot read {ckpt.path}/config.json with transformers: {first_line(e)}") \
            from e
    _refuse_steering_hf_config(ckpt.path, config)
    names = [n for n in (config.architectures or []) if isinstance(n, str)]
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and isinstance(config, cls.config_class)):  # a class of another model type would misread the config
        mapping = getattr(transformers.AutoModel, "_model_mapping", None)
        cls = mapping.get(type(config), None) if mapping is not None else None
        if cls is None:
            raise UnsupportedLayoutError(f"{ckpt.path}/config.json names no transformers model class we can build "
                                         f"(architectures: {names or 'none'})")
    what = f"transformers:{cls.__name__}"
    with _quiet_transformers():
        within_weights(lambda: cls(config), ckpt.state_dict, what, strict=False)
        try:
            model, loading = cls.from_pretrained(None, config=config, state_dict=ckpt.state_dict,
                                                 output_loading_info=True)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UnsupportedLayoutError(f"checkpoint does not fit {what}: {first_line(e)}") from e
    problems = [f"{len(v)} {k.replace('_', ' ')} (e.g. {', '.join(sorted(map(str, v))[:3])})"
                for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    if problems:
        raise UnsupportedLayoutError(f"checkpoint does not fit {what}: " + "; ".join(problems))
    return model, what


def _refuse_steering_hf_config(path: Path, config: Any) -> None:
    """A config.json may not make a loader open other files (timm_wrapper's checkpoint_path ...) or need quantisation
    libraries: refused with one line instead of following it."""
    cfg = config.to_dict()
    nested = [cfg, *(v for v in cfg.values() if isinstance(v, dict))]
    steering = sorted({k for d in nested for k in steering_keys(d)})
    if steering:
        raise RefusedContentError(f"refused {path}: config.json sets {', '.join(steering)}, which would make the "
                                  "loader open other files or download")
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UnsupportedLayoutError(f"{path}: quantized checkpoints ({method}) are not supported; pass the "
                                     "full-precision weights")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and warnings would break our one-line stderr; silenced while building."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def hf_data_config(ckpt: Checkpoint) -> dict[str, Any]:
    pre, cfg = ckpt.preprocessor, ckpt.config
    out: dict[str, Any] = {}
    if pre.get("image_mean") and pre.get("image_std"):
        out.update(mean=tuple(pre["image_mean"]), std=tuple(pre["image_std"]))
    size = cfg.get("image_size")
    if isinstance(size, int):
        out["input_size"] = (int(cfg.get("num_channels", 3)), size, size)
    return out
