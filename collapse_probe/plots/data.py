"""Results that the paper's figures need beyond ``ProbeResult``: mean attention maps and learned Theta matrices.

Plain numpy objects (no models), produced by ``collapse_probe.figures`` and consumed by the plot functions:

    maps = MeanMaps(kind="probs", blocks=[0, 1], maps=np.ones((2, 5, 5)) / 5, count=17)
    theta = ThetaWeights(blocks=[0, 1], weight=np.eye(4)[None].repeat(2, 0), bias=None)
    theta.relative_change(init_theta)      # [L]: ||Θ - Θ0|| / ||Θ0|| per block
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..probing.result import _array, _list


@dataclass
class MeanMaps:
    """Head- and batch-averaged attention map of each block.

    kind: "probs" (post-softmax) or "mixed" (after Re-attention); blocks: 0-based block indices;
    maps: [L, N, N] (rows = queries, columns = keys); count: images averaged over;
    first_image: [L, H, N, N], the per-head maps of the first image, or None. Centred "mixed" maps average out over
    heads and images, so their single-head maps are the ones worth looking at.
    """

    kind: str
    blocks: list[int]
    maps: np.ndarray
    count: int
    first_image: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "blocks": self.blocks, "count": self.count, "maps": _list(self.maps),
                "first_image": None if self.first_image is None else _list(self.first_image)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeanMaps:
        first = d.get("first_image")
        return cls(d["kind"], list(d["blocks"]), _array(d["maps"]), int(d["count"]),
                   None if first is None else _array(first))


@dataclass
class ThetaWeights:
    """Re-attention head-mixing matrices: weight [L, H, H] (row = output head, column = input head), bias [L, H]."""

    blocks: list[int]
    weight: np.ndarray
    bias: np.ndarray | None = None

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> ThetaWeights | None:
        """Collect ``blocks.{i}.attn.theta.weight`` ([H, H, 1, 1] 1x1 conv) from a state dict; None when absent."""
        found: dict[int, Any] = {}
        for key, v in sd.items():
            parts = key.split(".")
            if len(parts) == 5 and parts[0] == "blocks" and parts[2:] == ["attn", "theta", "weight"]:
                found[int(parts[1])] = v
        if not found:
            return None
        blocks = sorted(found)
        weight = np.stack([_numpy(found[b]).reshape(found[b].shape[0], found[b].shape[1]) for b in blocks])
        biases = [sd.get(f"blocks.{b}.attn.theta.bias") for b in blocks]
        bias = np.stack([_numpy(b) for b in biases]) if all(b is not None for b in biases) else None
        return cls(blocks, weight, bias)

    def to_json(self) -> str:
        return json.dumps({"blocks": self.blocks, "weight": _list(self.weight),
                           "bias": None if self.bias is None else _list(self.bias)})

    def relative_change(self, init: ThetaWeights) -> np.ndarray:
        """[L]: ||Theta - Theta_0||_F / ||Theta_0||_F per block (weights only), against ``init`` of the same blocks."""
        if list(init.blocks) != list(self.blocks) or init.weight.shape != self.weight.shape:
            raise ValueError(f"init Θ (blocks {init.blocks}, {init.weight.shape}) does not match final Θ (blocks "
                             f"{self.blocks}, {self.weight.shape})")
        num = np.linalg.norm((self.weight - init.weight).reshape(len(self.blocks), -1), axis=1)
        den = np.linalg.norm(init.weight.reshape(len(self.blocks), -1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=float)


def pick_kind(result: Any, kind: str = "auto") -> str:
    """The attention kind a figure shows: "auto" = the maps that multiply V ("mixed" for Re-attention, else "probs")."""
    if kind == "auto":
        return result.applied_kind
    if kind not in result.attention:
        raise KeyError(f"result has no '{kind}' attention (has {sorted(result.attention)})")
    return kind
