"""Watch collapse while a model trains: one fixed probe batch, measured every N steps through the same probe
(``probing.run.probe``) and verdict (``probing.verdict.judge``) as every command.

    monitor = cp.CollapseMonitor("builtin:digits", every=100)   # or a tensor [B, 3, H, W], or a folder of images
    for step, (x, y) in enumerate(loader):
        ...                                                     # forward, backward, optimizer step
        monitor.maybe_measure(model, step + 1)                  # measures when (step + 1) % every == 0
    monitor.history                  # pandas: step, kind, block (1-based), sim_prev, pearson_prev, ..., similar
    monitor.verdicts                 # pandas: step, kind, count, ratio, onset, similar_blocks, seconds
    m = monitor.measure(model)       # now: m.similar_blocks, m.count, m.headline, m.scalars(), m.similarity

A measurement leaves training exactly as it found it: the model is measured in eval mode without gradients, then every
submodule gets its own train/eval flag back (not just the top module's), and the random states (Python, NumPy, torch
CPU and CUDA) are restored, so dropout and drop-path draw the same numbers with or without the monitor. The probe's
hooks are removed even when it fails. ``maybe_measure`` measures on rank 0 only under torch.distributed (other ranks
return None at once, no collective); ``measure`` measures wherever it is called.

The untrained twin is not measured every time: ``baseline=True`` measures it once, at the first measurement, and every
later verdict is read against that same twin (``collapsed_beyond_twin``, ``beyond_twin`` in the history).

Default ``every`` (100 steps): in benchmarks/bench_monitor.py one measurement of 16 images (SVD ranks off, see
``metrics``) costs 0.44 training steps of a depth-8 vit_micro at batch 64 on the CPU, 0.44 % of training time at every
100 steps. On a GPU, where a step is much shorter and the verdict still runs on the CPU, the share is larger.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..errors import BadArgumentError
from ..loading.images import batch_images
from .blocks import ROW_KEYS, Criterion, block_rows
from .result import ProbeResult
from .run import image_batches, probe
from .verdict import judge, spans

DEFAULT_EVERY = 100  # steps between measurements (benchmarks/results/monitor.json: 0.44 % of training time, CPU)
DEFAULT_IMAGES = 16  # images taken from a folder or built-in set
DEFAULT_KINDS = ("probs", "mixed")  # softmax maps, and Re-attention's mixed maps where the model has them
DEFAULT_METRICS = ("sim_prev", "pearson_prev", "entropy", "cross_head")
RANK_METRICS = ("effective_rank", "energy_rank")  # SVDs: computed only when asked for (they dominate the cost)
HEADLINE = ("kind", "similar_blocks", "count", "ratio", "onset", "collapsed_beyond_twin", "depth", "images", "headline")


@dataclass
class Measurement:
    """One measurement: the probe's result, the verdict's headline fields and the per-block rows (1-based blocks)."""

    step: int | None
    result: ProbeResult = field(repr=False)
    verdict: dict[str, Any]  # HEADLINE fields of judge(result)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # per (kind, block): step, kind, block, ...
    seconds: float = 0.0

    kind = property(lambda self: self.verdict["kind"])
    similar_blocks = property(lambda self: self.verdict["similar_blocks"])  # 1-based
    count = property(lambda self: self.verdict["count"])
    ratio = property(lambda self: self.verdict["ratio"])
    onset = property(lambda self: self.verdict["onset"])
    headline = property(lambda self: self.verdict["headline"])

    @property
    def blocks(self) -> list[int]:
        """1-based numbers of the blocks of the verdict's kind."""
        return [b + 1 for b in self.result.attention[self.kind].blocks]

    @property
    def similarity(self) -> np.ndarray:
        """[L, L] mean column cosine between the blocks of the verdict's kind (the paper's Fig. 3 heatmap)."""
        return np.asarray(self.result.attention[self.kind].similarity, dtype=float)

    def scalars(self, prefix: str = "collapse") -> dict[str, float]:
        """Flat numbers for a logger: ``{prefix}/similar_blocks``, ``{prefix}/similar_ratio``, ``{prefix}/onset`` (when
        there is one), ``{prefix}/collapsed_beyond_twin`` (with a twin), and each metric of each block of the verdict's
        kind as ``{prefix}/{metric}/block_07`` (1-based, zero-padded to the depth's digits; NaN values left out, e.g.
        sim_prev of block 1)."""
        out = {f"{prefix}/similar_blocks": float(self.count), f"{prefix}/similar_ratio": float(self.ratio)}
        if self.onset is not None:
            out[f"{prefix}/onset"] = float(self.onset)
        if self.verdict["collapsed_beyond_twin"] is not None:
            out[f"{prefix}/collapsed_beyond_twin"] = float(len(self.verdict["collapsed_beyond_twin"]))
        width = max(2, len(str(self.verdict["depth"])))
        skip = {"step", "kind", "block", "index", "similar", "beyond_twin"}
        for row in self.rows:
            if row["kind"] != self.kind:
                continue
            for name, v in row.items():
                if name not in skip and v is not None and math.isfinite(v):
                    out[f"{prefix}/{name}/block_{row['block']:0{width}d}"] = float(v)
        return out


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Give back, whatever happens inside, every submodule's train/eval flag and the Python, NumPy and torch (CPU, and
    CUDA where initialised) random states."""
    modes = [(m, m.training) for m in model.modules()]
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for m, training in modes:  # assigned, not m.train(): a frozen submodule in eval mode stays in eval mode
            m.training = training
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers: forwarding through DDP on one
    rank could start a collective, and hooks do not see inside a compiled graph."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class CollapseMonitor:
    """Measure a model's collapse on one fixed probe batch while it trains.

    Args:
        images: a tensor [B, C, H, W] already preprocessed for the model, a folder of images or ``builtin:photos`` /
            ``builtin:digits`` (read once, at the first measurement, with the model's own timm eval transform: pass a
            tensor for models without a timm data config), or an iterable of batches (concatenated once).
        every: ``maybe_measure`` measures when ``step % every == 0`` (default ``DEFAULT_EVERY``).
        kinds: map kinds to probe ("probs", "mixed"; "out" adds the block-output features).
        metrics: per-block columns kept in ``history`` and logged (any of ``probing.blocks.ROW_KEYS``); the SVD ranks
            ("effective_rank", "energy_rank") are computed only when named here.
        threshold, neighbors, reduction: the block criterion (as ``probe``).
        num_images: images taken from a folder or built-in set (default ``DEFAULT_IMAGES``; a tensor is used whole).
        batch_size: images per forward pass of the probe.
        baseline: measure the untrained twin once, at the first measurement, and judge every measurement against it.
        baseline_seed: the twin's initialisation seed.
    """

    def __init__(self, images: torch.Tensor | str | Path | Iterable, every: int = DEFAULT_EVERY,
                 kinds: Sequence[str] = DEFAULT_KINDS, metrics: Sequence[str] = DEFAULT_METRICS, *,
                 threshold: float = 0.9, neighbors: int = 1, reduction: str = "mean", num_images: int | None = None,
                 batch_size: int = 16, baseline: bool = False, baseline_seed: int = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise BadArgumentError(f"every must be a whole number of steps >= 1, got {every!r}")
        unknown = [m for m in metrics if m not in ROW_KEYS]
        if unknown:
            raise BadArgumentError(f"unknown metric(s) {', '.join(map(repr, unknown))}; "
                                   f"choose from {', '.join(ROW_KEYS)}")
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise BadArgumentError(f"images must be a batch [B, C, H, W], got shape {tuple(images.shape)}")
        self.images, self.every, self.kinds, self.metrics = images, every, tuple(kinds), tuple(metrics)
        self.options = {"threshold": threshold, "neighbors": neighbors, "reduction": reduction,
                        "batch_size": batch_size, "rank_images": None if set(RANK_METRICS) & set(metrics) else 0}
        self.num_images = num_images
        self.baseline, self.baseline_seed = baseline, baseline_seed
        self.twin: ProbeResult | None = None
        self.last: Measurement | None = None
        self.last_step: int | None = None
        self._rows: list[dict[str, Any]] = []
        self._verdicts: list[dict[str, Any]] = []
        self._batch: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"CollapseMonitor(every={self.every}, kinds={self.kinds}, measurements={len(self._verdicts)})"

    def probe_batch(self, model: nn.Module) -> torch.Tensor:
        """The fixed probe batch [B, C, H, W] (read at the first call, the same tensor afterwards)."""
        if self._batch is None:
            if isinstance(self.images, torch.Tensor):
                batch = self.images.detach()
            else:
                batches, _ = image_batches(self.images, model, self.num_images or DEFAULT_IMAGES,
                                           self.options["batch_size"])
                parts = [batch_images(b) for b in batches]
                if not parts:
                    raise BadArgumentError("the monitor's probe images are empty")
                batch = torch.cat(parts)
                if self.num_images is not None:
                    batch = batch[: self.num_images]
            self._batch = batch
        return self._batch

    def maybe_measure(self, model: nn.Module, step: int) -> Measurement | None:
        """``measure`` when ``step % every == 0`` and this step was not measured yet, on rank 0 only; else None."""
        if step % self.every or step == self.last_step or not distributed.is_main():
            return None
        return self.measure(model, step)

    def measure(self, model: nn.Module, step: int | None = None) -> Measurement:
        """Measure ``model`` as it is now on the probe batch; appended to ``history`` under ``step``."""
        t0 = time.perf_counter()
        model = unwrap(model)
        with preserved(model):
            images = self.probe_batch(model)
            device = next(model.parameters()).device
            res = probe(model, images.to(device), kinds=self.kinds, progress=False, all_reduce=False,
                        baseline=self.baseline and self.twin is None, baseline_seed=self.baseline_seed,
                        **self.options)
        if self.baseline:
            if self.twin is None:
                self.twin = res.baseline
            res.baseline = self.twin
        crit = Criterion.of(res)
        summary = judge(res, crit, sweep_thresholds=None)
        verdict = {k: summary[k] for k in HEADLINE}
        keep = ("kind", "block", "index", *self.metrics, "similar") + (("beyond_twin",) if self.baseline else ())
        rows = [{"step": step, **{k: r[k] for k in keep}} for r in block_rows(res, crit)]
        m = Measurement(step, res, verdict, rows, time.perf_counter() - t0)
        self._rows.extend(rows)
        self._verdicts.append({"step": step, "kind": m.kind, "count": m.count, "ratio": m.ratio, "onset": m.onset,
                               "similar_blocks": spans(m.similar_blocks), "seconds": m.seconds})
        self.last, self.last_step = m, step
        return m

    @property
    def history(self) -> Any:
        """pandas DataFrame, one row per (measurement, kind, block): step, kind, block (1-based), index (0-based), the
        ``metrics`` columns, similar (the paper's criterion) and beyond_twin (with ``baseline=True``)."""
        import pandas as pd

        cols = ["step", "kind", "block", "index", *self.metrics, "similar"] + (["beyond_twin"] if self.baseline else [])
        return pd.DataFrame(self._rows, columns=cols)

    @property
    def verdicts(self) -> Any:
        """pandas DataFrame, one row per measurement: step, kind, count, ratio, onset, similar_blocks ("4-8"),
        seconds."""
        import pandas as pd

        return pd.DataFrame(self._verdicts, columns=["step", "kind", "count", "ratio", "onset", "similar_blocks",
                                                     "seconds"])
