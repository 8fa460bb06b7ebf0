"""Outputs never destroy what the user owns: refused folders stay byte for byte, swaps are atomic under signals.

    pytest tests/test_outputs.py -q

Covers ``collapse_probe.outputs`` directly (folder ownership, symlinks, devices, OSError mapping, recovery after
SIGKILL) and through the CLI (``audit -o``, ``compare -o``, ``figures -o``, ``similarity -o``) on folders that hold a
user's files, the audited checkpoint itself and a ``metrics.json`` that collapse-probe did not write.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from collapse_probe import outputs
from collapse_probe.cli import main
from collapse_probe.errors import BadArgumentError
from collapse_probe.loading.build import create_model
from collapse_probe.loading.save import save_checkpoint
from collapse_probe.outputs import MANIFEST, write_file, write_folder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num-images", "2", "--batch-size", "2", "--no-progress"]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: relative name -> SHA-256 of a file, 'dir', or the kind of anything else."""
    snap = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else (
            "dir" if p.is_dir() else f"mode {stat.S_IFMT(os.lstat(p).st_mode)}")
    return snap


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_checkpoint(create_model("deepvit_micro", depth=2), path)
    return path


@pytest.fixture
def project(tmp_path: Path, ckpt: Path) -> Path:
    """A user's folder: a thesis, a source tree, the checkpoint itself and a metrics.json of their own."""
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article} chapter 3")
    (folder / "src" / "train.py").write_text("print('my training script')")
    (folder / "metrics.json").write_text('{"accuracy": 0.91}')
    (folder / "model.safetensors").write_bytes(ckpt.read_bytes())
    return folder


def _one_line_exit(res, code: int) -> None:
    assert res.exit_code == code, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("command", ["audit", "compare", "figures"])
def test_a_users_folder_is_never_replaced(command: str, project: Path) -> None:
    before = _snapshot(project)
    inner = str(project / "model.safetensors")
    args = {"audit": ["audit", inner, "-o", str(project)],
            "compare": ["compare", inner, inner, "-o", str(project)],
            "figures": ["figures", "--checkpoints", inner, "--no-pdf", "-o", str(project)]}[command]
    res = CliRunner().invoke(main, [*args, *FAST])
    _one_line_exit(res, 2)
    assert "did not write" in res.output
    assert _snapshot(project) == before
    assert [p.name for p in project.parent.iterdir()] == ["project"]  # no staging left beside it


