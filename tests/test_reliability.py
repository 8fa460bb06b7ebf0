"""Reliability of every probing command against hostile sizes, odd file names, a full or read-only disk, a closed
pipe, and the command line's own hygiene (grouped help, no dead options, errors before torch is imported).

    pytest tests/test_reliability.py -q

Each case is built here: configs that ask for far more than their weights, names that are not UTF-8 or near the
255-byte limit, writers that fail with the errno a full disk or read-only folder gives, a pipe whose reader has gone.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collapse_probe import outputs
from collapse_probe.cli import main
from collapse_probe.loading.build import create_model
from collapse_probe.loading.save import save_checkpoint

from .family_models import make, save_folder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num-images", "2", "--batch-size", "2", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("COLLAPSE_PROBE_DEBUG", None)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    torch.manual_seed(0)
    save_checkpoint(create_model("vit_micro", depth=2), path)
    return path


def _one_line(res, code: int) -> str:
    assert res.exit_code == code, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], res.output
    return lines[0]


def _with_meta(src: Path, dst: Path, edit=None, tensors=None) -> Path:
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["collapse_probe"])
    if edit:
        edit(meta["model_args"])
    save_file(tensors(load_file(src)) if tensors else load_file(src), str(dst),
              metadata={"collapse_probe": json.dumps(meta)})
    return dst


# ------------------------------------------------------------------------------------------ (4) sizes from a file
def _measured(args: list[str]) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in KiB) of one ``python -m collapse_probe`` child, its own rusage (wait4)."""
    with open(os.devnull, "wb") as null, subprocess.Popen([sys.executable, "-m", "collapse_probe", *args], env=ENV,
                                                           stdout=null, stderr=subprocess.PIPE) as proc:
        err = proc.stderr.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, usage.ru_maxrss


@pytest.mark.heavy  # real processes: each one's own peak memory
def test_hostile_sizes_are_one_line_within_the_memory_of_a_normal_run(tmp_path: Path, good: Path) -> None:
    code, err, normal = _measured(["similarity", str(good), *FAST])
    assert code == 0, err
    folder = save_folder("hf-vit", make("hf-vit"), tmp_path / "hf")  # a real HF folder, then a 100 000-layer config
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100_000}))
    wide = _with_meta(good, tmp_path / "img512.safetensors", tensors=lambda sd: {  # a file consistent with 512 px
        **sd, "pos_embed": torch.zeros(1, 4097, 64)}, edit=lambda a: a.update(img_size=256))  # 4 px patches
    bits = _with_meta(good, tmp_path / "u64.safetensors", tensors=lambda sd: {  # float bits stored as uint64
        k: v.view(torch.int32).to(torch.uint64) if v.is_floating_point() else v for k, v in sd.items()})
    for path, want, says in ((folder, 5, "num_hidden_layers=100000"), (wide, 3, "4097 tokens"),
                             (bits, 4, "uint64")):
        out = tmp_path / "out.json"
        code, err, peak = _measured(["similarity", str(path), *FAST, "-o", str(out)])
        lines = err.strip().splitlines()
        assert code == want and len(lines) == 1 and says in lines[0] and "Traceback" not in err, (path, err)
        assert peak <= 1.3 * normal, (path.name, peak, normal)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".collapse-probe-" in p.name]


def test_map_bound_leaves_real_vits_far_below_it() -> None:
    import timm

    from collapse_probe.hooks.capture import attention_plans
    from collapse_probe.loading.bounds import check_map_size, max_map_values, tokens_of

    for name in ("vit_base_patch16_384", "vit_base_patch8_224", "vit_large_patch16_384", "deit_tiny_patch16_224",
                 "vit_small_patch14_dinov2"):
        with torch.device("meta"):
            model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        values = sum(p.num_heads for *_, p in attention_plans(model)) * tokens_of(model) ** 2
        assert values * 4 <= max_map_values(params), name  # a quarter of the limit at most
        check_map_size(model, params, name)


