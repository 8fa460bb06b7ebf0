"""Interventions (issue 16): planted ground truth, parity with independent computations, exact restoration, the Wilson
interval in closed form, the command's outputs and exit codes.

    PYTHONPATH=. pytest tests/test_intervene.py -q
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import collapse_probe.models  # noqa: F401  (registers our presets)
from collapse_probe.cli import main
from collapse_probe.errors import BadArgumentError, UnsupportedModelError
from collapse_probe.hooks.capture import capture
from collapse_probe.hooks.intervene import intervene, intervention_blocks
from collapse_probe.outputs import MANIFEST
from collapse_probe.probing.intervene import check_flagged, measure
from collapse_probe.probing.outcome import Z95, Intervention, InterventionReport, from_block, one_block, sweep, wilson
from collapse_probe.reports.intervene import intervention_sentences, render, to_csv

from .conftest import REPO
from .family_models import FAMILIES, example_input, logits, make, save_weights

torch.manual_seed(0)
X = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
DEPTH, K = 6, 2  # planted models: modules K..DEPTH-1 (0-based; blocks K+1..DEPTH) share module K's map


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def planted(name: str = "vit_micro", sharp: float = 30.0, attn_gain: float = 50.0, mlp_gain: float = 5.0) -> nn.Module:
    """Blocks K.. of ``name`` compute exactly block K's applied map from an unchanged half of the channels.

    Blocks >= K read Q, K only from channels A (the first half), with no norm in front (a LayerNorm would mix the other
    half into every channel), and write only into channels B; so the A half of their input is block K's input, and
    with block K's Q, K rows (and Θ + BatchNorm) copied, their maps equal block K's bit for bit. V reads all channels
    and the writes are scaled up, so these blocks carry information to the head.
    """
    torch.manual_seed(0)
    m = timm.create_model(name, depth=DEPTH, num_classes=10).eval()
    C = m.embed_dim
    a_half, b_half = slice(0, C // 2), slice(C // 2, C)
    src = m.blocks[K].attn
    with torch.no_grad():
        for b in range(K, DEPTH):
            blk, attn = m.blocks[b], m.blocks[b].attn
            blk.norm1 = nn.Identity()
            attn.qkv.weight[:2 * C, b_half] = 0
            if b == K:
                attn.qkv.weight[:2 * C] *= sharp
                attn.qkv.bias[:2 * C] *= sharp
            else:
                attn.qkv.weight[:2 * C] = src.qkv.weight[:2 * C]
                attn.qkv.bias[:2 * C] = src.qkv.bias[:2 * C]
                if attn.reattention:
                    attn.theta.load_state_dict(src.theta.state_dict())
                    attn.mix_norm.load_state_dict(src.mix_norm.state_dict())
            for lin, gain in ((attn.proj, attn_gain), (blk.mlp.fc2, mlp_gain)):
                lin.weight[a_half] = 0
                lin.bias[a_half] = 0
                lin.weight[b_half] *= gain
                lin.bias[b_half] *= gain
    return m


# ---------------------------------------------------------------- Wilson interval

@pytest.mark.parametrize("n", [1, 7, 40, 360])
def test_wilson_matches_closed_forms(n):
    z2 = Z95 ** 2
    assert wilson(0, n) == pytest.approx((0.0, z2 / (n + z2)), abs=1e-12)  # k = 0: [0, z²/(n + z²)]
    assert wilson(n, n) == pytest.approx((n / (n + z2), 1.0), abs=1e-12)  # k = n: [n/(n + z²), 1]
    if n % 2 == 0:  # p = 1/2: 1/2 ± z / (2 sqrt(n + z²))
        half = Z95 / (2 * math.sqrt(n + z2))
        assert wilson(n // 2, n) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    for k in range(n + 1):  # mirror symmetry, and the interval holds the estimate
        lo, hi = wilson(k, n)
        lo2, hi2 = wilson(n - k, n)
        assert lo == pytest.approx(1 - hi2, abs=1e-12) and hi == pytest.approx(1 - lo2, abs=1e-12)
        assert lo <= k / n <= hi


def test_wilson_agrees_with_scipy_and_refuses_nonsense():
    from scipy.stats import binomtest

    for k, n in [(3, 360), (17, 40), (1, 2)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert all(math.isnan(v) for v in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(5, 4)


# ---------------------------------------------------------------- planted ground truth

@pytest.mark.parametrize("name,kind", [("vit_micro", "probs"), ("deepvit_micro", "mixed")])
def test_planted_repeat_reuse_changes_nothing_and_a_wrong_source_does(name, kind):
    model = planted(name)
    with torch.no_grad(), capture(model, kinds=(kind,)) as cap:
        model(X)
    maps = cap.kind(kind)
    assert all(torch.equal(maps[K], maps[b]) for b in range(K, DEPTH))  # the plant: identical applied maps
    assert not torch.equal(maps[K - 1], maps[K])
    wrong = Intervention("reuse", tuple(range(K + 2, DEPTH + 1)), K, K)  # blocks are 1-based: block K = module K-1
    report = measure(model, X, [from_block("reuse", K + 1, DEPTH), wrong], progress=False)
    right, control = report.outcomes
    assert right.agree == right.images == len(X) and right.changed == 0
    assert abs(right.kl) < 1e-12 and right.cosine == pytest.approx(1.0, abs=1e-9)
    assert control.kl > 1e-4 and control.cosine < 0.99  # the measurement can see a wrong map
    assert report.applied == [kind] * DEPTH


def test_skipping_blocks_that_carry_information_changes_predictions():
    model = planted()
    report = measure(model, X, [from_block("skip", K + 1, DEPTH), from_block("skip", DEPTH - 1, DEPTH)],
                     progress=False)
    rest, last = report.outcomes
    assert rest.changed > len(X) // 4 and rest.kl > 1e-3 and rest.cosine < 0.9
    assert 0 < last.cosine < 1
    with torch.no_grad():  # skipping every block = the head on the embeddings alone
        with intervene(model, skip=range(DEPTH)):
            got = model(X)
        want = model.forward_head(model.norm(model.norm_pre(model._pos_embed(model.patch_embed(X)))))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_uniform_attention_changes_a_sharp_model_and_not_a_flat_one():
    torch.manual_seed(0)
    sharp = timm.create_model("vit_micro", depth=4, num_classes=10).eval()
    flat = timm.create_model("vit_micro", depth=4, num_classes=10).eval()
    C = sharp.embed_dim
    with torch.no_grad():
        for s, f in zip(sharp.blocks, flat.blocks):
            s.attn.qkv.weight[:2 * C] *= 40
            f.attn.qkv.weight[:2 * C] = 0
            f.attn.qkv.bias[:2 * C] = 0
        with capture(sharp) as cap:
            sharp(X)
    assert min(float(m.amax(-1).mean()) for m in cap.kind("probs")) > 0.5  # most weight on one key
    everything = [Intervention("uniform", tuple(range(1, 5)), None, 1)]
    s, f = measure(sharp, X, everything, progress=False).outcomes[0], measure(flat, X, everything,
                                                                              progress=False).outcomes[0]
    assert s.kl > 1e-3 and s.cosine < 0.99 and s.changed > 0
    assert f.changed == 0 and abs(f.kl) < 1e-12 and f.cosine == pytest.approx(1.0, abs=1e-9)  # 1/N already


# ---------------------------------------------------------------- parity with independent computations

@pytest.mark.parametrize("name", ["vit_micro", "deepvit_micro"])
def test_reuse_equals_our_models_attn_reuse_from(name):
    torch.manual_seed(0)
    plain = timm.create_model(name, depth=DEPTH, num_classes=10).eval()
    trained_reuse = timm.create_model(name, depth=DEPTH, num_classes=10, attn_reuse_from=K).eval()
    trained_reuse.load_state_dict(plain.state_dict())
    with torch.no_grad():
        with intervene(plain, reuse={b: K for b in range(K + 1, DEPTH)}):
            got = plain(X)
        want = trained_reuse(X)
        assert not torch.allclose(plain(X), want, atol=1e-3)  # reuse matters in this model
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _timm_manual(m: nn.Module, x: torch.Tensor, source: int, targets: set[int]) -> torch.Tensor:
    h, saved = m.norm_pre(m._pos_embed(m.patch_embed(x))), None
    for i, blk in enumerate(m.blocks):
        a, y = blk.attn, blk.norm1(h)
        B, N, C = y.shape
        q, k, v = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((a.q_norm(q) * a.scale) @ a.k_norm(k).transpose(-2, -1)).softmax(-1)
        saved = attn if i == source else saved
        attn = saved if i in targets else attn
        h = h + blk.ls1(a.proj(a.norm((attn @ v).transpose(1, 2).reshape(B, N, C))))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return m.forward_head(m.norm(h))


def _hf_manual(m: nn.Module, x: torch.Tensor, source: int, targets: set[int]) -> torch.Tensor:
    h, saved = m.vit.embeddings(x), None
    for i, layer in enumerate(m.vit.layers):
        a, y = layer.attention, layer.layernorm_before(h)
        B, N, _ = y.shape
        q, k, v = (p(y).view(B, N, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        attn = (q @ k.transpose(-2, -1) * a.scaling).softmax(-1)
        saved = attn if i == source else saved
        attn = saved if i in targets else attn
        h = h + a.o_proj((attn @ v).transpose(1, 2).reshape(B, N, -1))
        h = h + layer.mlp(layer.layernorm_after(h))
    return m.classifier(m.vit.layernorm(h)[:, 0])


def _torchvision_manual(m: nn.Module, x: torch.Tensor, source: int, targets: set[int]) -> torch.Tensor:
    h = m._process_input(x)
    h = torch.cat([m.class_token.expand(h.shape[0], -1, -1), h], dim=1) + m.encoder.pos_embedding
    saved = None
    for i, blk in enumerate(m.encoder.layers):
        mha, y = blk.self_attention, blk.ln_1(h)
        B, N, E = y.shape
        q, k, v = (t.view(B, N, mha.num_heads, -1).transpose(1, 2)
                   for t in F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        saved = attn if i == source else saved
        attn = saved if i in targets else attn
        h = h + mha.out_proj((attn @ v).transpose(1, 2).reshape(B, N, E))
        h = h + blk.mlp(blk.ln_2(h))
    return m.heads(m.encoder.ln(h)[:, 0])


def _four_blocks(family: str) -> nn.Module:
    import torchvision
    import transformers as tf

    torch.manual_seed(0)
    if family == "timm":
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=192, depth=4,
                                 num_heads=3, num_classes=10).eval()
    if family == "hf":
        return tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                         num_hidden_layers=4, num_attention_heads=4,
                                                         intermediate_size=64, num_labels=10,
                                                         initializer_range=0.3)).eval()  # maps far from uniform
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=3, hidden_dim=192,
                                             mlp_dim=384, num_classes=10).eval()
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision initialises its head to zero: logits would be 0
    return m


@pytest.mark.parametrize("family,manual", [("timm", _timm_manual), ("hf", _hf_manual),
                                           ("torchvision", _torchvision_manual)])
def test_reuse_through_the_adapters_equals_an_independent_forward(family, manual):
    model, x = _four_blocks(family), X[:6]
    with torch.no_grad():
        plain = logits(model, x)
        torch.testing.assert_close(manual(model, x, -1, set()), plain, rtol=1e-4, atol=1e-5)  # the manual forward
        for source, targets in [(0, {1, 2, 3}), (1, {3})]:
            with intervene(model, reuse=dict.fromkeys(targets, source)):
                got = logits(model, x)
            want = manual(model, x, source, targets)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert (got - plain).abs().max() > 1e-3  # and the intervention did something
    assert logits(model, x).equal(plain)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_replaces_its_applied_map_and_is_restored_exactly(name):
    model, x = make(name), example_input(name, batch=3)
    hooks = _hooks(model)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    with torch.no_grad():
        before = logits(model, x)
        with intervene(model) as blocks:
            null = logits(model, x)
        torch.testing.assert_close(null, before, rtol=1e-4, atol=1e-5)  # the switched path is the same function
        with intervene(model, skip=[len(blocks) - 1]) as blocks:
            seen: list[tuple[torch.Tensor, torch.Tensor]] = []
            last = blocks[-1]
            handles = [m.register_forward_hook(lambda _m, i, o: seen.append((i[0], o[0] if isinstance(o, tuple)
                                                                             else o))) for m in last.skip_modules]
            logits(model, x)  # later hooks see what the intervention returned
            for h in handles:
                h.remove()
        assert len(seen) == len(last.skip_modules) > 0
        for inp, out in seen:  # skipped: the block returns its input, or each residual branch adds zero
            assert torch.equal(out, torch.zeros_like(out)) if last.zero_branches else torch.equal(out, inp)
        if blocks[0].swap is None:
            assert name == "vit-pytorch-cait"
            with pytest.raises(UnsupportedModelError, match="cannot be replaced"), intervene(model, uniform=[0]):
                pass
        else:
            with intervene(model, replace={b.index: torch.clone for b in blocks}):
                same = logits(model, x)  # every map put back as a copy of itself: the put path is exact
            torch.testing.assert_close(same, null, rtol=1e-5, atol=1e-6)

            def boom(_m: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("boom inside the forward")
            with pytest.raises(RuntimeError, match="boom"), intervene(model, replace={len(blocks) - 1: boom}):
                logits(model, x)
        after = logits(model, x)
    assert after.equal(before) and _hooks(model) == hooks
    assert getattr(getattr(model, "config", None), "_attn_implementation", None) == impl


def test_switches_are_restored_after_an_exception():
    from transformers import AttentionInterface

    from collapse_probe.hooks.swap import HF_ATTENTION

    def boom(_m: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom inside the forward")

    timm_model, hf = make("timm-vit"), make("hf-vit")
    fused, impl = [b.attn.fused_attn for b in timm_model.blocks], hf.config._attn_implementation
    x = example_input("timm-vit")
    for model in (timm_model, hf):
        with torch.no_grad():
            before = logits(model, x)
            with pytest.raises(RuntimeError, match="boom"), intervene(model, reuse={1: 0}, replace={0: boom}):
                if model is timm_model:
                    assert [b.attn.fused_attn for b in model.blocks] == [False, False]  # switched while inside
                logits(model, x)
            assert logits(model, x).equal(before)
    assert [b.attn.fused_attn for b in timm_model.blocks] == fused and hf.config._attn_implementation == impl
    assert HF_ATTENTION not in AttentionInterface._global_mapping


def test_bad_requests_fail_before_anything_changes():
    model = planted()
    hooks = _hooks(model)
    for kw, err in [({"reuse": {3: 3}}, BadArgumentError), ({"reuse": {3: 5}}, BadArgumentError),
                    ({"skip": [6]}, BadArgumentError), ({"skip": [2], "uniform": [2]}, BadArgumentError),
                    ({"reuse": {4: 2}, "skip": [2]}, BadArgumentError)]:
        with pytest.raises(err), intervene(model, **kw):
            pass
    assert _hooks(model) == hooks
    with pytest.raises(BadArgumentError, match="between 1 and 5"):
        from_block("reuse", 6, 6)
    with pytest.raises(BadArgumentError, match="block 1 has none"):
        one_block("reuse", 1, 6)
    with pytest.raises(BadArgumentError, match="start at 1"):
        Intervention("skip", (0, 1))
    assert [iv.source for iv in sweep("reuse", 4)] == [1, 2, 3] and sweep("skip", 3)[0].blocks == (2, 3)


def test_the_intervention_api_takes_the_command_lines_block_numbers():
    from collapse_probe.reports.intervene import plan

    iv = from_block("reuse", 17, 32)  # --from-block 17: blocks 18-32 reuse block 17's map
    assert plan("reuse", 32, from_block=17) == [iv]
    assert (iv.blocks, iv.source, iv.block) == (tuple(range(18, 33)), 17, 17)
    assert iv.spec() == {"reuse": dict.fromkeys(range(17, 32), 16)}  # the hooks take 0-based module indices
    assert iv.describe() == "reusing block 17's map in blocks 18-32"
    assert plan("skip", 32, blocks=[30, 31]) == [one_block("skip", 30, 32), one_block("skip", 31, 32)]
    assert one_block("skip", 30, 32).spec() == {"skip": [29]}
    assert plan("reuse", 4, blocks=[3], source=1) == [one_block("reuse", 3, 4, source=1)]
    # intervention.json written before the 1-based numbering (0-based, "at") reads back renumbered
    old = {"mode": "reuse", "blocks": list(range(17, 32)), "source": 16, "at": 16}
    assert Intervention.from_dict(old) == iv and Intervention.from_dict(iv.to_dict()) == iv


# ---------------------------------------------------------------- report, sentences, the audit hook

def test_check_flagged_sentences_cite_the_measurement_and_round_trip():
    model = planted()
    report = check_flagged(model, X, list(range(K + 2, DEPTH + 1)))  # the verdict's 1-based block numbers
    reuse, skip = report.outcomes
    assert (reuse.intervention.source, reuse.intervention.blocks) == (K + 1, tuple(range(K + 2, DEPTH + 1)))
    assert skip.intervention.mode == "skip" and skip.intervention.blocks == reuse.intervention.blocks
    text = intervention_sentences(report)
    assert text[0].startswith(f"Reusing block {K + 1}'s map in blocks {K + 2}-{DEPTH} changes 0.0 % of top-1 "
                              f"predictions (0 of {len(X)} images, 95 % CI 0.0-{100 * wilson(0, len(X))[1]:.1f} %)")
    assert f"{skip.changed} of {len(X)} images" in text[1] and f"mean KL {skip.kl:.3g}" in text[1]
    assert check_flagged(model, X, []) is None
    again = InterventionReport.from_json(report.to_json())
    assert again.to_json() == report.to_json()
    assert render(again, "csv") == to_csv(report) and "reuse" in render(report, "table")


def test_refused_family_is_listed_not_raised_in_check_flagged():
    model = make("vit-pytorch-cait")
    report = check_flagged(model, example_input("vit-pytorch-cait", 4), [2])
    assert [o.intervention.mode for o in report.outcomes] == ["skip"]
    assert "cannot be replaced" in report.refused[0] and intervention_sentences(report)[-1].startswith("Not checked")


def test_bundled_checkpoint_labels_give_its_own_accuracy():
    from collapse_probe.loading.images import digits_arrays, image_labels
    from collapse_probe.probing.run import image_batches, open_model

    loaded, _, _ = open_model(REPO / "checkpoints" / "vit_micro_d8.safetensors", "cpu")
    report = measure(loaded, "builtin:digits", [from_block("skip", 1, 8)], num_images=40, batch_size=20,
                     progress=False)
    o = report.outcomes[0]
    batches, _ = image_batches("builtin:digits", loaded.model, 40, 40)
    with torch.no_grad():
        pred = loaded.model(next(iter(batches))).argmax(-1).numpy()
    labels = np.asarray(image_labels("builtin:digits", 40))
    assert labels.tolist() == digits_arrays()[3][:40].tolist()
    assert o.labelled == 40 and o.correct_orig == int((pred == labels).sum()) > 30  # a trained model, aligned labels
    assert o.changed > 0 and o.accuracy < o.accuracy_orig  # skipping 7 of 8 trained blocks costs accuracy


# ---------------------------------------------------------------- the command

def test_cli_writes_csv_json_png_and_prints_a_table(tmp_path, deepvit_ckpt):
    out = tmp_path / "iv"
    res = CliRunner().invoke(main, ["intervene", str(deepvit_ckpt), "--sweep", "--num-images", "4", "--no-progress",
                                    "-o", str(out), "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "intervention.csv", "intervention.json",
                                                            "intervention.png"])
    rows = (out / "intervention.csv").read_text().splitlines()
    assert rows[0].startswith("checkpoint,mode,block,block_index,source,blocks") and len(rows) == 1 + 2
    assert rows[1].startswith(f"{deepvit_ckpt},reuse,1,0,1,2-3,4,")
    assert rows[2].startswith(f"{deepvit_ckpt},reuse,2,1,2,3,4,")
    assert "_ci_low" in rows[0] and "_lo," not in rows[0]
    data = json.loads((out / "intervention.json").read_text())
    assert data["similarity"]["kind"] == "mixed" and len(data["similarity"]["neighbor"]) == 3
    assert res.stdout.startswith("checkpoint,mode,block,block_index")  # --format csv on stdout
    assert data["similarity"]["blocks"] == [1, 2, 3] and data["numbering"] == "1-based"
    again = CliRunner().invoke(main, ["intervene", str(deepvit_ckpt), "--mode", "skip", "--blocks", "2,3",
                                      "--num-images", "2", "--no-progress", "-o", str(out)])
    assert again.exit_code == 0, again.output  # our own folder is replaced
    assert "skip" in again.stdout and json.loads((out / "intervention.json").read_text())["outcomes"][1][
        "intervention"]["blocks"] == [3]


@pytest.mark.parametrize("args,message", [
    (["--from-block", "0"], "0"), (["--from-block", "3"], "between 1 and 2"), (["--blocks", "0"], "start at 1"),
    (["--blocks", "4"], "blocks 1-3"), ([], "exactly one"), (["--sweep", "--from-block", "1"], "exactly one"),
    (["--from-block", "1", "--source", "1"], "--source applies to --blocks"), (["--blocks", "1"], "block 1 has none"),
    (["--blocks", "2", "--source", "3"], "earlier block"),
])
def test_cli_bad_arguments_exit_2_with_one_line(deepvit_ckpt, args, message):
    res = CliRunner().invoke(main, ["intervene", str(deepvit_ckpt), "--num-images", "2", "--no-progress", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_cli_unsupported_family_exits_5_and_skip_still_works(tmp_path):
    path = save_weights(make("vit-pytorch-cait").state_dict(), tmp_path / "cait.safetensors", "bare", "safetensors")
    res = CliRunner().invoke(main, ["intervene", str(path), "--from-block", "1", "--num-images", "2",
                                    "--no-progress"])
    assert res.exit_code == 5, res.output
    assert res.output.count("\n") == 1 and "cannot be replaced" in res.output
    ok = CliRunner().invoke(main, ["intervene", str(path), "--mode", "skip", "--from-block", "1", "--num-images", "2",
                                   "--no-progress"])
    assert ok.exit_code == 0, ok.output


def test_plots_take_reports_and_a_backbone_report_round_trips():
    from matplotlib.axes import Axes

    from collapse_probe.plots.intervene import plot_block_similarity, plot_intervention_figure, plot_output_change

    backbone = make("hf-dinov2")  # no classifier: only the feature cosine exists
    report = measure(backbone, example_input("hf-dinov2", 4), sweep("uniform", 2), progress=False)
    o = report.outcomes[0]
    assert o.agree is None and o.kl_sum is None and 0 < o.cosine < 1 and math.isnan(report.rows()[0]["kl"])
    assert "no classifier" in intervention_sentences(report)[0]
    again = InterventionReport.from_json(report.to_json())
    assert again.outcomes[0].agree is None and again.to_json() == report.to_json()
    ax = plot_output_change(report)
    assert isinstance(ax, Axes) and plot_block_similarity(report, ax=ax.figure.add_subplot(2, 1, 2)) is not None
    planted_report = measure(planted(), X[:8], sweep("reuse", DEPTH), progress=False, similarity=True)
    axes = plot_intervention_figure(planted_report)
    assert len(axes) == 2 and axes[0].figure is axes[1].figure
    assert len(planted_report.similarity["neighbor"]) == DEPTH and planted_report.neighbor(K + 2) == pytest.approx(1.0)


@pytest.mark.parametrize("name, kind", [("vit_micro", "probs"), ("deepvit_micro", "mixed")])
def test_intervention_figure_follows_the_kinds_rule(name, kind):
    """The similarity panel draws the threshold for softmax maps only (a note instead for maps after Θ + BatchNorm);
    one legend under both panels, off the data; blocks numbered from 1."""
    from collapse_probe.plots.intervene import plot_intervention_figure
    from collapse_probe.plots.style import MIXED_NOTE

    from .test_figures import assert_block_ticks, assert_legends_off_the_data

    torch.manual_seed(0)
    model = timm.create_model(name, depth=3, num_classes=10).eval()
    report = measure(model, X[:4], sweep("reuse", 3), progress=False, similarity=True)
    change, sim = plot_intervention_figure(report)
    fig = change.figure
    assert report.similarity["kind"] == kind and {ln.get_gid() for ln in sim.lines} - {"threshold"} == {kind}
    thresholds = [ln for ln in sim.lines if ln.get_gid() == "threshold"]
    notes = " ".join(t.get_text().replace("\n", " ") for t in sim.texts)
    if kind == "mixed":
        assert not thresholds and MIXED_NOTE in notes
    else:
        assert len(thresholds) == 1 and not notes
    assert assert_legends_off_the_data(fig) == 1 and len(fig.legends) == 1  # the KL axis holds the right side
    texts = {t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts()}
    curves = [ln for a in fig.axes for ln in a.lines if ln.get_label() != "_nolegend_"]  # not error-bar caps
    assert len(curves) >= 3 and all(ln.get_label() in texts for ln in curves)  # every curve named, the KL too
    for ax in (change, sim):
        assert_block_ticks(ax, 3)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prefix_cache_gives_the_numbers_of_full_forwards(name):
    """measure() runs an intervention from its first touched block on, the earlier blocks' outputs taken from the
    unmodified forward of the batch; every outcome must equal the one from full forwards, in every family (where the
    blocks are not whole modules called in order, it falls back to full forwards)."""
    model, x = make(name), example_input(name, batch=6)
    depth = len(intervention_blocks(model))
    ivs = [Intervention("reuse", (b,), b - 1, b) for b in range(2, depth + 1)] + \
        [Intervention("skip", (b,), None, b) for b in range(1, depth + 1)] + sweep("reuse", depth)
    runs = {}
    for cached in (True, False):
        block = intervention_blocks(model)[0].skip_modules[0]
        # a weight-holding submodule of block 1: it runs only when block 1 really computes (a replayed block's own
        # hooks still fire, its children do not)
        first = next(m for m in block.modules()
                     if m is not block and next(m.parameters(recurse=False), None) is not None)
        calls = []
        handle = first.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            runs[cached] = measure(model, x, ivs, batch_size=3, progress=False, keep_going=True, prefix_cache=cached)
        finally:
            handle.remove()
        runs[cached].first_block_calls = len(calls)
    a, b = runs[True], runs[False]
    assert a.refused == b.refused and len(a.outcomes) == len(b.outcomes)
    for oa, ob in zip(a.outcomes, b.outcomes):
        assert oa.intervention == ob.intervention
        assert (oa.changed, oa.images) == (ob.changed, ob.images)
        for key in ("kl", "cosine"):
            va, vb = getattr(oa, key), getattr(ob, key)
            same = (va is None and vb is None) or (math.isnan(va) and math.isnan(vb)) or \
                va == pytest.approx(vb, rel=1e-5, abs=1e-7)
            assert same, (key, oa.intervention, va, vb)
    batches, done = 2, len(a.outcomes)
    assert b.first_block_calls == batches * (1 + done)  # full forwards: block 1 runs every time
    if name in ("ours", "timm-vit", "hf-vit", "torchvision"):  # whole block modules: block 1 runs only when touched
        touching = sum(1 for o in a.outcomes if 1 in (*o.intervention.blocks, o.intervention.source or 0))
        assert a.first_block_calls == batches * (1 + touching) < b.first_block_calls
