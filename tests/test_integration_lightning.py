"""The Lightning callback: a real Trainer, the logged numbers equal ``cp.probe`` of the weights
at the logging step, and the training is the same with and without the callback.

    pytest tests/test_integration_lightning.py -q -m 'not heavy'   # without the 2-process DDP test (~35 s)
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import collapse_probe.models  # noqa: F401  (registers vit_micro with timm)

from .integration_checks import check_logged, expected

L = pytest.importorskip("lightning.pytorch")
REPO = Path(__file__).resolve().parents[1]


def _data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def _vit_micro() -> torch.nn.Module:
    return timm.create_model("vit_micro", depth=3, num_classes=10, drop_rate=0.2, drop_path_rate=0.2)


class LitViT(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _vit_micro()
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Capture(L.loggers.Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict] = {}

    name = property(lambda self: "capture")
    version = property(lambda self: 0)

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Snapshots(L.Callback):
    """A copy of the network's weights at the start and after every step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}

    def _keep(self, trainer, pl_module) -> None:
        self.weights[trainer.global_step] = copy.deepcopy(pl_module.model.state_dict())

    def on_train_start(self, trainer, pl_module):
        self._keep(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep(trainer, pl_module)


def _fit(tmp_path: Path, callbacks: list, steps: int = 6, **trainer_kw) -> tuple[LitViT, list]:
    L.seed_everything(0, verbose=False)
    lit = LitViT()
    loggers = [Capture(), L.loggers.TensorBoardLogger(str(tmp_path), name="tb")]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=loggers, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path), **trainer_kw)
    trainer.fit(lit, DataLoader(_data(), batch_size=8, shuffle=True))
    return lit, loggers


def test_lightning_callback_logs_the_probe_of_the_weights_and_leaves_training_alone(tmp_path):
    from collapse_probe.integrations.lightning import CollapseCallback

    # builtin:digits is read through a DataLoader (it draws from the global generator) at the first measurement
    cb, snaps = CollapseCallback("builtin:digits", every=2, module="model", num_images=6), Snapshots()
    lit, (capture, tb) = _fit(tmp_path / "with", [cb, snaps])
    logged = {s: v for s, v in capture.metrics.items() if "collapse/similar_blocks" in v}
    assert sorted(logged) == [0, 2, 4, 6]
    images = cb.monitor.probe_batch(lit.model)
    check_logged(logged, snaps.weights, _vit_micro(), images)
    assert list(cb.history.step.unique()) == [0, 2, 4, 6]

    plain, _ = _fit(tmp_path / "without", [])
    assert lit.losses == plain.losses  # dropout and drop-path drew the same masks, the shuffles the same order
    assert all(torch.equal(a, b) for a, b in zip(lit.state_dict().values(), plain.state_dict().values()))
    x = images[:2]
    assert torch.equal(lit.eval()(x), plain.eval()(x))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("collapse/similarity")] == [0, 2, 4, 6]
    img = acc.Images("collapse/similarity")[0]
    assert (img.width, img.height) == (3 * 8, 3 * 8)  # 3 blocks, 8 px per cell
    sims = acc.Scalars("collapse/sim_prev/block_02")
    assert [e.step for e in sims] == [0, 2, 4, 6]
    assert [e.value for e in sims] == pytest.approx([logged[s]["collapse/sim_prev/block_02"] for s in (0, 2, 4, 6)])


def test_lightning_callback_at_validation_end(tmp_path):
    from collapse_probe.integrations.lightning import CollapseCallback

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cb, snaps = CollapseCallback(images, on="validation", module="model"), Snapshots()
    L.seed_everything(0, verbose=False)
    lit, capture = LitViT(), Capture()
    trainer = L.Trainer(max_steps=4, val_check_interval=2, num_sanity_val_steps=1, accelerator="cpu", devices=1,
                        logger=capture, callbacks=[cb, snaps], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1)
    data = DataLoader(_data(), batch_size=8)
    trainer.fit(lit, data, data)
    logged = {s: v for s, v in capture.metrics.items() if "collapse/similar_blocks" in v}
    assert sorted(logged) == [2, 4]  # after the validations at steps 2 and 4, not during the sanity check
    check_logged(logged, snaps.weights, _vit_micro(), images)


DDP_SCRIPT = r'''
import json, sys, torch, torch.nn.functional as F, lightning.pytorch as L, timm
from torch.utils.data import DataLoader, TensorDataset
import collapse_probe.models
from collapse_probe.integrations.lightning import CollapseCallback
out = sys.argv[1]

class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = timm.create_model("vit_micro", depth=2, num_classes=10, drop_path_rate=0.1)
    def training_step(self, batch, i):
        return F.cross_entropy(self.model(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

class Keep(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, *a):
        if trainer.global_step == 4:
            torch.save(pl_module.model.state_dict(), f"{out}/weights_rank{trainer.global_rank}.pt")

g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
images = torch.randn(4, 3, 32, 32, generator=g)
L.seed_everything(0, verbose=False)
cb = CollapseCallback(images, every=2, module="model")
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=4, logger=L.loggers.CSVLogger(out),
                    callbacks=[cb, Keep()], enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(Lit(), DataLoader(data, batch_size=4))
json.dump({"steps": [int(s) for s in cb.history.step.unique()], "images": images.tolist(),
           "last": cb.monitor.last.scalars() if cb.monitor.last else None},
          open(f"{out}/rank{trainer.global_rank}.json", "w"))
'''


@pytest.mark.heavy
def test_lightning_ddp_measures_on_rank_zero_only(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == [0, 2, 4] and r1["steps"] == [] and r1["last"] is None
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP kept the ranks in step while rank 0 measured
    model = timm.create_model("vit_micro", depth=2, num_classes=10)
    rows, verdict = expected(model, w0, torch.tensor(r0["images"]))
    assert r0["last"]["collapse/similar_blocks"] == verdict["count"]
    assert r0["last"]["collapse/sim_prev/block_02"] == pytest.approx(rows[2]["sim_prev"], rel=1e-5)
