"""The command line: help everywhere, the acceptance cases of the similarity command, one-line errors."""
from __future__ import annotations

import csv
import io
import json

import click
import pytest
from click.testing import CliRunner

from collapse_probe.cli import main

from .conftest import run_cli


def all_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*prefix, name))


def test_every_command_has_help_with_examples():
    commands = list(all_commands(main))
    assert "similarity" in [c[-1] for c in commands]
    for cmd in [(), *commands]:
        res = CliRunner().invoke(main, [*cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage:" in res.output
        if cmd:
            assert "Examples:" in res.output, f"{' '.join(cmd)} --help has no examples"


@pytest.mark.heavy
def test_timm_vit_small_state_dict_prints_per_block_table(timm_vit_small_ckpt):
    res = run_cli("similarity", timm_vit_small_ckpt, "--model", "vit_small_patch16_224", "--num-images", "4",
                  "--batch-size", "4", "--no-progress")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("block"))
    rows = lines[header + 1: header + 13]
    assert [int(r.split()[0]) for r in rows] == list(range(12))
    assert "vit_small_patch16_224 (--model)" in res.stdout and "similar blocks of 12" in res.stdout


def test_deepvit_reports_probs_and_mixed_as_json(deepvit_ckpt):
    res = CliRunner().invoke(main, ["similarity", str(deepvit_ckpt), "--num-images", "3", "--format", "json",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data["attention"]) == {"probs", "mixed"}
    sim = data["attention"]["probs"]["similarity"]
    assert len(sim) == 3 and all(len(r) == 3 for r in sim)
    assert data["model"]["architecture"] == "deepvit_micro" and data["images"]["count"] == 3
    assert "summary" in data and data["summary"]["probs"]["depth"] == 3
    assert data["settings"]["rank_images"] == 16  # the costly SVD rank is capped by default on the command line


def test_csv_to_output_file(tmp_path, deepvit_ckpt):
    out = tmp_path / "sub" / "sim.csv"
    res = CliRunner().invoke(main, ["similarity", str(deepvit_ckpt), "--num-images", "2", "--format", "csv",
                                    "-o", str(out), "--no-progress", "--threshold", "0.5", "-k", "2"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [int(r["block"]) for r in rows] == [0, 1, 2]
    assert rows[0]["probs_sim_prev"] == "" and rows[1]["probs_sim_prev"] == ""  # k = 2: first two have none
    assert rows[2]["probs_sim_prev"] != ""


@pytest.fixture()
def bad_inputs(tmp_path, deepvit_ckpt):
    import timm
    import torch

    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 10)
    torch.save(timm.create_model("vit_micro", depth=1).state_dict(), tmp_path / "plain.pt")
    return {"missing": tmp_path / "nope.pt", "plain": tmp_path / "plain.pt", "ckpt": deepvit_ckpt,
            "empty": tmp_path / "empty", "garbage": tmp_path / "garbage.pt", "out": tmp_path / "out.json"}


@pytest.mark.parametrize("args, code, message", [
    (["similarity", "{missing}"], 2, "does not exist"),
    (["similarity", "{plain}"], 5, "--model"),
    (["similarity", "{ckpt}", "--model", "vit_micro"], 5, "does not fit vit_micro"),
    (["similarity", "{ckpt}", "--threshold", "1.5"], 2, "threshold"),
    (["similarity", "{ckpt}", "--images", "{empty}"], 2, "no images"),
    (["similarity", "{ckpt}", "--model", "no_such_net"], 2, "unknown model"),
    (["similarity", "{garbage}"], 4, "neither a safetensors"),
    (["similarity"], 2, "Missing argument"),
    (["no-such-command"], 2, "No such command"),
    (["train", "--preset", "smoke", "--device", "nope"], 2, "unknown device"),
])
def test_errors_are_one_line_with_exit_codes(bad_inputs, args, code, message):
    res = CliRunner().invoke(main, [*[a.format(**bad_inputs) for a in args], "--no-progress", "-o",
                                    str(bad_inputs["out"])])
    assert res.exit_code == code, res.output
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == "" and not bad_inputs["out"].exists()


def test_real_process_error_has_no_traceback(bad_inputs):
    res = run_cli("similarity", bad_inputs["garbage"], "-o", bad_inputs["out"], timeout=120)
    assert res.returncode == 4
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not bad_inputs["out"].exists()
