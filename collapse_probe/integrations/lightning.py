"""PyTorch Lightning: log collapse while ``trainer.fit`` trains (``pip install 'collapse-probe[lightning]'``).

    from collapse_probe.integrations.lightning import CollapseCallback

    callback = CollapseCallback("builtin:digits", every=100, module="model")   # probe pl_module.model
    trainer = L.Trainer(max_steps=10_000, callbacks=[callback])                 # any logger; TensorBoard gets images
    trainer.fit(lit_module, train_loader)
    callback.history                                                            # pandas, one row per (step, block)

Every ``every`` optimizer steps (``on="step"``, measured at ``trainer.global_step``, and once before the first step)
or at the end of every validation (``on="validation"``; not during the sanity check), one ``CollapseMonitor``
measurement is sent to every logger of the trainer (``logger.log_metrics`` at ``trainer.global_step``):
``collapse/similar_blocks``, ``collapse/similar_ratio``, ``collapse/onset``, per block ``collapse/sim_prev/block_07``
(and the other ``metrics``), and the L x L similarity heatmap ``collapse/similarity`` as an image where the logger takes
images (TensorBoard's ``add_image``, ``log_image`` of W&B / Neptune). The loggers are called directly rather than
through ``pl_module.log``, whose step-level values reach the logger only every ``log_every_n_steps``.

Under DDP only global rank 0 measures (the other ranks go on at once; no collective is involved, the weights are the
same on every rank). The numbers are therefore not in ``trainer.callback_metrics`` (a checkpoint or early-stopping
rule on them would see them on one rank only).
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name of the same library
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("collapse_probe.integrations.lightning needs Lightning: "
                          "pip install 'collapse-probe[lightning]'") from None

from ..errors import BadArgumentError
from ..probing.monitor import DEFAULT_EVERY, CollapseMonitor, Measurement
from .images import add_image, heatmap_image

WHEN = ("step", "validation")


def send(loggers: Sequence[Any], m: Measurement, step: int, prefix: str, image: bool) -> None:
    """One measurement to every logger: its scalars, and the heatmap to those that take images."""
    scalars = m.scalars(prefix)
    picture = heatmap_image(m.similarity) if image else None
    for logger in loggers:
        logger.log_metrics(scalars, step=step)
        if picture is not None and not add_image(getattr(logger, "experiment", None), f"{prefix}/similarity",
                                                 picture, step):
            add_image(logger, f"{prefix}/similarity", picture, step)


class CollapseCallback(Callback):
    """Measure collapse every ``every`` steps (or at each validation end) and log it to the trainer's loggers.

    Args:
        images: the fixed probe batch, as ``CollapseMonitor`` takes it (a tensor, a folder, ``builtin:*``).
        every: optimizer steps between measurements for ``on="step"``.
        on: "step" or "validation".
        module: attribute path of the network inside the LightningModule (e.g. "model"; default: the LightningModule
            itself). Its timm data config preprocesses a folder / built-in set, and the twin copies only it.
        image: log the similarity heatmap where a logger takes images.
        prefix: the logged names' first part.
        options: ``CollapseMonitor`` options (kinds, metrics, threshold, num_images, baseline, ...).
    """

    def __init__(self, images: Any, every: int = DEFAULT_EVERY, *, on: str = "step", module: str | None = None,
                 image: bool = True, prefix: str = "collapse", **options: Any) -> None:
        if on not in WHEN:
            raise BadArgumentError(f"on must be one of {', '.join(WHEN)}, got {on!r}")
        self.monitor = CollapseMonitor(images, every=every, **options)
        self.on, self.module, self.image, self.prefix = on, module, image, prefix

    @property
    def history(self) -> Any:
        return self.monitor.history

    def _measure(self, trainer: Any, pl_module: Any, always: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        model = operator.attrgetter(self.module)(pl_module) if self.module else pl_module
        if always:
            m = None if step == self.monitor.last_step else self.monitor.measure(model, step)
        else:
            m = self.monitor.maybe_measure(model, step)
        if m is not None:
            send(trainer.loggers, m, step, self.prefix, self.image)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "step":  # the starting point (step 0, or a resumed step that falls on the grid)
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.on == "step":  # with gradient accumulation this runs per micro-batch; a step is measured once
            self._measure(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "validation" and not trainer.sanity_checking:
            self._measure(trainer, pl_module, always=True)
