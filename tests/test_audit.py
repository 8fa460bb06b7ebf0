"""``collapse-probe audit`` / ``compare``: random-init checkpoints of every family, saved in the layouts and formats we
read, are audited into complete, self-contained reports; bad input gives one line, an exit code and no output.

    PYTHONPATH=. pytest tests/test_audit.py -q
"""
from __future__ import annotations

import json
import math
import pathlib
from html import escape

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from collapse_probe import __version__
from collapse_probe.cli import main
from collapse_probe.errors import BadArgumentError, MalformedFileError
from collapse_probe.loading.save import save_checkpoint
from collapse_probe.outputs import MANIFEST
from collapse_probe.probing.result import AttentionStats, ProbeResult
from collapse_probe.reports.audit import FIGURES, audit, compare, verdict

from .family_models import FAMILIES, FLAT_LAYOUTS, INFERRED, LAYOUTS, TIMM_FOLDER, make, save_folder, save_weights

PNG = b"\x89PNG\r\n\x1a\n"
FAST = dict(num_images=2, batch_size=2, progress=False, device="cpu")


def _checkpoint(name: str, tmp: pathlib.Path, index: int) -> tuple[pathlib.Path, dict]:
    """Save family ``name`` the way its users would; inferred families rotate through every layout and format."""
    model = make(name)
    if name == "ours":
        path = tmp / "ours.safetensors"
        save_checkpoint(model, path)
        return path, {}
    if name.startswith("hf-") or name in TIMM_FOLDER:
        return save_folder(name, model, tmp / name, ("model.safetensors", "pytorch_model.bin")[index % 2]), {}
    layout = list(LAYOUTS)[index % len(LAYOUTS)]
    fmt = "safetensors" if layout in FLAT_LAYOUTS and index % 2 else "torch"
    return save_weights(model.state_dict(), tmp / f"{name}.ckpt", layout, fmt), {"num_heads": INFERRED[name][1]}


def _similar_from_matrix(sim: list[list[float]], threshold: float) -> list[int]:
    """Independent of AttentionStats.neighbor: block i is collapsed when sim[i][i-1] > threshold."""
    return [i for i in range(1, len(sim)) if sim[i][i - 1] is not None and sim[i][i - 1] > threshold]


@pytest.mark.parametrize("index,name", list(enumerate(FAMILIES)))
def test_audit_every_family_writes_a_complete_report(tmp_path, index, name):
    path, kw = _checkpoint(name, tmp_path, index)
    out = tmp_path / "report"
    metrics = audit(path, out, threshold=0.5, **kw, **FAST)
    files = {p.name for p in out.iterdir()}
    assert files == {"report.md", "report.html", "metrics.json", "per_block.csv", MANIFEST,
                     *(f"{f}.png" for f in FIGURES)}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["tool"]["version"] == __version__ and on_disk["config"]["threshold"] == 0.5
    assert on_disk["heads_source"] and on_disk["heads_source"] == on_disk["model"]["heads_source"]
    summary = on_disk["summary"]
    applied = on_disk["attention"][summary["kind"]]  # the verdict judges the maps that multiply V
    assert summary["kind"] == on_disk["applied_kind"] == ("mixed" if "mixed" in on_disk["attention"] else "probs")
    assert len(applied["blocks"]) == on_disk["model"]["depth"] == summary["depth"]
    # 1-based block numbers in the summary, 0-based module indices in the raw matrices (and the JSON says so)
    assert summary["similar_blocks"] == [i + 1 for i in _similar_from_matrix(applied["similarity"], 0.5)]
    assert "1-based" in summary["block_numbering"] and summary["schema_version"] >= 2
    twin = on_disk["baseline"]  # the untrained twin, measured by default, on the same images
    assert twin is not None and twin["images"]["count"] == on_disk["images"]["count"]
    assert twin["attention"][summary["kind"]]["similarity"] != applied["similarity"]
    assert summary["baseline"]["count"] == len(_similar_from_matrix(twin["attention"][summary["kind"]]["similarity"],
                                                                     0.5))
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES) and "src='http" not in html
    assert (out / "report.md").read_text().count("](data:image/png;base64,") == len(FIGURES)
    for f in FIGURES:
        assert (out / f"{f}.png").read_bytes().startswith(PNG)
    assert str(on_disk["model"]["num_heads"]) in html and escape(on_disk["heads_source"]) in html
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]  # no temp folder left


def _stats(sim: np.ndarray, cross: list[float]) -> AttentionStats:
    n = len(sim)
    return AttentionStats(kind="probs", blocks=list(range(n)), names=[f"blocks.{i}.attn.probs" for i in range(n)],
                          threshold=0.9, similarity=sim, ratio=sim, head_similarity=np.zeros((n, 2, 2)),
                          cross_head=np.array(cross), effective_rank=np.ones(n), energy_rank=np.ones(n))


