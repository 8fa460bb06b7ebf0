"""What the ``figures`` command measures and reads per checkpoint: the maps it keeps, and the facts it takes from
the file's metadata (accuracy, validation-set size, training seed) or re-creates from them (Θ at initialisation).

    maps = MapAccumulator()                     # a ``capture`` callback: mean maps + the first image's per-head maps
    n, source = validation_images(metadata)     # (360, "metadata eval.val_images")
    theta0, note = initial_theta(metadata, final_theta)

``ModelRun`` holds the results of one checkpoint; ``reports.figures`` builds them, ``reports.figure_jobs`` draws them.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CollapseProbeError
from ..hooks.capture import Site
from ..loading.build import create_model
from ..plots.data import MeanMaps, ThetaWeights
from ..probing.result import ProbeResult

MAP_KINDS = ("probs", "mixed")
DIGITS_IMAGES = 1797  # scikit-learn's digits, the set our trainer's "digits" dataset splits


class MapAccumulator:
    """``capture`` callback that sums each block's [B, H, N, N] map over images and heads (memory L x N x N) and
    keeps the first image's [H, N, N] map per block (memory L x H x N x N, float32)."""

    def __init__(self, kinds: Sequence[str] = MAP_KINDS) -> None:
        self.kinds = tuple(kinds)
        self.sums: dict[Site, torch.Tensor] = {}
        self.first: dict[Site, torch.Tensor] = {}
        self.images: dict[Site, int] = {}
        self.heads: dict[Site, int] = {}

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        if site.kind not in self.kinds:
            return
        s = t.double().sum(dim=(0, 1)).cpu()
        self.sums[site] = self.sums[site] + s if site in self.sums else s
        if site not in self.first and t.shape[0]:
            self.first[site] = t[0].detach().float().cpu().clone()
        self.images[site] = self.images.get(site, 0) + t.shape[0]
        self.heads[site] = t.shape[1]

    def result(self) -> dict[str, MeanMaps]:
        """{kind: MeanMaps} for every kind that was seen; maps [L, N, N] = mean over images and heads; first_image
        [L, H, N, N] = the per-head maps of the first image."""
        out = {}
        for kind in self.kinds:
            sites = sorted((s for s in self.sums if s.kind == kind), key=lambda s: s.block)
            if sites:
                maps = np.stack([(self.sums[s] / (self.images[s] * self.heads[s])).numpy() for s in sites])
                first = np.stack([self.first[s].numpy() for s in sites]) if all(s in self.first for s in sites) \
                    else None
                out[kind] = MeanMaps(kind, [s.block for s in sites], maps, self.images[sites[0]], first)
        return out


@dataclass
class ModelRun:
    """Everything measured from one checkpoint (results only; the model itself is dropped).

    val_images / val_images_source: size of the validation set that ``top1`` was measured on and where that number
    came from; seed: the training seed the file records; theta_init: Θ at initialisation re-created from that seed
    (None, with the reason in theta_init_note, when it cannot be); baseline: the probe result of an untrained model of
    the same architecture ("untrained twin"), drawn grey dashed beside this one where given.
    """

    label: str
    path: Path
    architecture: str
    family: str
    depth: int
    result: ProbeResult
    maps: dict[str, MeanMaps]
    theta: ThetaWeights | None
    top1: float | None
    val_images: int | None = None
    val_images_source: str = "not recorded"
    seed: int | None = None
    theta_init: ThetaWeights | None = None
    theta_init_note: str = ""
    baseline: ProbeResult | None = None
    notes: list[str] = field(default_factory=list)


def _entry(meta: dict[str, Any], name: str) -> dict[str, Any]:
    v = meta.get(name)
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def checkpoint_top1(meta: dict[str, Any]) -> float | None:
    """``eval.top1`` (%) as our trainer writes it, or None."""
    v = _entry(meta, "eval").get("top1")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def validation_images(meta: dict[str, Any]) -> tuple[int | None, str]:
    """(number of images ``eval.top1`` was measured on, where that number came from).

    Our trainer records it as ``eval.val_images`` (``eval.images`` is read too); for a digits run without it, the
    size of the stratified split that ``train_config.val_fraction`` implies (scikit-learn rounds the test share up)."""
    ev = _entry(meta, "eval")
    for key in ("images", "val_images"):
        n = _int(ev.get(key))
        if n is not None and n > 0:
            return n, f"metadata eval.{key}"
    tc = _entry(meta, "train_config")
    frac = tc.get("val_fraction", 0.2)
    if tc.get("dataset", ev.get("dataset")) == "digits" and isinstance(frac, (int, float)) and 0 < frac < 1:
        return math.ceil(frac * DIGITS_IMAGES), f"digits split implied by train_config.val_fraction={frac:g}"
    return None, "not recorded"


def recorded_seed(meta: dict[str, Any]) -> int | None:
    """``train_config.seed``: the seed our trainer set before building the model."""
    return _int(_entry(meta, "train_config").get("seed"))


def initial_theta(meta: dict[str, Any], final: ThetaWeights | None) -> tuple[ThetaWeights | None, str]:
    """(Θ at initialisation, how it was obtained) for a checkpoint of our trainer, or (None, why not).

    The trainer seeds Python, numpy and torch with ``train_config.seed`` and then builds the model from its
    arguments (``train.engine``), which the file stores as ``model_args``: building the same model after the same
    seeding gives the same initial weights (same torch version assumed). The global RNG states are restored."""
    if final is None:
        return None, "no Θ in this model"
    seed, tc = recorded_seed(meta), _entry(meta, "train_config")
    if seed is None:
        return None, "the checkpoint records no training seed"
    if tc.get("initial_checkpoint"):
        return None, "trained from an initial checkpoint, whose Θ is not re-created here"
    arch, args = meta.get("architecture"), meta.get("model_args")
    if not isinstance(arch, str) or not isinstance(args, dict):
        return None, "the checkpoint records no model config to rebuild from"
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            theta = ThetaWeights.from_state_dict(create_model(arch, **args).state_dict())
    except CollapseProbeError as e:  # arguments this timm cannot build: the figure shows final Θ and says why
        return None, f"cannot rebuild the model to re-create it ({e})"
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if theta is None or theta.blocks != final.blocks or theta.weight.shape != final.weight.shape:
        return None, "the rebuilt model's Θ does not match the checkpoint's"
    return theta, f"re-created from train_config.seed={seed}"
