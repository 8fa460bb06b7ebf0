"""What a new user meets first (issue 23): one verdict line in every command, one numbering convention, the report
as a one-page answer, pandas-ready tables, forgiving inputs.

    PYTHONPATH=. pytest tests/test_first_minutes.py -q
"""
from __future__ import annotations

import csv
import json
import re
from html import escape
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

import collapse_probe as cp
from collapse_probe.cli import main
from collapse_probe.errors import BadArgumentError, MalformedFileError
from collapse_probe.loading.save import save_checkpoint
from collapse_probe.probing.result import AttentionStats, ProbeResult
from collapse_probe.probing.verdict import verdict_line

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "checkpoints" / "vit_micro_d4.safetensors"  # being retrained: no number of it is asserted here
FAST = ["--num-images", "8", "--no-progress"]


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(map(str, args)))
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.fixture(scope="module")
def vit4(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "vit4.safetensors"
    save_checkpoint(timm.create_model("vit_micro", depth=4), path)
    return path


# ------------------------------------------------------------------------------------------------ the verdict line


def test_similarity_audit_compare_and_judge_print_the_same_verdict_line(tmp_path):
    lib = cp.probe(str(BUNDLED), num_images=8, progress=False)
    line = cp.judge(lib)["verdict"]
    assert line.startswith("VERDICT: ") and line == verdict_line(cp.judge(lib))
    table = _cli("similarity", BUNDLED, *FAST)
    assert table.splitlines()[0] == line
    audited = _cli("audit", BUNDLED, "-o", tmp_path / "rep", *FAST)
    assert audited.splitlines()[0] == line
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.index(escape(line)) < html.index("<table")  # the answer before any table
    assert (tmp_path / "rep" / "report.md").read_text().splitlines()[2] == f"**{line}**"
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(BUNDLED.read_bytes())
    compared = _cli("compare", BUNDLED, copy, *FAST).splitlines()
    assert compared[:2] == [f"{BUNDLED.name}: {line}", f"copy.safetensors: {line}"]
    summary = json.loads(_cli("compare", BUNDLED, copy, "--format", "json", *FAST))["summary"]
    assert [r["verdict"] for r in summary] == [line, line]


def test_the_verdict_line_says_what_it_rests_on(vit4):
    no_twin = CliRunner().invoke(main, ["similarity", str(vit4), "--no-baseline", *FAST])
    assert no_twin.stdout.startswith("VERDICT: ")
    assert "untrained twin" not in no_twin.stdout.splitlines()[0].split("—")[1]  # no twin count where none exists
    s = cp.judge(cp.probe(vit4, torch.randn(4, 3, 32, 32), progress=False))
    d = s["depth"]
    assert s["redundancy"] is not None and "(measured)" in s["verdict"]  # cp.probe measures, as the commands do
    assert f"paper's metric {s['count']}/{d}" in s["verdict"] and f"untrained twin {s['baseline']['count']}/{d}" \
        in s["verdict"]
    # the wording follows the summary's fields alone, in order of evidence: measured, predicted, not judged
    measured = {**s, "redundancy": {**s["redundancy"], "blocks": [3, 4]}}
    assert verdict_line({**measured, "redundancy": {**measured["redundancy"], "sharing": None}}).startswith(
        "VERDICT: blocks 3-4 redundant (2 of 4), each alone: reusing the previous block's")
    share = {"source": 2, "blocks": [3, 4], "changed": 0.25, "kl": 0.5}
    line = verdict_line({**measured, "redundancy": {**measured["redundancy"], "sharing": share}})
    assert "(measured); not together: block 2's map in blocks 3-4 at once changes 25.0% — " in line
    line = verdict_line({**measured, "redundancy": {**measured["redundancy"], "sharing": {**share, "changed": 0.0,
                                                                                          "kl": 0.0}}})
    assert "(measured); and together: block 2's map in blocks 3-4 at once changes 0.0% — " in line
    assert verdict_line({**s, "redundancy": {**s["redundancy"], "blocks": []}}).startswith(
        "VERDICT: no redundant block (0 of 4)")
    predicted = {**s, "redundancy": None, "interchangeable": [2]}
    assert verdict_line(predicted).startswith("VERDICT: block 2 predicted redundant from the maps (1 of 4; not "
                                              "measured")
    mixed = {**s, "redundancy": None, "interchangeable": None, "kind": "mixed"}
    assert verdict_line(mixed).startswith("VERDICT: not judged from the maps: no map measure predicts redundancy "
                                          "after Re-attention")
    twin = {**s["baseline"], "uniform": False}
    assert f"untrained twin {twin['count']}/{d}, uniform attention" in verdict_line({**s, "baseline": twin})


def test_similarity_prints_a_short_table(vit4):
    lines = _cli("similarity", vit4, *FAST).splitlines()
    assert lines[0].startswith("VERDICT: ")
    header = next(i for i, t in enumerate(lines) if t.startswith("block"))
    assert [int(t.split()[0]) for t in lines[header + 1: header + 5]] == [1, 2, 3, 4]
    assert len(lines) <= header + 5 + 18  # the table of the judged kind, then a few lines of detail


# ------------------------------------------------------------------------------------------------ regimes and advice


def test_deepvit_regimes_come_from_the_maps_they_describe(deepvit_ckpt):
    result = cp.probe(deepvit_ckpt, torch.randn(4, 3, 32, 32), progress=False)
    s = cp.judge(result)
    assert s["kind"] == "mixed"
    assert not re.search(r"\bnan\b", " ".join(s["text"]), flags=re.I)
    for sentence in s["text"]:  # every regime sentence names the maps it is about
        if "near-uniformly" in sentence or "rows alike" in sentence or "centred pattern" in sentence:
            assert "softmax maps" in sentence or "maps after Re-attention" in sentence, sentence
    near_uniform = [t for t in s["text"] if "near-uniformly" in t]
    assert all("softmax maps" in t for t in near_uniform)  # only row-stochastic maps are ever called uniform
    assert s["regimes"]["uniform"] == []  # the maps after Re-attention have no entropy
    rows = result.to_pandas()
    assert set(rows[rows.kind == "mixed"].regime) <= {"", "token-uniform", "repeating"}
    assert rows[rows.kind == "mixed"].entropy.isna().all()
    assert s["other_kind"]["kind"] == "probs" and "regimes" in s["other_kind"]


def _stats(sim: np.ndarray, cross: list[float]) -> AttentionStats:
    n = len(sim)
    return AttentionStats(kind="probs", blocks=list(range(n)), names=[f"blocks.{i}.attn.probs" for i in range(n)],
                          threshold=0.9, similarity=sim, ratio=sim, head_similarity=np.zeros((n, 2, 2)),
                          cross_head=np.array(cross), effective_rank=np.ones(n), energy_rank=np.ones(n),
                          pearson=sim)


def test_no_advice_without_the_evidence_the_rules_require():
    sim = np.eye(5)
    for i in range(1, 5):
        sim[i, i - 1] = sim[i - 1, i] = 0.99  # every block repeats the previous one, centred too
    result = ProbeResult({"probs": _stats(sim, [0.99] * 5)}, images={"count": 2}, model={"depth": 5})
    s = cp.judge(result)
    assert s["regimes"]["repeating"] == [2, 3, 4, 5]  # described ...
    text = " ".join(s["text"])
    assert "reuse" not in text and "removal" not in text and "pruning" not in text  # ... but no twin: no advice
    assert "nothing is recommended" in text


# ------------------------------------------------------------------------------------------------ block numbering


def test_block_is_one_based_and_index_zero_based_everywhere():
    sim = np.eye(6)
    for i, v in enumerate([0.2, 0.95, 0.3, 0.92, 0.97], start=1):  # module i vs module i-1
        sim[i, i - 1] = sim[i - 1, i] = v
    st = _stats(sim, [0.1] * 6)
    result = ProbeResult({"probs": st}, images={"count": 3, "source": "test"}, model={"depth": 6},
                         settings={"threshold": 0.9})
    assert st.similar_indices(0.9) == [2, 4, 5] and st.similar_blocks(0.9) == [3, 5, 6]
    assert st.onset_index(0.9) == 4 and st.onset(0.9) == 5
    summary = result.summary("probs")
    assert summary["similar_blocks"] == [3, 5, 6] == cp.judge(result)["similar_blocks"]
    assert summary["similar_indices"] == [2, 4, 5] and summary["onset"] == 5 == cp.judge(result)["onset"]
    df = result.to_pandas()
    assert (df.block == df["index"] + 1).all() and df[df.similar].block.tolist() == [3, 5, 6]


# ------------------------------------------------------------------------------------------------ the report


def test_report_is_small_has_the_evidence_and_claims_no_batchnorm_it_lacks(tmp_path, vit4):
    from collapse_probe.reports.audit import audit

    opts = dict(images="builtin:digits", num_images=16, batch_size=8, progress=False)
    small = audit(vit4, tmp_path / "small", **opts)
    big = audit(vit4, tmp_path / "big", per_image=True, **opts)
    text = (tmp_path / "small" / "metrics.json").read_text()
    assert '"per_image": {' not in text and len(text) < 100_000  # 4 blocks: a few L x L matrices, twin included
    assert len(text) < (tmp_path / "big" / "metrics.json").stat().st_size
    assert "per_image" not in small["attention"]["probs"] and big["attention"]["probs"]["per_image"]
    assert small["summary"]["count_interval"] == big["summary"]["count_interval"]  # intervals computed first
    back = ProbeResult.from_json(tmp_path / "small" / "metrics.json")
    assert cp.judge(back)["verdict"] == small["summary"]["verdict"]
    assert (tmp_path / "small" / "block_measures.png").is_file()
    html = (tmp_path / "small" / "report.html").read_text()
    assert html.count("data:image/png") == 5 and html.index("block_measures") < html.index("block_curves")
    header = html[html.index("<table"):html.index("</tr>")]
    assert [h.split("</th>")[0] for h in header.split("<th>")[1:]] == ["block", "sim_prev", "twin_sim_prev",
                                                                       "similar", "interchangeable", "reuse_changed",
                                                                       "redundant", "skip_changed", "regime"]
    for f in ("report.html", "report.md"):
        assert "BatchNorm" not in (tmp_path / "small" / f).read_text()  # a plain ViT has none
    assert "BatchNorm" not in _cli("similarity", vit4, *FAST)
    rows = list(csv.DictReader((tmp_path / "small" / "per_block.csv").open()))
    assert rows[0]["checkpoint"] == str(vit4) and "sim_prev_ci_low" in rows[0] and "effective_rank" in rows[0]


# ------------------------------------------------------------------------------------------------ pandas and inputs


def test_results_concatenate_and_group_by_checkpoint(tmp_path, vit4):
    import pandas as pd

    other = tmp_path / "other.safetensors"
    save_checkpoint(timm.create_model("vit_micro", depth=3), other)
    x = torch.randn(2, 3, 32, 32)
    a, b = (cp.probe(p, x, progress=False) for p in (vit4, other))
    df = pd.concat([a.to_pandas(), b.to_pandas()])
    depth = df[df.kind == "probs"].groupby("checkpoint").block.max()
    assert depth.to_dict() == {str(vit4): 4, str(other): 3}
    assert df.groupby("checkpoint").similar.sum().to_dict() == {
        str(vit4): len(a.attention["probs"].similar_blocks()), str(other): len(b.attention["probs"].similar_blocks())}
    assert set(a.to_pandas(checkpoint="mine").checkpoint) == {"mine"}
    assert {"sim_prev_ci_low", "sim_prev_ci_high", "twin_sim_prev"} <= set(df.columns)
    assert not [c for c in df.columns if c.endswith(("_lo", "_low", "_hi", "_high")) and "_ci_" not in c]
    model = timm.create_model("vit_micro", depth=2)
    assert set(cp.probe(model, x, progress=False, baseline=False).to_pandas().checkpoint) == {"in-memory model"}


def test_from_json_takes_a_path_or_the_text(tmp_path, vit4):
    result = cp.probe(vit4, torch.randn(2, 3, 32, 32), progress=False, baseline=False)
    path = tmp_path / "r.json"
    path.write_text(result.to_json())
    back = {ProbeResult.from_json(source).to_json() for source in (path, str(path), path.read_text())}
    assert len(back) == 1  # the same result from a Path, a path string and the text (per-image rows are rounded)
    assert json.loads(back.pop())["attention"] == json.loads(result.to_json())["attention"]
    with pytest.raises(BadArgumentError, match="no such file"):
        ProbeResult.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"not": "a result"}')
    with pytest.raises(MalformedFileError, match="not a collapse-probe result"):
        ProbeResult.from_json(tmp_path / "bad.json")
    res = CliRunner().invoke(main, ["similarity", str(vit4), "--format", "json", "-o", str(tmp_path / "s.json"),
                                    "--no-baseline", *FAST])
    assert res.exit_code == 0 and ProbeResult.from_json(tmp_path / "s.json").depth == 4


