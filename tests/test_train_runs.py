"""Training runs the way timm's train.py and LightningCLI users expect (issue 13, trainer items of issue 17): --config
files, versioned run folders, --resume [PATH], --initial-checkpoint, typed --set, data errors in one line,
TensorBoard scalars, best.safetensors, progress without escape codes. Tiny synthetic runs on the CPU.
"""
from __future__ import annotations

import os
import stat
import sys

import pytest
import torch
from click.testing import CliRunner

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.cli import main
from collapse_probe.loading.read import read_checkpoint
from collapse_probe.train import resolve_config, train
from collapse_probe.train.config import PRESET_HELP
from collapse_probe.train.state import load_training_state

TINY = ["--preset", "smoke", "--device", "cpu", "--epochs", "1", "--depth", "1", "--set", "synthetic_size=16",
        "--set", "track_images=4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(*args: str):
    return CliRunner().invoke(main, ["train", *args])


def _one_line(res, code: int, *words: str, started: bool = False) -> None:
    """Exit ``code`` with one error line naming ``words``; ``started``: after the run's start-up line (an error found
    while training, such as an image that cannot be read)."""
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    if started:
        assert lines and lines[0].startswith("train: "), res.stderr
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """One finished 1-epoch, 1-block run (vit_micro: no BatchNorm, so weights compare exactly)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    res = _cli(*TINY, "--model", "vit_micro", "-o", str(out))
    assert res.exit_code == 0, res.output
    return out


# ------------------------------------------------------------------------------------------------ run folders


def test_second_run_into_the_same_output_is_refused(run_a):
    log = (run_a / "log.csv").read_text()
    _one_line(_cli(*TINY, "--model", "vit_micro", "-o", str(run_a)), 2, "already holds a training run", "--resume")
    assert (run_a / "log.csv").read_text() == log


def test_default_output_is_a_fresh_version_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "train" / "version_3").mkdir(parents=True)  # N is one above the highest, as in Lightning
    for expected in ("version_4", "version_5"):
        res = _cli(*TINY, "--set", "eval_every=0", "--set", "track_every=0")
        assert res.exit_code == 0, res.output
        assert (tmp_path / "runs" / "train" / expected / "last.pt").exists()
    assert len((tmp_path / "runs/train/version_4/log.csv").read_text().splitlines()) == 2  # header + 1 epoch


# ------------------------------------------------------------------------------------------------ resume / fine-tune


def test_resume_refuses_changed_settings_and_foreign_files(run_a, tmp_path):
    base = [*TINY, "--model", "vit_micro", "-o", str(run_a)]
    _one_line(_cli(*base, "--resume", "--lr", "0.5"), 2, "lr: 0.001 -> 0.5")
    _one_line(_cli(*TINY, "--model", "vit_micro", "--depth", "2", "-o", str(run_a), "--resume"), 2, "model_args")
    res = _cli(*base, "--resume")  # same settings: nothing left to train after its one epoch, and it says so
    assert res.exit_code == 0 and "already finished 1 epochs; nothing to do" in res.stderr, res.output
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    elsewhere = [*TINY, "--model", "vit_micro", "-o", str(tmp_path / "new")]
    _one_line(_cli(*elsewhere, "--resume", str(foreign)), 4, "no 'model'")
    _one_line(_cli(*base, "--resume", str(foreign)), 2, "holds another run")  # never into another run's folder
    _one_line(_cli(*base, "--resume", str(tmp_path / "missing.pt")), 2, "does not exist")
    assert not (tmp_path / "new").exists()
    state = load_training_state(run_a / "last.pt")  # a last.pt without its config: the shapes decide, exit 5
    del state["config"]
    torch.save(state, tmp_path / "noconfig.pt")
    _one_line(_cli(*TINY, "--model", "vit_micro", "--depth", "2", "-o", str(tmp_path / "b"), "--resume",
                   str(tmp_path / "noconfig.pt")), 5, "does not fit")


def test_initial_checkpoint_starts_from_its_weights(run_a, tmp_path):
    start = read_checkpoint(run_a / "final.safetensors").state_dict
    cfg = resolve_config("smoke", model="vit_micro", model_args={"depth": 1}, synthetic_size=16, epochs=1, lr=0.0,
                         warmup_lr=0.0, min_lr=0.0, weight_decay=0.0, device="cpu", output=str(tmp_path / "ft"),
                         initial_checkpoint=str(run_a / "final.safetensors"), track_every=0)
    result = train(cfg)  # lr 0: the weights stay what the file held
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    _one_line(_cli(*TINY, "--model", "vit_micro", "--depth", "2", "-o", str(tmp_path / "deeper"),
                   "--initial-checkpoint", str(run_a / "final.safetensors")), 5, "does not fit")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    _one_line(_cli(*TINY, "-o", str(tmp_path / "junk"), "--initial-checkpoint", str(tmp_path / "junk.safetensors")),
              4)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("setting, word", [("epochs=1.5", "integer"), ("lr=abc", "number"), ("scale=[1]", "list"),
                                           ("scale=0.5", "list"), ("model_args=3", "mapping"), ("amp=1", "string")])
def test_set_with_the_wrong_type_is_one_line(setting, word):
    _one_line(_cli("--set", setting, "--print-config"), 2, setting.split("=")[0], word)


def test_config_file_then_options(tmp_path):
    import json

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: smoke\nlr: 0.002\nepochs: 3\nscale: [0.5, 1.0]\nmodel_args: {depth: 2}\n")
    res = _cli("-c", str(recipe), "--epochs", "1", "--print-config")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert (cfg["preset"], cfg["lr"], cfg["epochs"], cfg["scale"], cfg["model_args"]) == ("smoke", 0.002, 1,
                                                                                          [0.5, 1.0], {"depth": 2})
    assert json.loads(_cli("-c", str(recipe), "--set", "lr=0.1", "--print-config").stdout)["lr"] == 0.1
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nlearning_rate: 0.2\n")
    _one_line(_cli("-c", str(tmp_path / "bad.yaml"), "--print-config"), 2, "learning_rate")
    (tmp_path / "broken.yaml").write_text("lr: [0.1\n")
    _one_line(_cli("-c", str(tmp_path / "broken.yaml"), "--print-config"), 2, "not valid YAML")
    (tmp_path / "list.yaml").write_text("- lr\n")
    _one_line(_cli("-c", str(tmp_path / "list.yaml"), "--print-config"), 2, "mapping")


def test_preset_help_describes_every_preset():
    text = " ".join(_cli("--help").output.split())
    for name, description in PRESET_HELP.items():
        assert f"[{name}] {description}" in text


# ------------------------------------------------------------------------------------------------ data errors


def _folder(root, bad: str | None = None) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(root / split / name / f"{i}.png")
    if bad == "empty":
        (root / "train" / "fish").mkdir()
    elif bad == "corrupt":
        (root / "train" / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


@pytest.mark.parametrize("bad, workers, code, word", [("empty", 0, 2, "fish"), ("corrupt", 0, 4, "2.png"),
                                                      ("corrupt", 1, 4, "2.png")])
def test_data_dir_problems_are_one_line(tmp_path, bad, workers, code, word):
    _folder(tmp_path / "data", bad)
    res = _cli("--preset", "smoke", "--device", "cpu", "--model", "vit_micro", "--depth", "1", "--data-dir",
               str(tmp_path / "data"), "--batch-size", "4", "--workers", str(workers), "-o", str(tmp_path / "run"),
               "--set", "model_args={\"img_size\": 32, \"depth\": 1}")
    _one_line(res, code, word, started=bad == "corrupt")
    assert not (tmp_path / "run").exists()  # no empty or half-made run folder after a data error


# ------------------------------------------------------------------------------------------------ logs, checkpoints


def test_tensorboard_scalars_best_checkpoint_and_permissions(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    old = os.umask(0o022)
    try:
        res = _cli(*TINY, "--epochs", "2", "--set", "eval_every=1", "-o", str(tmp_path / "run"))
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/top1", "val/top5", "lr", "collapse/similar_blocks"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    log = list(__import__("csv").DictReader(open(tmp_path / "run" / "log.csv")))
    assert [round(e.value, 4) for e in acc.Scalars("val/top1")] == [round(float(r["top1"]), 4) for r in log]
    best = read_checkpoint(tmp_path / "run" / "best.safetensors").metadata["eval"]
    tops = [max(float(r["top1"]), float(r["ema_top1"])) for r in log]
    assert best["top1"] == pytest.approx(max(tops), abs=1e-4) and best["epoch"] == tops.index(max(tops)) + 1
    for name in ("final.safetensors", "best.safetensors", "last.pt", "config.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


def test_training_works_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if it were not installed
    res = _cli(*TINY, "-o", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final.safetensors").exists()
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_progress_off_a_terminal_is_plain_lines(tmp_path):
    res = _cli(*TINY, "--model", "deepvit_micro", "--progress", "--set", "bn_recalib_batches=1",
               "-o", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert "\x1b[" not in res.stderr and "\r" not in res.stderr
    for phase in ("epoch 1/1: training", "BatchNorm re-calibration (raw)", "evaluation (raw)", "evaluation (ema)",
                  "collapse tracking"):
        assert phase in res.stderr, phase
