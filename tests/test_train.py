"""Trainer: checkpoints and config, exact resume after SIGKILL, 2-process DDP (gloo), atomic state writes, BatchNorm
re-calibration, the paper baselines and the cosine regulariser. All on the CPU with 1-2 block models.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.cli import main
from collapse_probe.hooks.capture import capture
from collapse_probe.loading.build import build_model
from collapse_probe.loading.read import read_checkpoint
from collapse_probe.train import recalibrate_bn, resolve_config, train
from collapse_probe.train.baselines import CosineRegularizer
from collapse_probe.train.engine import build_model as engine_build_model
from collapse_probe.train.state import load_training_state, seed_everything

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _smoke(out: Path, **kw):
    return resolve_config("smoke", output=str(out), device="cpu", **kw)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ train / checkpoint


def test_training_reduces_loss_and_writes_checkpoint_with_config(tmp_path):
    cfg = _smoke(tmp_path, epochs=5, warmup_epochs=1, lr=3e-3, model_args={"depth": 1}, drop_path=0.0, smoothing=0.0,
                 synthetic_size=64, eval_every=0, track_every=5)
    result = train(cfg)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0] - 0.1  # the synthetic classes are learnable (2.3 -> about 2.0 in 40 steps)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == cfg.to_dict()
    state = load_training_state(tmp_path / "last.pt")  # weights_only=True: plain tensors and numbers only
    assert state["epoch"] == 5 and state["config"] == cfg.to_dict()
    assert {"model", "model_ema", "optimizer", "scheduler", "scaler", "rng"} <= set(state)
    _assert_same_state(state["model"], result.model.state_dict())
    # the exported model rebuilds from its own metadata and carries its accuracy
    ckpt = read_checkpoint(tmp_path / "final.safetensors")
    model, _ = build_model(ckpt)
    ev = ckpt.metadata["eval"]
    assert ev["dataset"] == "synthetic" and ev["epochs"] == 5 and 0 <= ev["top1"] <= ev["top5"] <= 100
    assert ckpt.metadata["train_config"] == cfg.to_dict()
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,train_loss") and len(log) == 6
    assert (tmp_path / "collapse.csv").read_text().count("\n") == 1 + 1  # tracked once (last epoch), one block


# ------------------------------------------------------------------------------------------------ resume


RESUME_CFG_BASE = dict(epochs=4, warmup_epochs=1, model_args={"depth": 2}, synthetic_size=48, batch_size=8)


@pytest.mark.heavy
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, workers):
    rcfg = dict(RESUME_CFG_BASE, workers=workers)
    ref = train(_smoke(tmp_path / "ref", **rcfg))

    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        from collapse_probe.train import resolve_config, train
        cfg = resolve_config("smoke", output={str(out)!r}, device="cpu", **{rcfg!r})
        train(cfg)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
    ckpt, deadline = out / "last.pt", time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and load_training_state(ckpt)["epoch"] >= 1:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = load_training_state(ckpt)["epoch"]
    assert 1 <= stopped_at < rcfg["epochs"]

    resumed = train(_smoke(out, resume=True, **rcfg))
    _assert_same_state(resumed.model.state_dict(), ref.model.state_dict())
    _assert_same_state(resumed.ema.state_dict(), ref.ema.state_dict())
    a, b = load_training_state(out / "last.pt"), load_training_state(tmp_path / "ref" / "last.pt")
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    rows = (out / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, rcfg["epochs"] + 1))  # 1-based, none twice


# ------------------------------------------------------------------------------------------------ DDP


@pytest.mark.heavy
def test_ddp_two_processes_gloo_keep_identical_weights(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from collapse_probe.train import resolve_config, train
        cfg = resolve_config("smoke", output={str(tmp_path / "run")!r}, device="cpu", epochs=2, batch_size=4,
                             model_args={{"depth": 2}}, max_steps_per_epoch=3)
        res = train(cfg)
        torch.save({{"model": res.model.state_dict(), "ema": res.ema.state_dict()}},
                   {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _assert_same_state(r0["model"], r1["model"])
    _assert_same_state(r0["ema"], r1["ema"])
    seed_everything(42)  # the trainer's initial weights (same seed, same construction) must have moved
    init = engine_build_model(_smoke(tmp_path, model_args={"depth": 2}), 10).state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], r0["model"]["blocks.0.attn.qkv.weight"])
    assert load_training_state(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert len(load_training_state(tmp_path / "run" / "last.pt")["rng"]) == 2  # both ranks' RNG streams saved


# ------------------------------------------------------------------------------------------------ atomic writes


WRITER = """
import sys, torch
from collapse_probe.train.state import save_training_state
path, i = sys.argv[1], 0
while True:
    x = torch.randn(1_000_000)
    save_training_state(path, {"x": x, "sum": x.sum(), "i": i})
    i += 1
    print(i, flush=True)
