"""HuggingFace ``Trainer``: log collapse while it trains (``pip install 'collapse-probe[transformers]'``).

    from collapse_probe.integrations.transformers import CollapseCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., report_to=["tensorboard"]), train_dataset=train)
    callback = CollapseCallback(probe_pixels, every=100).attach(trainer)   # probe_pixels: [B, 3, H, W], preprocessed
    trainer.train()
    callback.history                                                      # pandas, one row per (step, block)

Why ``attach(trainer)``: a ``TrainerCallback`` receives the model but not the Trainer, and the one road to every
``report_to`` integration (TensorBoard, W&B, MLflow, ...) and to ``trainer.state.log_history`` is ``trainer.log``. So
the callback keeps the Trainer it is attached to and calls ``trainer.log`` at ``state.global_step``; ``attach`` also
adds it to the Trainer's callbacks (unless it is there already, e.g. passed as ``callbacks=[...]``). Training without
``attach`` stops at the start with a one-line error. The Trainer's own loss log at that step is kept (``trainer.log``
runs every callback's ``on_log``, which clears ``control.should_log``; the flag is given back).

Every ``every`` optimizer steps (``on="step"``, and once before the first step) or after every evaluation
(``on="evaluate"``) one ``CollapseMonitor`` measurement of the model is logged: ``collapse/similar_blocks``,
``collapse/similar_ratio``, ``collapse/onset``, per block ``collapse/sim_prev/block_07`` (and the other ``metrics``).
With ``report_to`` TensorBoard, the L x L similarity heatmap goes to its writer as the image ``collapse/similarity``.
Only the world process zero measures (no collective); the weights are the same on every rank.
Pass the probe images as a tensor preprocessed by your image processor: a folder or ``builtin:*`` set would be read
with timm's defaults, which a transformers model does not carry.
"""
from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("collapse_probe.integrations.transformers needs transformers: "
                      "pip install 'collapse-probe[transformers]'") from None

from ..errors import BadArgumentError
from ..probing.monitor import DEFAULT_EVERY, CollapseMonitor
from .images import add_image, heatmap_image

WHEN = ("step", "evaluate")


class CollapseCallback(TrainerCallback):
    """Measure collapse every ``every`` steps (or after each evaluation) and log it through ``trainer.log``.

    Args:
        images: the fixed probe batch, as ``CollapseMonitor`` takes it (a tensor [B, 3, H, W] preprocessed for the
            model, or an iterable of such batches).
        every: optimizer steps between measurements for ``on="step"``.
        on: "step" or "evaluate".
        image: send the similarity heatmap to TensorBoard when the Trainer reports to it.
        prefix: the logged names' first part.
        options: ``CollapseMonitor`` options (kinds, metrics, threshold, baseline, ...).
    """

    def __init__(self, images: Any, every: int = DEFAULT_EVERY, *, on: str = "step", image: bool = True,
                 prefix: str = "collapse", **options: Any) -> None:
        if on not in WHEN:
            raise BadArgumentError(f"on must be one of {', '.join(WHEN)}, got {on!r}")
        self.monitor = CollapseMonitor(images, every=every, **options)
        self.on, self.image, self.prefix = on, image, prefix
        self.trainer: Any = None

    def attach(self, trainer: Any) -> CollapseCallback:
        """Log through ``trainer`` (and join its callbacks if not there yet); returns the callback."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    @property
    def history(self) -> Any:
        return self.monitor.history

    def _measure(self, state: Any, control: Any, model: Any, always: bool = False) -> None:
        if not state.is_world_process_zero or model is None:
            return
        step = int(state.global_step)
        if always:
            m = None if step == self.monitor.last_step else self.monitor.measure(model, step)
        else:
            m = self.monitor.maybe_measure(model, step)
        if m is None:
            return
        should_log = control.should_log
        self.trainer.log(m.scalars(self.prefix))
        control.should_log = should_log
        if self.image:
            picture = heatmap_image(m.similarity)
            for cb in self.trainer.callback_handler.callbacks:  # TensorBoardCallback holds its SummaryWriter
                add_image(getattr(cb, "tb_writer", None), f"{self.prefix}/similarity", picture, step)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            raise BadArgumentError("CollapseCallback logs through trainer.log: call callback.attach(trainer) "
                                   "before trainer.train()")
        if self.on == "step":
            self._measure(state, control, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.on == "step":
            self._measure(state, control, model)

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.on == "evaluate":
            self._measure(state, control, model, always=True)