def test_audit_into_the_current_folder_is_refused(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    res = CliRunner().invoke(main, ["audit", str(ckpt), "-o", ".", *FAST])
    _one_line_exit(res, 2)
    assert "current folder" in res.output and list(tmp_path.iterdir()) == [here] and not any(here.iterdir())


def test_own_report_is_replaced_and_edited_report_is_not(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "report"
    assert CliRunner().invoke(main, ["audit", str(ckpt), "-o", str(out), *FAST]).exit_code == 0
    first = _snapshot(out)
    assert MANIFEST in first
    res = CliRunner().invoke(main, ["audit", str(ckpt), "-o", str(out), "--threshold", "0.5", *FAST])
    assert res.exit_code == 0, res.output
    assert _snapshot(out) != first and sorted(_snapshot(out)) == sorted(first)
    (out / "report.md").write_text("my edits")  # changed since we wrote it: now it is the user's
    before = _snapshot(out)
    res = CliRunner().invoke(main, ["audit", str(ckpt), "-o", str(out), *FAST])
    _one_line_exit(res, 2)
    assert "report.md" in res.output and _snapshot(out) == before


def test_symlinks_are_written_through(tmp_path: Path, ckpt: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    res = CliRunner().invoke(main, ["similarity", str(ckpt), "--format", "json", "-o", str(link), *FAST])
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(real) and real.read_text().startswith("{")
    folder = tmp_path / "reports" / "v1"
    folder.mkdir(parents=True)
    dlink = tmp_path / "latest"
    dlink.symlink_to(folder, target_is_directory=True)
    res = CliRunner().invoke(main, ["audit", str(ckpt), "-o", str(dlink), *FAST])
    assert res.exit_code == 0, res.output
    assert dlink.is_symlink() and (folder / "metrics.json").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_device_nodes_are_never_replaced(tmp_path: Path, ckpt: Path) -> None:
    dev = tmp_path / "full"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # the same device as /dev/full
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (dev, fifo, Path("/dev/full"), Path("/dev/null")):
        for args in (["similarity", str(ckpt), "-o", str(target)], ["audit", str(ckpt), "-o", str(target)]):
            res = CliRunner().invoke(main, [*args, *FAST])
            _one_line_exit(res, 2)
    assert stat.S_ISCHR(os.lstat(dev).st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode) and stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_dash_and_dev_stdout_mean_standard_output(tmp_path: Path, ckpt: Path) -> None:
    for target in ("-", "/dev/stdout"):
        res = subprocess.run([sys.executable, "-m", "collapse_probe", "similarity", str(ckpt), "--format", "csv",
                              "-o", target, *FAST], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("block") or "block" in res.stdout.splitlines()[0], res.stdout[:200]
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode) and not (tmp_path / "-").exists()


@pytest.mark.parametrize("case", ["parent is a file", "name too long"])
def test_output_path_problems_are_one_line_exit_2(case: str, tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "afile").write_text("x")
    target = {"parent is a file": tmp_path / "afile" / "out.json",
              "name too long": tmp_path / ("n" * 300 + ".json")}[case]
    for args in (["similarity", str(ckpt), "-o", str(target)], ["audit", str(ckpt), "-o", str(target)]):
        res = CliRunner().invoke(main, [*args, *FAST])
        _one_line_exit(res, 2)
        assert str(tmp_path) in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "x"


def test_disk_full_while_writing_leaves_nothing(tmp_path: Path) -> None:
    def full(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(BadArgumentError, match="No space left"):
        write_file(tmp_path / "out.json", full)
    with pytest.raises(BadArgumentError, match="No space left"):
        write_folder(tmp_path / "rep", {"a.txt": b"a"}, fill=lambda d: full(str(d / "b.txt")))
    assert list(tmp_path.iterdir()) == []


def test_existing_file_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    path.chmod(0o640)
    write_file(path, lambda tmp: Path(tmp).write_text("new"))
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


_SLOW_SWAP = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from collapse_probe import outputs

    def term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, term)
    real = outputs._exchange
    def slow(a, b):
        if sys.argv[2] == "no-exchange":
            ok = False
        else:
            print("before", flush=True); time.sleep(1.5); ok = real(a, b)
        print("after", flush=True); time.sleep(1.5)
        return ok
    outputs._exchange = slow
    if sys.argv[2] == "no-exchange":
        real_replace = outputs.os.replace
        def slow_replace(src, dst):
            real_replace(src, dst)
            if str(src).endswith(".old") is False and str(dst).endswith(".old"):
                print("moved-aside", flush=True); time.sleep(3)
        outputs.os.replace = slow_replace
    outputs.write_folder(sys.argv[1], {"a.txt": b"new a", "sub/b.txt": b"new b"})
""")


def _swap(out: Path, mode: str, wait_for: str, sig: signal.Signals) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SWAP, str(out), mode], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while (line := proc.stdout.readline().strip()) != wait_for:
        assert line or proc.poll() is None, "the writer ended before the window"
        assert time.monotonic() < deadline
    proc.send_signal(sig)
    return proc.wait(timeout=60)


OLD = {"a.txt": b"old a", "sub/b.txt": b"old b", "c.txt": b"old c"}
NEW = {"a.txt": b"new a", "sub/b.txt": b"new b"}


def _content(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != MANIFEST}


@pytest.mark.parametrize("window", ["before", "after"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_inside_the_swap_leaves_old_or_new(window: str, sig: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_folder(out, OLD)
    _swap(out, "exchange", window, sig)
    assert _content(out) in (OLD, NEW)
    if sig == signal.SIGTERM:  # held back until the swap and the clean-up are done
        assert _content(out) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    write_folder(out, {"d.txt": b"d"})  # the next run cleans whatever a killed one left
    assert _content(out) == {"d.txt": b"d"} and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_without_atomic_exchange_a_killed_swap_is_recovered(tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_folder(out, OLD)
    _swap(out, "no-exchange", "moved-aside", signal.SIGKILL)
    assert not out.exists()  # killed between the two renames: the earlier report sits aside, marked
    outputs._recover(out)
    assert _content(out) == OLD and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_stale_staging_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "report"
    live = tmp_path / f".report.collapse-probe-{os.getpid()}-abc.tmp"
    live.mkdir()
    (live / ".collapse-probe-staging").write_text("x")
    write_folder(out, NEW)
    assert live.is_dir() and _content(out) == NEW
