"""Every ``bash`` and ``python`` block of the README runs as written.

    OMP_NUM_THREADS=1 pytest tests/test_readme.py -q -m "not heavy"     # the quick blocks
    OMP_NUM_THREADS=1 pytest tests/test_readme.py -q                    # all of them (as make test does)

The fence line says how a block is treated: ```` ```bash skip-test ```` is never run (set-up through make, GPUs,
ImageNet paths, the network); ```` ```bash heavy ```` runs under ``pytest.mark.heavy`` (more than ~20 s on a CPU).
Other fences (```` ```text ````, none) are output or notation and are not run; ``sh``, ``shell``, ``console`` and
unknown tags are refused, so no command block escapes this test by its spelling. ```` ```text output ```` is what the
runnable block before it prints: its ``VERDICT:`` lines must appear verbatim in that block's stdout, so the README
never shows a verdict the bundled checkpoints no longer give (only the verdict lines: the sentences after them carry
medians and intervals whose last digit may differ between machines).

Where the blocks run: each in a fresh temporary copy of the repository's content (``COPIED``: the package,
``checkpoints/``, ``tests/``, ``figures/``, ``benchmarks/`` and the top-level files; about 30 MB, well under a second),
used as the working directory. The README writes its outputs under ``out/`` and ``runs/`` of the repository root;
here they land in the copy, so a developer's own ``out/`` or ``runs/`` is never read, replaced or deleted (running in
the repository and deleting ``out/`` afterwards would do exactly that), nothing a block does can change a file of the
repository, and no block sees another's leftovers (each must stand alone: a reader may run any one of them).
Symlinks to the repository would be cheaper but let a block write through them into it; ``__pycache__``, ``out/``,
``runs/``, a venv and anything else not listed are not copied.

Environment: ``PATH`` starts with the folder of the Python running the tests (the venv's ``bin``: ``collapse-probe``
and ``python``, as after ``source .venv/bin/activate``), ``PYTHONPATH`` is the copy (its package wins over an
installed one), one torch thread, Hugging Face Hub offline.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TAGS = {"skip-test", "heavy"}
OUTPUT = "output"  # on a text fence: the stdout of the runnable block before it
RUN = {"bash", "python"}
NOT_RUN = {"", "text"}  # output listings and notation
COPIED = ["collapse_probe", "checkpoints", "tests", "figures", "benchmarks", "README.md", "SECURITY.md", "LICENSE",
          "Makefile", "pyproject.toml"]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def _fences() -> list[tuple[int, str, set[str], str]]:
    """(line number, language, tags, body) of every fenced block of the README, in order."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        words = m.group(1).split()
        lang, tags = (words[0] if words else ""), set(words[1:])
        out.append((text.count("\n", 0, m.start()) + 1, lang, tags, m.group(2)))
    return out


def _params() -> list:
    params = []
    fences = _fences()
    for n, (line, lang, tags, body) in enumerate(fences):
        if lang not in RUN:
            continue
        shown = ""  # the output block that follows, before the next runnable block
        for _, lang2, tags2, body2 in fences[n + 1:]:
            if lang2 in RUN:
                break
            if OUTPUT in tags2:
                shown = body2
                break
        marks = []
        if "skip-test" in tags:
            marks.append(pytest.mark.skip(reason=f"README line {line}: fence marked skip-test"))
        if "heavy" in tags:
            marks.append(pytest.mark.heavy)
        params.append(pytest.param(lang, body, shown, id=f"line{line}-{lang}", marks=marks))
    return params


def test_every_fence_is_a_known_kind() -> None:
    """A command block spelled ``sh`` or a tag spelled ``skip_test`` would silently escape the tests below."""
    for line, lang, tags, _ in _fences():
        assert lang in RUN | NOT_RUN, f"README line {line}: fence language {lang!r}; use bash, python or text"
        known = TAGS if lang in RUN else {OUTPUT}
        assert tags <= known, f"README line {line}: unknown fence tags {sorted(tags - known)}; known: {sorted(known)}"
        assert not ({"skip-test", "heavy"} <= tags), f"README line {line}: skip-test and heavy together"
    assert sum(1 for _, lang, tags, _ in _fences() if lang in RUN and "skip-test" not in tags) >= 10


def _workdir(tmp_path: Path) -> Path:
    """A copy of the repository's content to run in (see the module docstring for why a copy)."""
    work = tmp_path / "repo"
    work.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=skip, symlinks=True)
        elif src.is_file():
            shutil.copy2(src, work / name)
    return work


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLLAPSE_PROBE_", "PYTEST_"))}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")]),
               PYTHONPATH=str(work), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return env


@pytest.mark.parametrize(("lang", "body", "shown"), _params())
def test_readme_block_runs(lang: str, body: str, shown: str, tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    script = tmp_path / ("block.sh" if lang == "bash" else "block.py")
    script.write_text(body)
    command = ["bash", "-e", str(script)] if lang == "bash" else [sys.executable, str(script)]
    out = subprocess.run(command, cwd=work, env=_env(work), capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"exit {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n" \
                                f"{out.stderr[-3000:]}"
    for verdict in (ln for ln in shown.splitlines() if "VERDICT:" in ln):
        assert verdict in out.stdout.splitlines(), f"the README shows\n{verdict}\nbut the block printed\n{out.stdout}"
