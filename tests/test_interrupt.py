"""Interrupted commands leave complete outputs or none, and exit cleanly (SIGINT -> 130, SIGTERM -> 143).

    pytest tests/test_interrupt.py -q

Each long-running command is listed once in ``COMMANDS`` (how to start it, which files it writes, what it prints
on stderr once it is working, and how to tell a complete output); the test runs it in a real process, waits until it is
busy, sends the signal, and checks the exit status, the single "interrupted" line, no traceback, no temporary files
and no partial outputs. To cover a new command (audit, figures, train), add an entry.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from collapse_probe.loading.build import create_model
from collapse_probe.loading.save import save_checkpoint
from collapse_probe.outputs import write_file as atomic_write

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Command:
    build: Callable[[Path], tuple[list[str], list[Path]]]  # tmp dir -> (arguments after the program, outputs)
    busy: str  # text on stderr once the command is doing its long work
    complete: Callable[[Path], bool]  # whether an existing output file is whole


def _json_ok(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except ValueError:
        return False


def _similarity(tmp: Path) -> tuple[list[str], list[Path]]:
    ckpt = tmp / "m.safetensors"
    save_checkpoint(create_model("deepvit_micro"), ckpt)
    out = tmp / "out" / "sim.json"
    # thousands of seeded crops: minutes of work, so the signal surely lands mid-probe
    return ["similarity", str(ckpt), "--num-images", "5000", "--batch-size", "8", "--format", "json", "-o",
            str(out)], [out]


def _audit(tmp: Path) -> tuple[list[str], list[Path]]:
    ckpt = tmp / "m.safetensors"
    save_checkpoint(create_model("deepvit_micro"), ckpt)
    out = tmp / "report"
    return ["audit", str(ckpt), "--num-images", "5000", "--batch-size", "8", "-o", str(out)], [out]


def _report_ok(path: Path) -> bool:
    return path.is_dir() and _json_ok(path / "metrics.json") and (path / "report.html").is_file()


def _train(tmp: Path) -> tuple[list[str], list[Path]]:
    out = tmp / "run"
    return ["train", "--preset", "digits", "--model", "vit_micro", "--depth", "2", "--epochs", "200", "--workers",
            "0", "-o", str(out)], [out / "last.pt", out / "final.safetensors"]


def _torch_ok(path: Path) -> bool:
    from collapse_probe.loading.read import read_checkpoint

    try:
        read_checkpoint(path)
        return True
    except Exception:
        return False


def _figures(tmp: Path) -> tuple[list[str], list[Path]]:
    ckpts = tmp / "ckpts"
    for name, depth in (("vit_micro", 2), ("deepvit_micro", 3)):
        save_checkpoint(create_model(name, depth=depth), ckpts / f"{name}_d{depth}.safetensors")
    out = tmp / "figs"
    return ["figures", str(ckpts), "--num-images", "5000", "--batch-size", "8", "--no-pdf", "-o", str(out)], [out]


def _figures_ok(path: Path) -> bool:
    return path.is_dir() and (path / "summary.csv").is_file() and any(path.glob("*.png"))


COMMANDS: dict[str, Command] = {
    "figures": Command(_figures, busy="probing", complete=_figures_ok),
    "similarity": Command(_similarity, busy="probing", complete=_json_ok),
    "audit": Command(_audit, busy="probing", complete=_report_ok),
    "train": Command(_train, busy="epoch 2/", complete=_torch_ok),
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "COLLAPSE_PROBE_DEBUG": ""}


@pytest.mark.heavy  # a real interpreter per case, on a busy CPU
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_interrupt_leaves_complete_output_or_none(command: str, sig: signal.Signals, tmp_path: Path) -> None:
    spec = COMMANDS[command]
    args, outputs = spec.build(tmp_path)
    # a suite started in the background (`pytest &`) inherits SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: give the command the default disposition a terminal would
    proc = subprocess.Popen([sys.executable, "-m", "collapse_probe", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 400
    while spec.busy not in b"".join(chunks).decode(errors="replace"):
        assert proc.poll() is None, f"{command} ended before it got busy: {b''.join(chunks).decode()[-500:]}"
        assert time.monotonic() < deadline, f"{command} never printed {spec.busy!r}"
        time.sleep(0.2)
    time.sleep(0.5)  # well inside the work loop
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    stderr = b"".join(chunks).decode(errors="replace")
    assert code == (130 if sig == signal.SIGINT else 143), stderr[-800:]
    assert "Traceback" not in stderr
    last = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last == "interrupted: no output written" or last.startswith("interrupted: "), last
    for out in outputs:
        assert not out.exists() or spec.complete(out), f"partial output {out}"
        if out.parent.exists():
            assert [p for p in out.parent.iterdir() if p.name.endswith(".tmp")] == [], "temporary file left"
            assert [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == [], "staging left"


def test_atomic_write_interrupted_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C (or SIGTERM, raised as a KeyboardInterrupt subclass) in the middle of a write: old file or none."""
    from collapse_probe.cli import _Terminated

    target = tmp_path / "r.json"

    def half_then_signal(tmp: str) -> None:
        Path(tmp).write_text('{"partial": ')
        raise _Terminated()

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_signal)
    assert list(tmp_path.iterdir()) == []
    target.write_text('{"old": 1}')
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_signal)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and _json_ok(target)


def test_sigterm_handler_is_restored_after_cli_run(tmp_path: Path) -> None:
    """The CLI turns SIGTERM into a clean exit only while it runs; an embedding process keeps its own handler."""
    from click.testing import CliRunner

    from collapse_probe.cli import main

    def mine(signum, frame) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        result = CliRunner().invoke(main, ["similarity", str(tmp_path / "missing.safetensors")])
        assert result.exit_code == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_cli_exit_codes_for_signals(monkeypatch, tmp_path: Path) -> None:
    """In process: a KeyboardInterrupt during the command -> 130, our SIGTERM exception -> 143, one line each."""
    from click.testing import CliRunner

    import collapse_probe.probing.checked as probe_mod
    from collapse_probe.cli import _Terminated, main

    ckpt, out = tmp_path / "x.safetensors", tmp_path / "out"  # a real file: the CLI reads its metadata for images
    save_checkpoint(create_model("vit_micro", depth=1), ckpt)
    out.mkdir()
    for exc, code in ((KeyboardInterrupt(), 130), (_Terminated(), 143)):
        def boom(*a, _e=exc, **k):
            raise _e
        monkeypatch.setattr(probe_mod, "probe", boom)
        result = CliRunner().invoke(main, ["similarity", str(ckpt), "-o", str(out / "o.json")])
        assert result.exit_code == code
        assert result.stderr.strip() == "interrupted: no output written"
        assert list(out.iterdir()) == []
