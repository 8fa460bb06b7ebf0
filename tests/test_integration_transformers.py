"""The transformers callback: a real ``Trainer`` on a tiny ViTForImageClassification (built from a config, nothing
downloaded); the values it logs through ``trainer.log`` equal ``cp.probe`` of the weights at that step, the Trainer's
own logs are kept, and training is the same with and without the callback.

    pytest tests/test_integration_transformers.py -q
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import collapse_probe as cp

from .integration_checks import check_logged

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own requirement
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402

from collapse_probe.integrations.transformers import CollapseCallback  # noqa: E402

STEPS, EVERY = 6, 2


def _model(dropout: float = 0.2) -> ViTForImageClassification:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                    intermediate_size=64, num_labels=10, hidden_dropout_prob=dropout,
                    attention_probs_dropout_prob=dropout)
    return ViTForImageClassification(cfg)


class Pixels(Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Record(TrainerCallback):
    """Every on_log call (what each report_to integration receives) and the weights after every step."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []
        self.weights: dict[int, dict] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = copy.deepcopy(model.state_dict())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = copy.deepcopy(model.state_dict())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def _train(out: Path, callback: CollapseCallback | None, report_to: list[str] | None = None) -> tuple[Trainer, Record]:
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=0.01,
                             logging_steps=EVERY, report_to=report_to or [], use_cpu=True, save_strategy="no",
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    rec = Record()
    trainer = Trainer(model=_model(), args=args, train_dataset=Pixels(), callbacks=[rec])
    if callback is not None:
        callback.attach(trainer)
    trainer.train()
    return trainer, rec


def _probe_images() -> DataLoader:
    # a loader, as people keep an evaluation loader; iterating one draws from the global torch generator
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return DataLoader(TensorDataset(x), batch_size=4)


def test_logged_values_equal_the_probe_and_training_is_unchanged(tmp_path):
    cb = CollapseCallback(_probe_images(), every=EVERY)
    trainer, rec = _train(tmp_path / "with", cb)
    logged = {s: v for s, v in rec.logs if "collapse/similar_blocks" in v}
    assert sorted(logged) == [0, 2, 4, 6]
    images = cb.monitor.probe_batch(trainer.model)
    assert images.shape == (6, 3, 32, 32)
    check_logged(logged, rec.weights, _model(), images)
    in_history = [e["step"] for e in trainer.state.log_history if "collapse/similar_blocks" in e]
    assert in_history == [0, 2, 4, 6]
    # the Trainer's own loss log at those steps survived (trainer.log clears control.should_log; it is given back)
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert [s for s, _ in losses] == [2, 4, 6]

    plain, _ = _train(tmp_path / "without", None)
    assert losses == [(e["step"], e["loss"]) for e in plain.state.log_history if "loss" in e]
    a, b = trainer.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)  # dropout drew the same masks, the sampler the same order
    x = images[:2]
    assert torch.equal(trainer.model.eval()(x).logits, plain.model.eval()(x).logits)
    assert trainer.model.config._attn_implementation == plain.model.config._attn_implementation  # eager only inside


def test_tensorboard_gets_scalars_and_the_heatmap(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = next(iter(_probe_images()))[0]
    cb = CollapseCallback(images, every=3)
    _train(tmp_path, cb, report_to=["tensorboard"])
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("collapse/similarity")] == [0, 3, 6]
    # transformers' TensorBoardCallback files every training log under "train/"
    assert [e.step for e in acc.Scalars("train/collapse/similar_blocks")] == [0, 3, 6]
    assert [e.value for e in acc.Scalars("train/collapse/sim_prev/block_03")] == pytest.approx(
        list(cb.history.query("block == 3").sim_prev))
    assert "train/loss" in acc.Tags()["scalars"]  # the Trainer's own logs still there


def test_without_attach_training_stops_with_one_line(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=_model(), args=args, train_dataset=Pixels(8),
                      callbacks=[CollapseCallback(torch.randn(2, 3, 32, 32))])
    with pytest.raises(cp.BadArgumentError, match=r"attach\(trainer\)") as e:
        trainer.train()
    assert "\n" not in str(e.value)
