"""Which keys of a state dict are the model's, and under which prefix (pure functions on dicts of tensors).

    sd, kept = model_keys(raw, prefix=None, lightning=False)    # kept: KeySelection or None (nothing dropped)

1. ``--prefix PREFIX`` (``prefix``): only the keys under PREFIX are the model's; it is removed, the rest dropped.
2. A PyTorch Lightning file (``lightning``: it has ``pytorch-lightning_version``) stores the LightningModule's
   state dict: the model under its attribute name (``model.``, ``net.``, ...) next to loss buffers and metric states
   (``criterion.weight``). The model's keys are those under the first-level name holding the most values, provided
   every key outside it is a buffer of at most one dimension; otherwise nothing is dropped (pass ``--prefix``).
3. Then, always: wrapper prefixes shared by every remaining key (``module.`` DDP, ``_orig_mod.`` torch.compile,
   ``model.``) are stripped, repeatedly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import BadArgumentError

SD = dict[str, torch.Tensor]
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class KeySelection:
    """The keys under ``prefix`` were kept as the model's; ``dropped`` were not. ``why``: "--prefix" or "Lightning"."""

    prefix: str
    why: str
    kept: int
    dropped: list[str] = field(default_factory=list)

    def note(self) -> str:
        """One line for ``ModelInfo.notes``."""
        what = "--prefix" if self.why == "--prefix" else "a Lightning file: the LightningModule's model"
        left = (f"; left out {len(self.dropped)} key(s) outside it: {', '.join(self.dropped[:4])}"
                f"{', ...' if len(self.dropped) > 4 else ''}") if self.dropped else ""
        return f"kept the {self.kept} keys under '{self.prefix}' ({what}){left}"


def strip_prefixes(sd: SD) -> SD:
    """Remove DDP / torch.compile / Lightning wrappers (``module.``, ``_orig_mod.``, ``model.``) shared by every key."""
    changed = True
    while changed and sd:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd, changed = {k[len(p):]: v for k, v in sd.items()}, True
    return sd


def _first_names(sd: SD) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in sd})


def under_prefix(sd: SD, prefix: str) -> tuple[SD, KeySelection]:
    """The keys under ``prefix`` (a trailing dot optional), with it removed; the others dropped."""
    p = prefix.strip().rstrip(".") + "."
    if p == ".":
        raise BadArgumentError("--prefix needs a non-empty prefix such as model or model.backbone")
    kept = {k[len(p):]: v for k, v in sd.items() if k.startswith(p) and len(k) > len(p)}
    if not kept:
        raise BadArgumentError(f"--prefix {prefix}: no key starts with '{p}' (first-level names in the file: "
                               f"{', '.join(_first_names(sd)[:8])})")
    return kept, KeySelection(p, "--prefix", len(kept), [k for k in sd if not k.startswith(p)])


def lightning_model(sd: SD) -> tuple[SD, KeySelection | None]:
    """The LightningModule's model: the first-level name holding the most values, if all else is small buffers."""
    size: dict[str, int] = {}
    for k, v in sd.items():
        if "." in k:
            name = k.split(".", 1)[0]
            size[name] = size.get(name, 0) + v.numel()
    if not size:
        return sd, None
    name = max(size, key=lambda n: size[n])
    p = f"{name}."
    rest = [k for k in sd if not k.startswith(p)]
    if any(sd[k].ndim > 1 for k in rest):  # another module with weights (a teacher, or the model is the module)
        return sd, None
    kept = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return kept, KeySelection(p, "Lightning", len(kept), rest)


def model_keys(sd: SD, prefix: str | None = None, lightning: bool = False) -> tuple[SD, KeySelection | None]:
    """The model's keys of a raw state dict by the rules above, wrapper prefixes stripped."""
    kept: KeySelection | None = None
    if prefix is not None:
        sd, kept = under_prefix(sd, prefix)
    elif lightning:
        sd, kept = lightning_model(sd)
    return strip_prefixes(sd), kept
