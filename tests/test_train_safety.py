"""The trainer with hostile or careless inputs (issue 23 item 6, issue 24 items 1-3, 6): it writes only folders it made
or runs it wrote, checks every part of a last.pt before writing anything, reads files through the probing commands'
safety checks, bounds config values and YAML aliases, and ends full disks and closed pipes with one line. Plus the
behaviour timm and Lightning users expect: ``--resume --epochs N`` extends a run, a finished run does nothing,
nested ``model_args`` merge, epochs numbered from 1. Every case is built here; tiny synthetic runs on the CPU.
"""
from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.cli import main

from . import hostile

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "smoke", "--device", "cpu", "--model", "vit_micro", "--depth", "1", "--set", "synthetic_size=16",
        "--set", "track_images=4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(*args: object):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def _errors(res, code: int, *words: str) -> str:
    """Exit ``code``, exactly one error line (the last) naming ``words``, no traceback; returns that line."""
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert "internal error" not in errors[0] and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _one_line(res, code: int, *words: str) -> None:
    _errors(res, code, *words)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 1-epoch, 1-block run (vit_micro: AdamW, EMA, no BatchNorm)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    res = _cli(*TINY, "--epochs", "1", "-o", out)
    assert res.exit_code == 0, res.output
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------------------------------------ hostile last.pt


def _first_moment(s):
    k = next(iter(s["optimizer"]["state"]))
    return s["optimizer"]["state"][k]


