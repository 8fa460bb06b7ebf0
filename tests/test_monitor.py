"""CollapseMonitor: the probe's numbers while a model trains, and training left exactly as it was.

    pytest tests/test_monitor.py -q
"""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import collapse_probe as cp
import collapse_probe.models  # noqa: F401  (registers vit_micro with timm)
from collapse_probe.errors import BadArgumentError
from collapse_probe.probing import run as run_module
from collapse_probe.probing.monitor import DEFAULT_METRICS, CollapseMonitor

REPO = Path(__file__).resolve().parents[1]


def _model(depth: int = 3, name: str = "vit_micro", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, depth=depth, num_classes=10, **kw)


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_measurement_equals_the_probe_and_the_verdict():
    model, x = _model(name="deepvit_micro"), _images()
    m = CollapseMonitor(x, every=1, metrics=(*DEFAULT_METRICS, "effective_rank")).measure(model, step=7)
    ref = cp.probe(model, x, kinds=("probs", "mixed"), progress=False, baseline=False)
    verdict = cp.judge(ref, sweep_thresholds=None)
    assert m.kind == verdict["kind"] == "mixed"  # Re-attention everywhere: the maps that multiply V
    assert (m.similar_blocks, m.count, m.onset, m.headline) == (verdict["similar_blocks"], verdict["count"],
                                                                 verdict["onset"], verdict["headline"])
    df, want = m.result.to_pandas(), ref.to_pandas()
    for col in ("sim_prev", "pearson_prev", "entropy", "cross_head", "effective_rank"):
        np.testing.assert_allclose(df[col], want[col], rtol=1e-6, atol=1e-7, equal_nan=True)
    scal = m.scalars()
    mixed = want[want.kind == "mixed"].set_index("block")
    assert scal["collapse/similar_blocks"] == verdict["count"]
    for b in (2, 3):
        assert scal[f"collapse/sim_prev/block_{b:02d}"] == pytest.approx(mixed.loc[b, "sim_prev"], rel=1e-6)
    assert "collapse/sim_prev/block_01" not in scal  # block 1 has no previous block (NaN is not logged)
    np.testing.assert_allclose(m.similarity, ref.attention["mixed"].similarity, rtol=1e-6)


def test_history_rows_are_one_based_blocks_per_step():
    model, x = _model(depth=3), _images(4)
    mon = CollapseMonitor(x, every=2)
    assert [mon.maybe_measure(model, s) is not None for s in (0, 1, 2, 2, 3, 4)] == [
        True, False, True, False, False, True]  # step 2 twice (gradient accumulation): measured once
    h = mon.history
    assert list(h.columns) == ["step", "kind", "block", "index", *DEFAULT_METRICS, "similar"]
    assert list(h.step.unique()) == [0, 2, 4] and list(h.block[:3]) == [1, 2, 3] and list(h["index"][:3]) == [0, 1, 2]
    assert list(mon.verdicts.step) == [0, 2, 4]
    # the similar flag is the paper's criterion on the logged number
    assert (h.similar == (h.sim_prev.fillna(-1) > 0.9)).all()


def test_measure_gives_back_modes_random_states_hooks_and_gradients():
    model = _model(depth=3, drop_rate=0.1, drop_path_rate=0.1).train()
    model.blocks[1].eval()  # e.g. a frozen block: model.train(True) afterwards would wrongly switch it on
    fused = [a.fused_attn for a in model.modules() if hasattr(a, "fused_attn")]
    model(_images(2)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    hooks = _hooks(model)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    # builtin:digits goes through a DataLoader, whose iterator draws its base seed from the global torch generator
    mon = CollapseMonitor("builtin:digits", every=1, num_images=4)
    mon.measure(model, 0)
    assert [m.training for m in model.modules()] == modes
    assert _hooks(model) == hooks
    assert [a.fused_attn for a in model.modules() if hasattr(a, "fused_attn")] == fused
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    # the control: reading the same images without the monitor moves the generator, so the check above can fail
    loader, _ = run_module.image_batches("builtin:digits", model, 4, 16)
    next(iter(loader))
    assert not torch.equal(torch.get_rng_state(), states[2])


def test_a_failing_measurement_still_gives_everything_back():
    model, wrong = _model(depth=2).train(), torch.randn(2, 3, 48, 48)
    hooks, state = _hooks(model), torch.get_rng_state()
    # timm refuses 48 px images inside the hooked forward; the probe turns that into one line naming the images
    with pytest.raises(BadArgumentError, match="cannot run on the images given"):
        CollapseMonitor(wrong, every=1).measure(model)
    assert model.training and all(m.training for m in model.modules())
    assert _hooks(model) == hooks and torch.equal(torch.get_rng_state(), state)


def _train(monitor: CollapseMonitor | None, steps: int = 6) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _model(depth=2, drop_rate=0.2, drop_path_rate=0.2).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(11)
    losses = []
    for step in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if monitor is not None:
            monitor.maybe_measure(model, step + 1)
    return losses, model.state_dict()


def test_training_trajectory_is_the_same_with_and_without_the_monitor():
    mon = CollapseMonitor("builtin:digits", every=2, num_images=4)
    with_losses, with_weights = _train(mon)
    plain_losses, plain_weights = _train(None)
    assert len(mon.verdicts) == 3
    assert with_losses == plain_losses  # dropout and drop-path drew the same masks
    assert all(torch.equal(with_weights[k], plain_weights[k]) for k in plain_weights)


def test_the_twin_is_measured_once(monkeypatch):
    calls = []
    real = run_module.untrained_twin

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(run_module, "untrained_twin", counting)
    model, x = _model(depth=3), _images(4)
    mon = CollapseMonitor(x, every=1, baseline=True)
    first = mon.measure(model, 0)
    with torch.no_grad():
        model.blocks[2].attn.qkv.weight.mul_(3.0)  # training moved on
    second = mon.measure(model, 1)
    assert len(calls) == 1 and second.result.baseline is first.result.baseline is mon.twin
    ref = cp.probe(model, x, kinds=("probs", "mixed"), progress=False, baseline=True)  # fresh twin, same seed
    assert second.verdict["collapsed_beyond_twin"] == cp.judge(ref, sweep_thresholds=None)["collapsed_beyond_twin"]
    assert "beyond_twin" in mon.history.columns and "collapse/collapsed_beyond_twin" in second.scalars()


def test_bad_arguments_are_one_line_errors():
    for kw in ({"every": 0}, {"every": 2.5}, {"metrics": ("sim_prev", "nonsense")}):
        with pytest.raises(cp.BadArgumentError) as e:
            CollapseMonitor(_images(2), **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(cp.BadArgumentError, match="batch"):
        CollapseMonitor(torch.randn(3, 32, 32))


def test_import_pulls_in_no_optional_trainer():
    code = ("import sys, collapse_probe as cp; cp.CollapseMonitor; import collapse_probe.train.evaluation\n"
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"


@pytest.mark.parametrize("module, extra", [("lightning", "lightning"), ("transformers", "transformers")])
def test_a_missing_extra_is_one_line_naming_it(module: str, extra: str):
    blocked = {"lightning": ("lightning", "pytorch_lightning"), "transformers": ("transformers",)}[module]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None  # as if not installed\n"
            f"try:\n    import collapse_probe.integrations.{module}\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip().splitlines() == [
        f"collapse_probe.integrations.{module} needs {'Lightning' if module == 'lightning' else 'transformers'}: "
        f"pip install 'collapse-probe[{extra}]'"], out.stderr[-2000:]
