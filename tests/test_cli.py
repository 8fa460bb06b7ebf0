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
    assert [int(r.split()[0]) for r in rows] == list(range(1, 13))  # 1-based, as in the paper
    assert "vit_small_patch16_224 (--model)" in res.stdout and "blocks similar by the paper's metric" in res.stdout


def test_deepvit_reports_probs_and_mixed_as_json(deepvit_ckpt):
    res = CliRunner().invoke(main, ["similarity", str(deepvit_ckpt), "--num-images", "3", "--format", "json",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data["attention"]) == {"probs", "mixed"}
    sim = data["attention"]["probs"]["similarity"]
    assert len(sim) == 3 and all(len(r) == 3 for r in sim)
    assert data["model"]["architecture"] == "deepvit_micro" and data["images"]["count"] == 3
    summary = data["summary"]  # the one versioned schema every command shares
    assert summary["schema"] == "collapse-probe/summary" and summary["schema_version"] >= 2
    assert summary["depth"] == 3 and summary["kind"] == "mixed" and summary["other_kind"]["kind"] == "probs"
    assert "1-based" in summary["block_numbering"] and data["baseline"] is not None  # the twin, by default
    assert summary["verdict"] == summary["text"][0] and summary["verdict"].startswith("VERDICT: ")
    assert data["settings"]["rank_images"] == 16  # the costly SVD rank is capped by default on the command line


def test_csv_to_output_file(tmp_path, deepvit_ckpt):
    out = tmp_path / "sub" / "sim.csv"
    res = CliRunner().invoke(main, ["similarity", str(deepvit_ckpt), "--num-images", "2", "--format", "csv",
                                    "-o", str(out), "--no-progress", "--threshold", "0.5", "-k", "2"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [int(r["block"]) for r in rows] == [1, 2, 3] * 2 and [int(r["index"]) for r in rows] == [0, 1, 2] * 2
    probs = [r for r in rows if r["kind"] == "probs"]
    assert probs[0]["sim_prev"] == "" and probs[1]["sim_prev"] == ""  # k = 2: first two have none
    assert probs[2]["sim_prev"] != ""


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


# ------------------------------------------------------------------------------------------------ issue 13: outputs


def _similarity(ckpt, *args):
    return CliRunner().invoke(main, ["similarity", str(ckpt), "--num-images", "2", "--no-progress", *args])


def test_output_format_follows_the_extension(tmp_path, deepvit_ckpt):
    for name, check in (("out.json", lambda t: json.loads(t)["per_block"][0]["kind"] == "probs"),
                        ("out.csv", lambda t: t.startswith("checkpoint,kind,block,index,sim_prev")),
                        ("out.txt", lambda t: t.startswith("VERDICT: ")), ("out", lambda t: t.startswith("VERDICT: "))):
        res = _similarity(deepvit_ckpt, "-o", str(tmp_path / name))
        assert res.exit_code == 0, res.output
        assert check((tmp_path / name).read_text()), name
    res = _similarity(deepvit_ckpt, "--format", "csv", "-o", str(tmp_path / "bad.json"))
    assert res.exit_code == 2 and "contradicts" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()
    res = _similarity(deepvit_ckpt)  # no --format, no -o: the table on stdout
    assert res.exit_code == 0 and res.stdout.startswith("VERDICT: ")


def test_one_name_per_quantity_in_table_csv_json_and_audit(tmp_path, deepvit_ckpt):
    table = _similarity(deepvit_ckpt).stdout
    csv_text = _similarity(deepvit_ckpt, "--format", "csv").stdout
    rows = json.loads(_similarity(deepvit_ckpt, "--format", "json").stdout)["per_block"]
    res = CliRunner().invoke(main, ["audit", str(deepvit_ckpt), "--num-images", "2", "--no-progress", "-o",
                                    str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "rep" / "report.md").read_text()
    for text in (table, csv_text, report, json.dumps(rows)):  # the table and report show fewer columns, same names
        assert "sim_prev" in text and "twin_sim_prev" in text
        assert "probs:cos" not in text and "similarity w/ previous" not in text and "probs_sim_prev" not in text
        assert "sim_prev_low" not in text and "sim_prev_lo " not in text  # intervals are *_ci_low / *_ci_high
    header = csv_text.splitlines()[0].split(",")
    assert [c for c in header if c.endswith(("_lo", "_low", "_hi", "_high")) and "_ci_" not in c] == []
    assert "cross_head" in table and "effective_rank" in header and "sim_prev_ci_low" in header
    assert [r["block"] for r in rows if r["kind"] == "mixed"] == [1, 2, 3]
    assert {r["kind"] for r in csv.DictReader(io.StringIO(csv_text))} == {"probs", "mixed"}


def test_compare_formats_short_table_and_checkpoint_column(tmp_path, deepvit_ckpt):
    other = tmp_path / "other.safetensors"
    other.write_bytes(deepvit_ckpt.read_bytes())
    base = ["compare", str(deepvit_ckpt), str(other), "--num-images", "2", "--no-progress"]
    table = CliRunner().invoke(main, base)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"{deepvit_ckpt.name}: VERDICT: ") and lines[1].startswith("other.safetensors: VERDICT")
    assert lines[3].startswith("checkpoint") and max(len(t) for t in lines if "VERDICT" not in t) <= 120
    rows = list(csv.DictReader(io.StringIO(CliRunner().invoke(main, [*base, "--format", "csv"]).stdout)))
    assert {r["checkpoint"] for r in rows} == {deepvit_ckpt.name, "other.safetensors"} and "sim_prev" in rows[0]
    assert len(rows) == 2 * 2 * 3  # checkpoints x kinds x blocks
    data = json.loads(CliRunner().invoke(main, [*base, "--format", "json"]).stdout)
    assert [s["checkpoint"] for s in data["summary"]] == [deepvit_ckpt.name, "other.safetensors"]
    md = CliRunner().invoke(main, [*base, "--format", "markdown"]).stdout
    assert md.startswith("| checkpoint | verdict | architecture |")


def test_to_pandas_has_one_row_per_kind_and_block(deepvit_ckpt):
    from collapse_probe.probing.run import probe

    result = probe(deepvit_ckpt, num_images=2, progress=False, device="cpu")
    df = result.to_pandas()
    assert list(df.columns[:6]) == ["checkpoint", "kind", "block", "index", "sim_prev", "ratio_prev"]
    assert set(df.checkpoint) == {str(deepvit_ckpt)}
    assert {"cross_head", "effective_rank", "energy_rank", "similar", "regime"} <= set(df.columns)
    assert {"feature_sim_last", "feature_residual"} <= set(df.columns)
    assert len(df) == 2 * 3 and (df.block == df["index"] + 1).all() and df.similar.dtype == bool
    probs = df[df.kind == "probs"].set_index("block")
    assert probs.sim_prev.isna().tolist() == [True, False, False]
    assert probs.sim_prev[3] == pytest.approx(result.attention["probs"].neighbor(1)[2])  # block 3 = module 2
    assert result.to_frame().equals(df)
    assert len(repr(result)) < 300


def test_default_images_follow_the_dataset_the_checkpoint_was_trained_on(tmp_path, deepvit_ckpt):
    import timm

    from collapse_probe.loading.save import save_checkpoint

    digits = tmp_path / "digits.safetensors"
    save_checkpoint(timm.create_model("deepvit_micro", depth=2), digits, extra={"train_config": {"dataset": "digits"}})
    res = _similarity(digits, "--format", "json")
    assert res.exit_code == 0, res.output
    assert res.stderr.strip().splitlines() == ["note: images: builtin:digits (the dataset this checkpoint was trained "
                                               "on)"]
    assert "digits" in json.loads(res.stdout)["images"]["source"]
    res = _similarity(deepvit_ckpt, "--format", "json")  # no dataset recorded: photos, as before
    assert "note:" not in res.stderr and "photographs" in json.loads(res.stdout)["images"]["source"]
    res = _similarity(digits, "--format", "json", "--images", "builtin:photos")  # an explicit choice wins
    assert "note:" not in res.stderr and "photographs" in json.loads(res.stdout)["images"]["source"]


def test_top_level_help_shows_whole_summaries_and_imports_nothing_heavy():
    res = CliRunner().invoke(main, ["--help"])
    listed = res.output.split("Commands:")[1]
    for name, cmd in main.commands.items():
        assert cmd.short_help and cmd.short_help in listed, name
    assert "..." not in listed
    first = res.output.split("Examples:")[1].split()[:3]
    assert first[:2] == ["collapse-probe", "similarity"] and first[2].startswith("checkpoints/")
    code = ("import sys; from collapse_probe.cli import main; sys.argv = ['collapse-probe', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules and 'timm' not in "
            "sys.modules, 'heavy import'")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__)
                                                                              .resolve().parents[1])})
    assert out.returncode == 0, out.stderr