HOSTILE_STATES = {
    "epoch_text": (lambda s: s.update(epoch="x"), 4, "epoch 'x'"),
    "epoch_negative": (lambda s: s.update(epoch=-1_000_000_000), 4, "epoch"),
    "epoch_past_the_run": (lambda s: s.update(epoch=10**9), 4, "epoch"),
    "updates_negative": (lambda s: s.update(num_updates=-1), 4, "num_updates"),
    "scheduler_optimizer_entry": (lambda s: s.update(scheduler={"optimizer": 0}), 4, "scheduler"),
    "scheduler_t_initial_0": (lambda s: s["scheduler"].update(t_initial=0), 4, "t_initial"),
    "scheduler_not_a_mapping": (lambda s: s.update(scheduler=[1]), 4, "scheduler"),
    "rng_empty": (lambda s: s.update(rng=[]), 4, "rng"),
    "rng_wrong_size": (lambda s: s["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8)), 4, "rng"),
    "rng_python_words": (lambda s: s["rng"][0]["python"]["state"].fill_(-5), 4, "rng"),
    "adam_moment_shape": (lambda s: _first_moment(s).update(exp_avg=torch.zeros(3, 3)), 4, "shape"),
    "adam_moment_missing": (lambda s: _first_moment(s).pop("exp_avg"), 4, "exp_avg"),
    "adam_moment_nan": (lambda s: _first_moment(s)["exp_avg_sq"].fill_(math.nan), 4, "non-finite"),
    "optimizer_lr_nan": (lambda s: s["optimizer"]["param_groups"][0].update(lr=math.nan), 4, "lr"),
    "optimizer_betas": (lambda s: s["optimizer"]["param_groups"][0].update(betas=(0.1, 0.2)), 4, "betas"),
    "optimizer_no_groups": (lambda s: s["optimizer"].update(param_groups=[]), 4, "optimizer"),
    "config_not_a_mapping": (lambda s: s.update(config="x"), 4, "config"),
    "config_out_of_range": (lambda s: s["config"].update(workers=-1), 4, "workers"),
    "config_other_settings": (lambda s: s["config"].update(lr=0.5), 2, "lr: 0.5 -> 0.001"),
    "weights_nan": (lambda s: s["model"]["head.weight"].fill_(math.nan), 4, "non-finite"),
    "weights_other_shape": (lambda s: s["model"].update({"head.weight": torch.zeros(3, 3)}), 5, "does not fit"),
    "weights_not_tensors": (lambda s: s.update(model={"head.weight": 1}), 4, "model"),
    "ema_missing": (lambda s: s.update(model_ema=None), 4, "model_ema"),
    "history_not_a_list": (lambda s: s.update(history="x"), 4, "history"),
    "scaler_not_a_mapping": (lambda s: s.update(scaler=3), 4, "scaler"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_STATES))
def test_hostile_last_pt_is_one_line_and_touches_nothing(run, tmp_path, case):
    change, code, word = HOSTILE_STATES[case]
    folder = _copy(run, tmp_path / "run")
    state = torch.load(folder / "last.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "last.pt")
    before = _snapshot(folder)
    _one_line(_cli(*TINY, "-o", folder, "--resume", "--epochs", "2"), code, word)  # would extend: a write if it passed
    assert _snapshot(folder) == before


def _torchscript(path: Path) -> Path:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    return path


@pytest.mark.parametrize("build, code, word", [
    (lambda p, s: hostile.deflate_bomb(p, 256), 3, "compressed"),  # a 256 MiB pickle in a file of a few hundred KiB
    (lambda p, s: _torchscript(p), 3, "TorchScript"),
    (lambda p, s: hostile.as_torch_zip(p, hostile.dumps(hostile.payloads(s)["os_system"])), 3, "posix.system"),
    (lambda p, s: hostile.as_legacy(p, hostile.dumps({"model": {}})), 4, "not a last.pt"),
], ids=["deflate_bomb", "torchscript", "pickle_payload", "legacy_format"])
def test_resume_reads_through_the_checkpoint_safety_checks(run, tmp_path, build, code, word):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    folder = _copy(run, tmp_path / "run")
    build(folder / "last.pt", sentinel)
    before = _snapshot(folder)
    line = _errors(_cli(*TINY, "-o", folder, "--resume", "--epochs", "2"), code, word)
    assert len(_cli(*TINY, "-o", folder, "--resume").stderr.strip().splitlines()) == 1
    assert _snapshot(folder) == before and not list(sentinel.iterdir())
    if code == 3:  # refused as the probing commands refuse the same file, also as --initial-checkpoint
        probe = CliRunner().invoke(main, ["similarity", str(folder / "last.pt")])
        assert probe.exit_code == 3 and word in probe.stderr and word in line
        _one_line(_cli(*TINY, "-o", tmp_path / "ft", "--initial-checkpoint", folder / "last.pt"), 3, word)
        assert not (tmp_path / "ft").exists()


def test_a_fifo_as_resume_or_initial_checkpoint_is_refused(run, tmp_path):
    fifo = tmp_path / "last.pt"
    os.mkfifo(fifo)
    _one_line(_cli(*TINY, "-o", tmp_path / "a", "--resume", fifo), 2, "not a file")
    _one_line(_cli(*TINY, "-o", tmp_path / "b", "--initial-checkpoint", fifo), 2, "not a regular file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ folders


def _user_folder(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"project": "mine", "lr": 3}\n')
    (root / "log.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    (root / "notes.txt").write_text("do not touch\n")
    return root


def test_a_user_folder_is_never_written_from_flags_or_a_recipe(tmp_path):
    user = _user_folder(tmp_path / "proj")
    before = _snapshot(user)
    _one_line(_cli(*TINY, "-o", user, "--resume"), 2, "did not write", "nothing was changed")
    _one_line(_cli(*TINY, "-o", user), 2, "did not write")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"preset: smoke\noutput: {user}\nresume: true\nmodel: vit_micro\nsynthetic_size: 16\n")
    _one_line(_cli("-c", recipe, "--device", "cpu"), 2, "did not write")
    assert _snapshot(user) == before


def test_resume_path_into_its_user_folder_is_refused(run, tmp_path):
    user = _user_folder(tmp_path / "downloads")
    shutil.copy(run / "last.pt", user / "last.pt")
    before = _snapshot(user)
    _one_line(_cli(*TINY, "--resume", user / "last.pt"), 2, "did not write")
    assert _snapshot(user) == before
    res = _cli(*TINY, "--resume", user / "last.pt", "--epochs", "2", "-o", tmp_path / "elsewhere")  # -o a new folder
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in _rows(tmp_path / "elsewhere" / "log.csv")] == ["2"]


def test_a_log_that_is_not_ours_is_refused_before_anything_is_written(run, tmp_path):
    folder = _copy(run, tmp_path / "run")
    (folder / ".collapse-probe-run.json").unlink()  # an earlier version's folder: our config.json + last.pt
    (folder / "log.csv").write_text("step,loss\n1,0.5\n")
    before = _snapshot(folder)
    _one_line(_cli(*TINY, "-o", folder, "--resume", "--epochs", "2"), 2, "log.csv was not written by collapse-probe")
    assert _snapshot(folder) == before


def test_one_trainer_per_folder(run, tmp_path):
    folder = _copy(run, tmp_path / "run")
    before = _snapshot(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a trainer writing it holds it
        _one_line(_cli(*TINY, "-o", folder, "--resume", "--epochs", "2"), 2, "another collapse-probe train")
    finally:
        os.close(fd)
    assert _snapshot(folder) == before


def test_stale_temporaries_of_ours_are_removed_on_the_next_run(run, tmp_path):
    folder = _copy(run, tmp_path / "run")
    (folder / ".last.pt.k2j3h4_a.tmp").write_bytes(b"half a checkpoint")
    (folder / ".report.collapse-probe-4194305-x1.tmp").mkdir()  # pid above Linux's maximum: surely not running
    (folder / ".mine.tmp").write_text("the user's")
    res = _cli(*TINY, "-o", folder, "--resume", "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == [".mine.tmp"]


# ------------------------------------------------------------------------------------------------ resume, epochs


def _cosine(t: int, total: int, warmup: int, base=1e-3, warmup_lr=1e-6, min_lr=1e-5) -> float:
    """timm's CosineLRScheduler per update (warmup_prefix False, one cycle), written out."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    if t >= total:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


def test_resume_with_more_epochs_extends_the_run_and_stretches_the_schedule(tmp_path):
    out = tmp_path / "run"
    assert _cli(*TINY, "--epochs", "2", "-o", out).exit_code == 0
    res = _cli(*TINY, "-o", out, "--resume", "--epochs", "4")
    assert res.exit_code == 0, res.output
    assert "stretched to 4 epochs from the current step" in res.stderr
    log = _rows(out / "log.csv")
    assert [r["epoch"] for r in log] == ["1", "2", "3", "4"]  # 1-based, each once
    steps = 2  # 16 images, batch 8; smoke: 1 warm-up epoch
    expected = [_cosine(2, 2 * steps, steps), _cosine(4, 2 * steps, steps),  # the 2-epoch schedule
                _cosine(6, 4 * steps, steps), _cosine(8, 4 * steps, steps)]  # then the 4-epoch one, same step count
    assert [float(r["lr"]) for r in log] == pytest.approx(expected, rel=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 4 and cfg["extended"] == [{"at_epoch": 2, "from": 2, "to": 4}]
    assert {r["epoch"] for r in _rows(out / "collapse.csv")} == {"1", "2", "3", "4"}
    assert "resumed from" in res.stderr and "epochs 3..4" in res.stderr
    assert [ln.split()[0] for ln in res.stderr.splitlines() if ln.startswith("epoch=")] == ["epoch=3", "epoch=4"]


def test_resume_needs_none_of_the_options_that_started_the_run(tmp_path):
    """As in timm and Lightning: the run's own settings (config.json) are the base, the command line changes them."""
    out = tmp_path / "run"
    assert _cli(*TINY, "--epochs", "1", "--set", "lr=0.002", "-o", out).exit_code == 0
    res = _cli("-o", out, "--resume", "--epochs", "2", "--device", "cpu")  # no preset, model, depth or lr
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "vit_micro" and cfg["model_args"]["depth"] == 1 and cfg["lr"] == 0.002
    assert [r["epoch"] for r in _rows(out / "log.csv")] == ["1", "2"]
    changed = _cli("-o", out, "--resume", "--epochs", "3", "--lr", "0.5", "--device", "cpu")  # a real change
    assert changed.exit_code == 2 and "lr" in changed.stderr


def test_a_finished_run_does_nothing_and_says_so(run, tmp_path):
    folder = _copy(run, tmp_path / "run")
    before = _snapshot(folder)
    res = _cli(*TINY, "-o", folder, "--resume")
    assert res.exit_code == 0, res.output
    assert res.stderr.strip() == (f"run {folder} already finished 1 epochs; nothing to do; use --resume --epochs M "
                                  "with M > 1 to train longer")
    assert _snapshot(folder) == before  # no new event file, no rewritten config.json
    res = _cli(*TINY, "-o", folder, "--resume", "--epochs", "1")  # the same length, said explicitly
    assert res.exit_code == 0 and "nothing to do" in res.stderr and _snapshot(folder) == before


def test_a_finished_run_without_its_final_export_gets_it(run, tmp_path):
    folder = _copy(run, tmp_path / "run")
    (folder / "final.safetensors").unlink()  # stopped between the last last.pt and the export
    res = _cli(*TINY, "-o", folder, "--resume")
    assert res.exit_code == 0, res.output
    assert (folder / "final.safetensors").is_file() and len(_rows(folder / "log.csv")) == 1


def _legacy(folder: Path) -> None:
    """Make ``folder`` look as an earlier version left it: no manifest, epochs numbered from 0 everywhere."""
    (folder / ".collapse-probe-run.json").unlink()
    for name in ("log.csv", "collapse.csv"):
        rows = list(csv.reader(open(folder / name, newline="")))
        with open(folder / name, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [[str(int(r[0]) - 1), *r[1:]] for r in rows[1:]])
    state = torch.load(folder / "last.pt", weights_only=True)
    del state["epoch_base"]
    for r in state["history"]:
        r["epoch"] -= 1
    torch.save(state, folder / "last.pt")


def test_a_run_of_an_earlier_version_resumes_with_its_logs_renumbered(run, tmp_path):
    folder = _copy(run, tmp_path / "run")
    _legacy(folder)
    before = _snapshot(folder)
    assert _cli(*TINY, "-o", folder, "--resume").exit_code == 0  # finished: still nothing touched, no manifest
    assert _snapshot(folder) == before
    res = _cli(*TINY, "-o", folder, "--resume", "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in _rows(folder / "log.csv")] == ["1", "2"]
    assert {r["epoch"] for r in _rows(folder / "collapse.csv")} == {"1", "2"}
    assert json.loads((folder / ".collapse-probe-run.json").read_text())["epoch_base"] == 1
    assert [r["epoch"] for r in torch.load(folder / "last.pt", weights_only=True)["history"]] == [1, 2]


# ------------------------------------------------------------------------------------------------ writes that fail


def test_a_full_disk_while_saving_last_pt_is_one_line(run, tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):  # what torch raises when the stream cannot be written
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048")

    folder = _copy(run, tmp_path / "run")
    last = (folder / "last.pt").read_bytes()
    monkeypatch.setattr(torch, "save", full)
    _errors(_cli(*TINY, "-o", folder, "--resume", "--epochs", "2"), 2, "cannot write", "last.pt", "disk")
    assert (folder / "last.pt").read_bytes() == last and not [p for p in folder.iterdir() if p.suffix == ".tmp"]
    _errors(_cli(*TINY, "--epochs", "1", "-o", tmp_path / "fresh"), 2, "last.pt")
    assert not (tmp_path / "fresh").exists()  # a run that never saved an epoch leaves nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_line(run, tmp_path):
    folder = _copy(run, tmp_path / "run")
    before = _snapshot(folder)
    folder.chmod(0o555)
    try:
        _one_line(_cli(*TINY, "-o", folder, "--resume", "--epochs", "2"), 2, "cannot write")
    finally:
        folder.chmod(0o755)
    assert _snapshot(folder) == before


def test_a_full_disk_while_saving_safetensors_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    _errors(_cli(*TINY, "--epochs", "1", "-o", tmp_path / "run"), 2, "cannot write", "best.safetensors")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("text, word", [
    ("seed: 1e23", "seed"),  # YAML 1.1 reads this as text
    ("seed: 100000000000000000000000", "seed"), ("seed: -1", "seed"), ("workers: -1", "workers"),
    ("lr: .nan", "lr"), ("lr: .inf", "lr"), ("track_images: -5", "track_images"), ("epochs: 1000000000", "epochs"),
    ("batch_size: 0", "batch_size"), ("scale: [0.9, 0.1]", "scale"), ("device: ''", "device"),
    ("smoothing: 1.5", "smoothing"), ("model_args: {depth: 100000}", "depth"),
    ("model_args: {mlp_ratio: .nan}", "mlp_ratio"), ("warmup_lr: 1e400", "warmup_lr"),
])
def test_config_values_out_of_range_are_one_line(tmp_path, text, word):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"preset: smoke\n{text}\n")
    _one_line(_cli("-c", recipe, "--print-config"), 2, word)


def test_device_and_set_values_out_of_range(tmp_path):
    _one_line(_cli("--preset", "smoke", "--device", "", "--print-config"), 2, "device")
    _one_line(_cli("--preset", "smoke", "--set", "lr=NaN", "--print-config"), 2, "lr")
    _one_line(_cli("--preset", "smoke", "--set", "seed=4294967296", "--print-config"), 2, "seed")


@pytest.mark.parametrize("args, word", [("{\"embed_dim\": 200000}", "parameters"),
                                        ("{\"img_size\": 65536}", "activations")])
def test_a_model_no_machine_could_hold_is_refused_before_allocation(tmp_path, args, word):
    _one_line(_cli(*TINY, "--set", f"model_args={args}", "-o", tmp_path / "run"), 2, "needs about", word)
    assert not (tmp_path / "run").exists()


def _bomb(levels: int = 9) -> str:
    lines = ["preset: smoke", "model_args:", "  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", [["--print-config"], ["--device", "cpu", "-o", "RUN"]], ids=["print", "train"])
def test_a_yaml_alias_bomb_is_refused_in_bounded_memory(tmp_path, command):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb())  # 9**9 = 387 million strings once expanded
    assert recipe.stat().st_size < 600
    args = [sys.executable, "-m", "collapse_probe", "train", "-c", str(recipe),
            *[str(tmp_path / "run") if a == "RUN" else a for a in command]]
    probe = ("import json, resource, subprocess, sys; r = subprocess.run(json.loads(sys.argv[1]), capture_output=True, "
             "text=True, timeout=120); print(json.dumps([r.returncode, r.stderr, "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("COLLAPSE_PROBE_DEBUG", None)
    done = subprocess.run([sys.executable, "-c", probe, json.dumps(args)], capture_output=True, text=True, env=env,
                          timeout=180)
    code, stderr, peak_kib = json.loads(done.stdout)
    assert code == 2 and stderr.startswith("error: ") and "expands to more than" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert peak_kib < 1024 * 1024  # the child's peak RSS stays under 1 GiB (the config alone: a few MiB)
    assert not (tmp_path / "run").exists()


def test_a_recursive_yaml_alias_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("preset: smoke\nmodel_args: &a {depth: 2, again: *a}\n")
    _one_line(_cli("-c", recipe, "--print-config"), 2, "recursive")


def test_model_args_merge_key_by_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: smoke\nmodel_args: {mlp_ratio: 1.0}\n")  # smoke's model_args are {depth: 2}

    def model_args(*extra: str) -> dict:
        res = _cli("-c", recipe, *extra, "--print-config")
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["model_args"]
    assert model_args() == {"depth": 2, "mlp_ratio": 1.0}
    assert model_args("--set", "model_args.depth=3") == {"depth": 3, "mlp_ratio": 1.0}
    assert model_args("--set", "model_args={\"num_heads\": 2}", "--depth", "4") == {"depth": 4, "mlp_ratio": 1.0,
                                                                                     "num_heads": 2}
    assert model_args("--set", "model_args.mlp_ratio=null") == {"depth": 2}  # null removes a key (RFC 7386)


def test_print_config_into_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("COLLAPSE_PROBE_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "collapse_probe", "train", "--print-config"], stdout=write,
                            stderr=subprocess.PIPE, env=env)
    os.close(write)
    os.close(read)  # `| head -1` that has already gone: every write is EPIPE
    _, err = proc.communicate(timeout=120)
    assert err == b"" and proc.returncode == 141


# ------------------------------------------------------------------------------------------------ data


def _image_folder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(root / split / name / f"{i}.png")


@pytest.mark.timeout(180)
def test_a_fifo_among_the_images_is_skipped_not_waited_for(tmp_path):
    _image_folder(tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "train" / "cat" / "x.png")
    res = _cli("--preset", "smoke", "--device", "cpu", "--model", "vit_micro", "--depth", "1", "--epochs", "1",
               "--data-dir", tmp_path / "data", "--batch-size", "4", "-o", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "8 training / 8 validation images" in res.stderr


def test_a_data_error_leaves_no_run_folder_also_by_default(tmp_path, monkeypatch):
    _image_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "fish").mkdir()  # a class without images
    monkeypatch.chdir(tmp_path)
    _one_line(_cli("--preset", "smoke", "--device", "cpu", "--model", "vit_micro", "--depth", "1",
                   "--data-dir", tmp_path / "data", "--batch-size", "4"), 2, "fish")
    assert not (tmp_path / "runs").exists()
