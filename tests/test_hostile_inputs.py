"""The reliability campaign's cases: small hostile inputs get one line and their exit code, never a big allocation.

    pytest tests/test_hostile_inputs.py -q

Each case failed on the code before this test (an "internal error", a multi-gigabyte allocation, a file the
checkpoint named being opened, or stderr noise). Exit codes: 2 bad arguments, 3 refused, 4 malformed, 5 layout.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from collapse_probe.cli import main
from collapse_probe.loading.build import create_model
from collapse_probe.loading.save import save_checkpoint
from collapse_probe.probing.result import ProbeResult

from .family_models import make, save_folder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num-images", "2", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_checkpoint(create_model("vit_micro", depth=2), path)
    return path


def _one_line(res, code: int) -> str:
    assert res.exit_code == code, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], res.output
    return lines[0]


def _hf_folder(tmp_path: Path, edit) -> Path:
    folder = save_folder("hf-vit", make("hf-vit"), tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_hf_timm_wrapper_may_not_name_another_file(tmp_path: Path) -> None:
    bomb = tmp_path / "elsewhere.pth"
    bomb.write_bytes(b"never to be opened")
    folder = tmp_path / "wrapper"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "timm_wrapper", "num_classes": 10,
                                                    "model_args": {"checkpoint_path": str(bomb)}}))
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    before = os.stat(bomb).st_atime_ns
    line = _one_line(CliRunner().invoke(main, ["similarity", str(folder), *FAST]), 3)
    assert "checkpoint_path" in line and os.stat(bomb).st_atime_ns == before


@pytest.mark.parametrize("edit, code, says", [
    ({"hidden_size": 1_000_000, "intermediate_size": 1_000_000}, 3, "hidden_size=1000000, far larger"),
    ({"num_hidden_layers": 100_000}, 5, "num_hidden_layers=100000 layers but the weights hold 2"),
    ({"mlp_ratio": 1e9}, 3, "mlp_ratio"), ({"vision_config": {"num_layers": 5000}}, 5, "num_layers=5000"),
    # sizes of a head the file does not hold (an MAE decoder, a BEiT MIM vocabulary) get a fixed bound, not none
    ({"decoder_intermediate_size": 1_000_000}, 3, "decoder_intermediate_size=1000000"),
    ({"vocab_size": 10_000_000}, 3, "vocab_size=10000000")],
    ids=["width", "depth", "ratio", "nested-depth", "unstored-decoder", "unstored-vocabulary"])
def test_hf_config_asking_for_a_huge_model_is_refused_before_allocating(edit, code, says, tmp_path: Path,
                                                                        monkeypatch) -> None:
    import transformers

    folder = _hf_folder(tmp_path, lambda c: c.update(edit))
    built = []  # nothing may be built, not even on the meta device, before the config is checked
    monkeypatch.setattr(transformers.ViTForImageClassification, "__init__",
                        lambda *a, **k: built.append(1) or pytest.fail("built"))
    assert says in _one_line(CliRunner().invoke(main, ["similarity", str(folder), *FAST]), code) and not built


def test_hf_quantized_and_foreign_architecture_configs(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "q", lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"}))
    assert "quantized" in _one_line(CliRunner().invoke(main, ["similarity", str(folder), *FAST]), 5)
    other = _hf_folder(tmp_path / "o", lambda c: c.update(architectures=["BertModel"]))
    res = CliRunner().invoke(main, ["similarity", str(other), "--format", "csv", *FAST])
    if res.exit_code:  # the config's own model type decides; a head the base class lacks is a one-line mismatch
        assert "does not fit transformers:ViT" in _one_line(res, 5)


def test_hf_loading_prints_nothing_of_its_own(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path, lambda c: None)
    out = subprocess.run([sys.executable, "-m", "collapse_probe", "similarity", str(folder), "--format", "csv",
                          *FAST], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_arch_entry_of_a_huge_model_beside_tiny_weights(tmp_path: Path) -> None:
    path = tmp_path / "train.pth"
    torch.save({"arch": "vit_giant_patch14_224", "state_dict": {"head.weight": torch.zeros(10, 4)}}, path)
    _one_line(CliRunner().invoke(main, ["similarity", str(path), *FAST]), 5)


def test_stride_zero_views_are_refused(tmp_path: Path, good: Path) -> None:
    from safetensors.torch import load_file

    sd = {k: torch.zeros(1).expand(v.shape) if v.ndim else v for k, v in load_file(good).items()}
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 200_000
    assert "view larger than its stored bytes" in _one_line(
        CliRunner().invoke(main, ["similarity", str(path), "--model", "vit_micro", *FAST]), 3)


def test_zero_size_head_cannot_size_the_classifier(tmp_path: Path, good: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(good)
    sd["head.weight"], sd["head.bias"] = torch.zeros(2_000_000, 0), torch.zeros(0)
    path = tmp_path / "head.safetensors"
    save_file(sd, str(path))
    res = CliRunner().invoke(main, ["similarity", str(path), *FAST])
    assert res.exit_code in (3, 5), res.output
    _one_line(res, res.exit_code)


def test_stored_act_layer_naming_a_function_is_a_layout_error(tmp_path: Path, good: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(good), "pt") as f:
        meta = json.loads(f.metadata()["collapse_probe"])
    meta["model_args"]["act_layer"] = "os.system"
    path = tmp_path / "act.safetensors"
    save_file(load_file(good), str(path), metadata={"collapse_probe": json.dumps(meta)})
    _one_line(CliRunner().invoke(main, ["similarity", str(path), *FAST]), 5)


@pytest.mark.parametrize("args", [["--batch-size", str(sys.maxsize + 1)], ["--device", "meta"],
                                  ["--mean", "0.5,0.5,0.5", "--std", "0,0,0"],
                                  ["--mean", "0.5,0.5,0.5,0.5", "--std", "0.5,0.5,0.5,0.5"],
                                  ["--mean", "nan,nan,nan", "--std", "1,1,1"]],
                         ids=["batch", "meta", "std0", "mean4", "mean-nan"])
@pytest.mark.parametrize("command", ["similarity", "audit"])
def test_bad_arguments_are_exit_2(command: str, args: list[str], good: Path, tmp_path: Path) -> None:
    extra = ["-o", str(tmp_path / "rep")] if command == "audit" else []
    _one_line(CliRunner().invoke(main, [command, str(good), *FAST, *args, *extra]), 2)  # the last value wins
    assert not (tmp_path / "rep").exists()


def test_system_files_are_not_checkpoints() -> None:
    _one_line(CliRunner().invoke(main, ["similarity", "/proc/self/mem", *FAST]), 2)


def test_json_never_holds_nan() -> None:
    res = ProbeResult(attention={}, settings={"threshold": math.nan, "nested": [1.0, math.inf]})
    data = json.loads(res.to_json())
    assert data["settings"] == {"threshold": None, "nested": [1.0, None]}


def _peak_rss_kib(args: list[str]) -> tuple[int, int]:
    """(exit code, peak RSS in KiB) of one ``python -m collapse_probe`` process."""
    code = ("import resource, runpy, sys\n"
            f"sys.argv = ['collapse-probe', *{args!r}]\n"
            "try:\n    runpy.run_module('collapse_probe', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code or 0\nelse:\n    code = 0\n"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'CODE', code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    words = out.stdout.split()
    return int(words[words.index("CODE") + 1]), int(words[words.index("RSS") + 1])


@pytest.mark.heavy  # real processes, to measure each one's own peak memory
def test_tiny_hostile_configs_stay_within_the_memory_of_a_normal_run(tmp_path: Path, good: Path) -> None:
    from safetensors.torch import load_file

    normal_code, normal = _peak_rss_kib(["similarity", str(good), *FAST])
    assert normal_code == 0
    views = tmp_path / "views.pt"
    torch.save({k: torch.zeros(1).expand(1000, 1000, 250) if k == "head.weight" else v
                for k, v in load_file(good).items()}, views)  # a 1 GB tensor stored as one float
    wide = _hf_folder(tmp_path, lambda c: c.update(hidden_size=1_000_000, intermediate_size=1_000_000))
    giant = tmp_path / "giant.pth"
    torch.save({"arch": "vit_giant_patch14_224", "state_dict": {"head.weight": torch.zeros(10, 4)}}, giant)
    for case in (["similarity", str(views), "--model", "vit_micro"], ["similarity", str(wide)],
                 ["similarity", str(giant)]):
        code, peak = _peak_rss_kib([*case, *FAST])
        assert code in (3, 5) and peak <= 1.5 * normal, (case, code, peak, normal)
    assert resource.RLIMIT_AS  # the bound above is measured, not imposed: no limit hides an allocation


def test_the_scan_also_reads_the_pickle_with_the_standard_unpickler(tmp_path: Path) -> None:
    """A global whose name strings reach STACK_GLOBAL around a MARK that POP removes: a disassembler cannot resolve
    it, the standard unpickler (run with imports switched off) names it exactly; nothing runs."""
    from collapse_probe.loading import safety
    from collapse_probe.loading.pickles import pickle_globals, unpickler_globals

    marker = tmp_path / "ran"
    arg = f"touch {marker}".encode()

    def payload(between: bytes) -> bytes:  # PROTO 4, an empty FRAME, "os", "system", ..., STACK_GLOBAL, call
        return (b"\x80\x04\x95" + bytes(8) + b"\x8c\x02os\x8c\x06system" + between + b"\x93"
                + b"\x8c" + bytes([len(arg)]) + arg + b"\x85R.")

    plain, tricky = payload(b""), payload(b"(0")  # "(0": MARK, then POP, which removes it again
    assert pickle_globals(plain)[0] == ["os.system"] == unpickler_globals(plain)
    static, _ = pickle_globals(tricky)
    assert static == ["<dynamic global>"]  # the disassembler cannot tell which global this is
    assert unpickler_globals(tricky) == ["os.system"]  # the unpickler's own reading does
    assert "os.system" in safety._scan(tmp_path / "x.pt", tricky, 1)[0]  # and the scan reports both
    assert not marker.exists()  # nothing ran


def test_pil_bomb_warning_is_one_line_not_stderr_noise(tmp_path: Path, good: Path, monkeypatch) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (12, 12)).save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: over the warning limit, under the error one
    line = _one_line(CliRunner().invoke(main, ["similarity", str(good), "--images", str(folder), *FAST]), 2)
    assert "big.png" in line and "large" in line


def test_timm_folder_or_metadata_asking_for_more_than_the_weights(tmp_path: Path, good: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = tmp_path / "timm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_micro", "num_classes": 10,
                                                    "model_args": {"depth": 1024}}))
    save_file(load_file(good), str(folder / "model.safetensors"))
    assert "depth 1024" in _one_line(CliRunner().invoke(main, ["similarity", str(folder), *FAST]), 5)
    with safe_open(str(good), "pt") as f:
        meta = json.loads(f.metadata()["collapse_probe"])
    meta["model_args"]["img_size"] = 512
    path = tmp_path / "img512.safetensors"
    save_file(load_file(good), str(path), metadata={"collapse_probe": json.dumps(meta)})
    _one_line(CliRunner().invoke(main, ["similarity", str(path), *FAST]), 5)