def test_pictures_in_memory_are_preprocessed_like_image_files(tmp_path):
    model = timm.create_model("vit_micro", depth=2)
    rng = np.random.default_rng(0)
    hwc = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(hwc):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    want = cp.probe(model, tmp_path, progress=False, baseline=False).attention["probs"].similarity
    for pictures in (hwc, [a.transpose(2, 0, 1) for a in hwc], [a.astype(np.float32) / 255 for a in hwc],
                     [Image.fromarray(a) for a in hwc], np.stack(hwc)):
        got = cp.probe(model, pictures, progress=False, baseline=False)
        np.testing.assert_allclose(got.attention["probs"].similarity, want, atol=1e-6)
        assert got.images.count == 3
    bad = [([np.zeros(5, np.uint8)], "shape"), ([np.zeros((8, 8, 3), np.complex64)], "dtype complex64"),
           ([np.full((8, 8, 3), 2.0)], "outside"), ([np.zeros((8, 8, 7), np.uint8)], "channels"),
           ([np.zeros((8, 8, 3), np.uint8), "cat.jpg"], "is a str"), ([torch.zeros(3, 32)], "[B, C, H, W]"),
           (3, "got a int")]
    for images, message in bad:
        with pytest.raises(BadArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
            cp.probe(model, images, progress=False, baseline=False)
        assert "\n" not in str(e.value)
    stacked = cp.probe(model, [torch.zeros(3, 32, 32)] * 2, progress=False, baseline=False)  # [C, H, W] each
    assert stacked.images.count == 2