def test_map_floor_can_be_raised_for_a_trusted_file(monkeypatch) -> None:
    from collapse_probe.loading.bounds import max_map_values

    assert max_map_values(10) == 256 * 2**20 // 4
    monkeypatch.setenv("COLLAPSE_PROBE_MAX_MAP_MB", "1024")
    assert max_map_values(10) == 1024 * 2**20 // 4
    monkeypatch.setenv("COLLAPSE_PROBE_MAX_MAP_MB", "1")  # never below the default floor
    assert max_map_values(10) == 256 * 2**20 // 4


def test_integer_weights_are_the_files_problem(tmp_path: Path, good: Path) -> None:
    path = _with_meta(good, tmp_path / "i64.safetensors", tensors=lambda sd: {
        k: v.view(torch.int32).to(torch.int64) if k == "pos_embed" else v for k, v in sd.items()})
    assert "pos_embed (int64)" in _one_line(CliRunner().invoke(main, ["similarity", str(path), *FAST]), 4)


@pytest.mark.parametrize("blocks, says", [("1-3000000000", "beyond any model"), ("5-3", "backwards"),
                                          ("0-2", "start at 1")])
def test_intervene_block_ranges_are_checked_before_they_are_expanded(blocks: str, says: str, good: Path) -> None:
    res = CliRunner().invoke(main, ["intervene", str(good), "--mode", "skip", "--blocks", blocks, *FAST])
    assert says in _one_line(res, 2)


# ------------------------------------------------------------------------------------------ (5) names
def test_a_file_name_that_is_not_utf8_is_read(tmp_path: Path, good: Path) -> None:
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/m\xff\xfe.safetensors")  # valid on Linux: bytes, not UTF-8
    Path(name).write_bytes(good.read_bytes())
    res = CliRunner().invoke(main, ["similarity", name, "--format", "json", *FAST])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"]["checkpoint"].endswith("m\ufffd\ufffd.safetensors")
    res = CliRunner().invoke(main, ["compare", name, str(good), "--no-baseline", *FAST])
    assert res.exit_code == 0 and "m\ufffd\ufffd.safetensors" in res.stdout, res.output


def test_a_250_character_output_name_is_written(tmp_path: Path, good: Path) -> None:
    out = tmp_path / ("r" * 245 + ".json")
    res = CliRunner().invoke(main, ["similarity", str(good), "-o", str(out), *FAST])
    assert res.exit_code == 0 and json.loads(out.read_text())["per_block"], res.output
    folder = tmp_path / ("a" * 250)
    res = CliRunner().invoke(main, ["audit", str(good), "-o", str(folder), "--no-baseline", *FAST])
    assert res.exit_code == 0 and (folder / "report.html").is_file(), res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, folder.name])


def test_labels_from_alike_paths_are_unique(tmp_path: Path, good: Path) -> None:
    from collapse_probe.reports.labels import unique_labels

    pair = []
    for run in ("r1", "r2"):
        (tmp_path / run / "ckpt").mkdir(parents=True)
        pair.append(tmp_path / run / "ckpt" / "m.safetensors")
        pair[-1].write_bytes(good.read_bytes())
    assert unique_labels(pair) == ["r1/ckpt/m.safetensors", "r2/ckpt/m.safetensors"]
    assert unique_labels(pair, "_", stem=True) == ["r1_ckpt_m", "r2_ckpt_m"]
    assert unique_labels([pair[0], pair[0], tmp_path / "x.pt"]) == ["m.safetensors", "m.safetensors#2", "x.pt"]
    assert len(unique_labels([tmp_path / ("n" * 300 + ".pt")], limit=120)[0]) == 120
    res = CliRunner().invoke(main, ["compare", *map(str, pair), "--format", "json", "--no-baseline", *FAST])
    assert res.exit_code == 0, res.output
    assert [r["checkpoint"] for r in json.loads(res.stdout)["summary"]] == ["r1/ckpt/m.safetensors",
                                                                             "r2/ckpt/m.safetensors"]
    out = tmp_path / "figs"
    res = CliRunner().invoke(main, ["figures", *map(str, pair), "-o", str(out), "--no-pdf", "--no-baseline", *FAST])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "results").iterdir()) == ["r1_ckpt_m.json", "r2_ckpt_m.json"]


_KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from collapse_probe import outputs
    outputs.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)   # killed inside the rename
    outputs.write_file(sys.argv[1], lambda tmp: Path(tmp).write_text("complete"))
""")


def test_a_temporary_file_left_by_sigkill_is_cleaned_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "sim.json"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(target)], env=ENV, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".sim.json.collapse-probe-") and left[0].endswith(".tmp")
    decoy = tmp_path / ".notes.collapse-probe-1-0123456789abcdef.tmp"  # our pattern, not our check: the user's
    decoy.write_text("mine")
    live = outputs._temp_name(tmp_path / "other.json")  # ours, but its process (this one) is alive
    live.write_text("in use")
    outputs.write_file(tmp_path / "other.csv", lambda tmp: Path(tmp).write_text("x"))  # any write into the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([decoy.name, live.name, "other.csv"])


# ------------------------------------------------------------------------------------------ (6) disk and pipe
def _commands(good: Path, out: Path) -> dict[str, list[str]]:
    return {"similarity": ["similarity", str(good), "-o", str(out / "sim.json")],
            "audit": ["audit", str(good), "-o", str(out / "rep"), "--no-baseline"],
            "compare": ["compare", str(good), str(good), "-o", str(out / "cmp"), "--no-baseline"],
            "figures": ["figures", str(good), "-o", str(out / "figs"), "--no-pdf", "--no-baseline"],
            "intervene": ["intervene", str(good), "--mode", "skip", "--blocks", "1", "-o", str(out / "iv")]}


@pytest.mark.parametrize("how", ["ENOSPC at the rename", "EROFS creating", "EACCES creating"])
@pytest.mark.parametrize("command", ["similarity", "audit", "compare", "figures", "intervene"])
def test_full_or_read_only_disk_is_one_line_exit_2(command: str, how: str, tmp_path: Path, good: Path,
                                                   monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    err = getattr(errno, how.split()[0])
    real_replace, real_open, real_mkdir = os.replace, os.open, os.mkdir

    def fail_in_out(real):
        def call(path, *a, **k):
            if Path(os.fsdecode(path)).parent == out:
                raise OSError(err, os.strerror(err), os.fsdecode(path))
            return real(path, *a, **k)
        return call

    if how.endswith("rename"):
        monkeypatch.setattr(outputs.os, "replace", lambda src, dst: (_ for _ in ()).throw(
            OSError(err, os.strerror(err), str(dst))) if Path(dst).parent == out else real_replace(src, dst))
    else:
        monkeypatch.setattr(outputs.os, "open", fail_in_out(real_open))
        monkeypatch.setattr(outputs.os, "mkdir", fail_in_out(real_mkdir))
    res = CliRunner().invoke(main, [*_commands(good, out)[command], *FAST])
    line = _one_line(res, 2)
    assert os.strerror(err) in line and str(out) in line
    assert list(out.iterdir()) == []  # nothing partial, no temporary left


@pytest.mark.heavy  # real processes with a real pipe
@pytest.mark.parametrize("command", ["similarity", "audit", "compare", "intervene"])
def test_a_closed_stdout_is_one_line_exit_141(command: str, tmp_path: Path, good: Path) -> None:
    args = [*_commands(good, tmp_path)[command], *FAST]
    if command in ("similarity", "compare", "intervene"):
        args = args[:args.index("-o")] + args[args.index("-o") + 2:]  # everything to stdout
    proc = subprocess.Popen([sys.executable, "-m", "collapse_probe", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("note: ")]
    assert lines == ["error: standard output was closed before all output was written (broken pipe)"], err


@pytest.mark.heavy
def test_stdout_on_a_full_disk_is_one_line_exit_2(good: Path) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "collapse_probe", "similarity", str(good), *FAST], env=ENV,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: No space left on device; free space or choose another location"], proc.stderr


# ------------------------------------------------------------------------------------------ (7) CLI hygiene
PROBING = ("similarity", "audit", "compare", "figures", "intervene")


def _options(command: str) -> set[str]:
    return {o for p in main.commands[command].params for o in [*p.opts, *p.secondary_opts]}


def test_help_groups_options_and_offers_no_dead_ones() -> None:
    from collapse_probe.cli.help import SECTIONS

    for command in PROBING:
        text = CliRunner().invoke(main, [command, "--help"]).output
        heads = [ln.rstrip(":") for ln in text.splitlines() if ln and not ln.startswith(" ") and ln.endswith(":")]
        assert heads == ["Options", *SECTIONS], (command, heads)
        assert text.index("--model NAME") > text.index("Checkpoint loading:") > text.index("--help")
    loading = {o for p in main.commands["similarity"].params if p.name in SECTIONS["Checkpoint loading"]
               for o in p.opts}
    assert loading <= _options("intervene") and loading <= _options("figures")  # every command reads files alike
    assert not {"--rank-images", "--baseline-seed"} & _options("intervene")
    assert "-c" not in _options("figures") and "--checkpoints" in _options("figures")
    assert "-c" in _options("train")  # -c means the config file, in the one command that has one
    res = CliRunner().invoke(main, ["figures", "/dev/null"])
    assert res.exit_code == 2 and "Missing option '--output'" in res.output


def test_intervene_ignores_nothing_it_offers() -> None:
    from collapse_probe.reports.intervene import LOAD_OPTIONS, MEASURE_OPTIONS, PROBE_OPTIONS

    offered = {p.name for p in main.commands["intervene"].params}
    used = {*LOAD_OPTIONS, *MEASURE_OPTIONS, *PROBE_OPTIONS, "checkpoint", "mode", "from_block", "blocks", "source",
            "sweep", "fmt", "output", "help"} - {"rank_images", "baseline_seed"}
    assert offered <= used, offered - used


_BEFORE_TORCH = textwrap.dedent("""
    import sys
    from collapse_probe.cli import main
    try:
        main(sys.argv[1:], prog_name="collapse-probe")
    except SystemExit as e:
        print("EXIT", e.code, "TORCH", "torch" in sys.modules)