"""


@pytest.mark.heavy
@pytest.mark.parametrize("delay", [0.05, 0.31, 0.77])
def test_sigkill_while_writing_never_corrupts_latest(tmp_path, delay):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # at least one complete write
        time.sleep(delay)  # then kill at an arbitrary point, most likely in the middle of a write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = load_training_state(path)
    assert state["x"].shape == (1_000_000,) and torch.equal(state["x"].sum(), state["sum"])


# ------------------------------------------------------------------------------------------------ BatchNorm


def test_bn_recalibration_reestimates_running_stats():
    torch.manual_seed(0)
    model = timm.create_model("deepvit_micro", depth=1, drop_path_rate=0.5).eval()
    bn = model.blocks[0].attn.mix_norm
    assert torch.equal(bn.running_mean, torch.zeros(4))  # fresh statistics
    images = torch.randn(6, 3, 32, 32)
    reference = copy.deepcopy(model)  # the module-by-module path, whose BatchNorm forward can be hooked
    for blk in reference.blocks:
        blk.attn.fast_reattn = False
    ref_bn = reference.blocks[0].attn.mix_norm
    seen = []
    handle = ref_bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    batches = [(images[:3], None), (images[3:], None)]
    assert recalibrate_bn(reference, batches, torch.device("cpu"), num_batches=5) == 2
    handle.remove()
    used = recalibrate_bn(model, batches, torch.device("cpu"), num_batches=5)  # the fast path
    assert used == 2 and not model.training and not bn.training and bn.momentum == 0.1
    # momentum None: the plain average of the two batches' per-head means (each batch [3, H, N, N])
    means = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen])
    torch.testing.assert_close(ref_bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert not torch.allclose(bn.running_mean, torch.zeros(4))
    assert int(bn.num_batches_tracked) == 2


# ------------------------------------------------------------------------------------------------ baselines


def test_default_options_leave_outputs_unchanged():
    torch.manual_seed(0)
    plain = timm.create_model("vit_micro", depth=3).eval()
    torch.manual_seed(0)
    opts = timm.create_model("vit_micro", depth=3, attn_temperature=(1.0, 1.0), attn_drop_max=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(plain(x), opts(x))


def test_attention_reuse_repeats_the_source_map():
    torch.manual_seed(0)
    model = timm.create_model("vit_micro", depth=4, attn_reuse_from=1).eval()
    with capture(model) as cap:
        model(torch.randn(2, 3, 32, 32))
    maps = cap.kind("probs")
    assert len(maps) == 4
    assert torch.equal(maps[2], maps[1]) and torch.equal(maps[3], maps[1])
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="attn_reuse_from"):
        timm.create_model("vit_micro", depth=4, attn_reuse_from=3)


def test_temperature_decays_linearly_and_sharpens_the_softmax():
    torch.manual_seed(0)
    plain = timm.create_model("vit_micro", depth=3).eval()
    torch.manual_seed(0)
    hot = timm.create_model("vit_micro", depth=3, attn_temperature=(0.5, 2.0)).eval()
    assert [b.attn.temperature for b in hot.blocks] == [0.5, 1.25, 2.0]
    x = torch.randn(2, 3, 32, 32)
    with capture(plain) as a:
        plain(x)
    with capture(hot) as b:
        hot(x)
    # block 0 sees the same input in both models: softmax(logits / T) = softmax(log p / T)
    expected = torch.softmax(torch.log(a.kind("probs")[0]) / 0.5, dim=-1)
    torch.testing.assert_close(b.kind("probs")[0], expected, rtol=1e-4, atol=1e-6)


def test_attention_dropping_rate_rises_with_depth_and_only_acts_in_training():
    model = timm.create_model("vit_micro", depth=5, attn_drop_max=0.4)
    assert [round(b.attn.attn_drop.p, 6) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(y1, model(x))


def test_cosine_regularizer_is_one_for_identical_maps_and_differentiable():
    torch.manual_seed(0)
    model = timm.create_model("vit_micro", depth=4, attn_reuse_from=0)  # blocks 1..3 reuse block 0's map
    reg = CosineRegularizer(model, weight=0.1, pairs=12)
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(reg.loss(), torch.tensor(0.1))
    reg.remove()
    deep = timm.create_model("deepvit_micro", depth=3, attn_reuse_from=0)  # reused Re-attention maps count too
    reg = CosineRegularizer(deep, weight=0.1, pairs=12)
    deep(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(reg.loss(), torch.tensor(0.1))
    reg.remove()

    model = timm.create_model("deepvit_micro", depth=3)
    reg = CosineRegularizer(model, weight=0.1, pairs=12)
    model(torch.randn(2, 3, 32, 32))
    loss = reg.loss()
    assert torch.isfinite(loss) and -0.1 <= float(loss.detach()) <= 0.1
    loss.backward()
    grad = model.blocks[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="before a forward"):
        reg.loss()
    reg.remove()


# ------------------------------------------------------------------------------------------------ config / CLI


def test_paper_preset_and_overrides():
    cfg = resolve_config("paper", data_dir="/data/imagenet", lr=1e-3)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr) == (1e-3, 0.05, 5, 1e-6, 1e-5)
    assert (cfg.auto_augment, cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0,
                                                                                     0.1, 0.25)
    assert (cfg.drop_path, cfg.model_ema_decay, cfg.epochs, cfg.cooldown_epochs) == (0.2, 0.99996, 300, 10)


def test_cli_print_config_and_bad_arguments():
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--preset", "paper", "--model", "deepvit_32b", "--data-dir", "/x",
                               "--depth", "24", "--set", "mixup=0.1", "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["model"] == "deepvit_32b" and cfg["model_args"] == {"depth": 24} and cfg["mixup"] == 0.1
    res = runner.invoke(main, ["train", "--set", "no_such_key=1", "--print-config"])
    assert res.exit_code == 2 and "no_such_key" in res.output
    res = runner.invoke(main, ["train", "--preset", "paper"])
    assert res.exit_code == 2 and "data_dir" in res.output


def test_image_folder_dataset_trains_with_its_class_count(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(["cat", "dog", "fish"]):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(4):
                px = (torch.rand(40, 48, 3, generator=g) * 80 + 80 * c).to(torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "data" / split / name / f"{i}.png")
    cfg = resolve_config("paper", model="vit_micro", model_args={"depth": 1}, data_dir=str(tmp_path / "data"),
                         output=str(tmp_path / "run"), epochs=1, cooldown_epochs=0, warmup_epochs=0, batch_size=4,
                         workers=0, device="cpu", progress=False, track_images=4)
    result = train(cfg)  # the full paper augmentation stack: RandAugment, mixup/cutmix, random erasing, EMA
    assert result.model.head.out_features == 3
    ev = read_checkpoint(tmp_path / "run" / "final.safetensors").metadata["eval"]
    assert ev["val_images"] == 12 and ev["dataset"] == "folder"