def test_verdict_numbers_blocks_from_one_and_says_what_it_lacks():
    sim = np.eye(6)
    for i, v in enumerate([0.2, 0.95, 0.3, 0.92, 0.97], start=1):  # module i vs module i-1
        sim[i, i - 1] = sim[i - 1, i] = v
    result = ProbeResult({"probs": _stats(sim, [0.1, 0.1, 0.95, 0.96, 0.2, 0.1])},
                         images={"count": 3, "source": "test"}, model={"depth": 6})
    vd = verdict(result, threshold=0.9)
    assert vd["similar_blocks"] == [3, 5, 6] and vd["onset"] == 5 and vd["count"] == 3  # modules 2, 4, 5
    assert vd["baseline"] is None and vd["collapsed_beyond_twin"] is None
    text = " ".join(vd["text"])
    assert "3 of 6 blocks similar by the paper's metric (column cosine, uncentred (Eq. 3)" in text
    assert "no untrained twin measured" in text and "Similar blocks (paper's criterion): 3, 5-6" in text
    assert "uniform attention 5;" in vd["headline"]  # what 1/N maps would give, beside the count even without a twin
    assert vd["text"][0] == vd["verdict"] and vd["verdict"].startswith("VERDICT: not judged from the maps: the row "
                                                                       "divergence the rule needs was not measured")
    assert "paper's metric 3/6" in vd["verdict"] and "uniform attention 5/6" in vd["verdict"]
    # without a twin there is no evidence that training made anything redundant: nothing is recommended, not even
    # head pruning for the blocks whose heads are alike (modules 2 and 3)
    assert "reuse" not in text and "removal" not in text and "pruning" not in text
    result.baseline = ProbeResult({"probs": _stats(np.eye(6), [0.1] * 6)}, images={"count": 3}, model={"depth": 6})
    twin = verdict(result, threshold=0.9)
    assert twin["verdict"].startswith("VERDICT: not judged from the maps") and twin["collapsed_beyond_twin"] == []
    assert "untrained twin 0/6, uniform attention 5/6" in twin["verdict"]
    assert "in blocks 3-4 all heads attend nearly alike" in " ".join(twin["text"])  # beyond the twin's 0.1 by >= 0.1
    none = verdict(ProbeResult({"probs": _stats(np.eye(3), [0.0] * 3)}, images={}, model={"depth": 3}), 0.9)
    assert none["similar_blocks"] == [] and none["onset"] is None and "0 of 3 blocks" in none["text"][1]


def test_failed_audit_leaves_no_output_and_reports_replace_atomically(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    out = tmp_path / "out"
    with pytest.raises(MalformedFileError):
        audit(bad, out, **FAST)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["garbage.pt"]
    good = tmp_path / "m.safetensors"
    save_checkpoint(make("ours"), good)
    audit(good, out, **FAST)
    audit(good, out, threshold=0.5, **FAST)  # our own report: replaced
    assert json.loads((out / "metrics.json").read_text())["config"]["threshold"] == 0.5
    (out / "notes.txt").write_text("the user's own notes")  # a file we did not write: the folder is no longer ours
    with pytest.raises(BadArgumentError, match="did not write .*notes.txt"):
        audit(good, out, threshold=0.7, **FAST)
    assert (out / "notes.txt").read_text() == "the user's own notes"
    assert json.loads((out / "metrics.json").read_text())["config"]["threshold"] == 0.5
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(BadArgumentError, match="did not write"):
        audit(good, foreign, **FAST)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


def test_compare_side_by_side(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    save_checkpoint(make("ours"), a)
    save_weights(make("timm-beit").state_dict(), b, "state_dict_ema", "torch")
    table, results = compare([a, b], tmp_path / "cmp", **FAST)
    lines = table.splitlines()
    assert lines[0].startswith("| checkpoint |") and "a.safetensors" in lines[2] and "b.pt" in lines[3]
    assert "relative-position table" in lines[3]
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"compare.md", "compare.html", "curves.png",
                                                              "metrics.json", "per_block.csv", MANIFEST}
    saved = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    assert set(saved["checkpoints"]) == {"a.safetensors", "b.pt"}
    assert saved["checkpoints"]["b.pt"]["model"]["key"] == "state_dict_ema"
    depth_a = saved["checkpoints"]["a.safetensors"]["model"]["depth"]
    assert f"| {depth_a} |" in lines[2] and len(results) == 2


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    garbage, truncated, evil = tmp_path / "g.bin", tmp_path / "t.safetensors", tmp_path / "evil.pt"
    garbage.write_bytes(b"\x13\x37" * 64)
    full = save_weights(make("timm-vit").state_dict(), tmp_path / "full.safetensors", "bare", "safetensors")
    truncated.write_bytes(full.read_bytes()[:1000])
    marker = tmp_path / "payload_ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, evil)
    out = tmp_path / "out"
    for path, code in ((garbage, 4), (truncated, 4), (evil, 3), (tmp_path / "missing.pt", 2)):
        r = _cli("audit", str(path), "-o", str(out), "--no-progress")
        assert r.exit_code == code, r.output
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.output
        assert not out.exists()
    assert not marker.exists()
    r = _cli("audit", str(full), "-o", str(out), "--mean", "0.5,x", "--std", "1,1,1")
    assert r.exit_code == 2 and not out.exists()


def test_cli_audit_and_compare(tmp_path):
    m = tmp_path / "m.safetensors"
    save_checkpoint(make("ours"), m)
    v = save_weights(make("vit-pytorch-deepvit").state_dict(), tmp_path / "v.pt", "model_ema", "torch")
    r = _cli("audit", str(v), "-o", str(tmp_path / "rep"), "--num-images", "2", "--no-progress", "--mean",
             "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["model"]["data_source"] == "--mean/--std" and "re-attention matrix" in r.stderr
    assert "mixed" in saved["attention"] and not math.isnan(saved["attention"]["probs"]["cross_head"][0])
    r = _cli("compare", str(m), str(v), "--num-images", "2", "--no-progress")
    assert r.exit_code == 0 and "m.safetensors" in r.stdout and "v.pt" in r.stdout
    r = _cli("compare", str(m), "--no-progress")
    assert r.exit_code == 2 and "at least two" in r.stderr