""")


@pytest.mark.parametrize("args", [
    ["similarity", "/nowhere/m.safetensors"], ["audit", "runs/a/b/final.pt", "-o", "rep"],
    ["compare", "a.pt", "./b"], ["figures", "missing_dir/x.ckpt", "-o", "figs"],
    ["intervene", "m.pth", "--sweep"], ["similarity", "/dev/null", "--images", "/no/such/folder"],
    ["similarity", "/dev/null", "--device", ""], ["similarity", "/dev/null", "--device", "gpu"],
    ["intervene", "/dev/null", "--sweep", "--blocks", "2"]],
    ids=["similarity", "audit", "compare", "figures", "intervene", "images", "empty-device", "gpu", "request"])
def test_argument_errors_come_before_torch_is_imported(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _BEFORE_TORCH, *args], env=ENV, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.stdout.split()[-4:] == ["EXIT", "2", "TORCH", "False"], proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_hub_ids_are_not_taken_for_paths() -> None:
    from collapse_probe.cli.checks import looks_like_path

    for hub in ("timm/vit_small_patch16_224", "hf-hub:timm/vit_small_patch16_224", "facebook/dinov2-small",
                "vit_small_patch16_224"):
        assert not looks_like_path(hub), hub
    for path in ("m.pt", "a/b/c", "./m", "/abs/m", "~/m", "runs/", "x/model.safetensors", "C.PTH"):
        assert looks_like_path(path), path
