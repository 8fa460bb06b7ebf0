"""Issue 12's capture cases, each from a file saved the way its ecosystem saves it: HuggingFace BEiT-like models
(Data2VecVision, BEiT: relative position bias), ViT-MAE (random masking off while probing) and vit-pytorch SimpleViT,
T2TViT and CrossViT (only the equal-shaped main stack probed). Maps are checked against HF's own
``output_attentions`` or against q/k recomputed from the original model's modules.

    PYTHONPATH=. pytest tests/test_capture_more.py -q
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from einops import rearrange

from collapse_probe.cli import main
from collapse_probe.errors import UnsupportedModelError
from collapse_probe.hooks.capture import capture
from collapse_probe.loading.build import load_model
from collapse_probe.probing.run import probe

from .test_capture_families import _hook_counts, _record, _softmax_qk

HF = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 64}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
COMMON = ["--images", "builtin:photos", "--num-images", "2", "--batch-size", "2", "--no-progress"]


def _model_line(table: str) -> str:
    """The table's model line (after the verdict line), where what was changed to measure the model is shown."""
    return next(line for line in table.splitlines() if line.startswith("model "))


def _maps(model: torch.nn.Module, x: torch.Tensor, **kw) -> list[torch.Tensor]:
    with torch.no_grad(), capture(model) as cap:
        model(x, **kw)
    return cap.kind("probs")


def _close(got: list[torch.Tensor], want: list[torch.Tensor] | tuple) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# --- 2. HF BEiT-like self-attention ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,extra,family", [
    ("data2vec", {"use_relative_position_bias": True}, "transformers-beit"),
    ("data2vec", {"use_shared_relative_position_bias": True}, "transformers-beit"),
    ("beit", {"use_relative_position_bias": True}, "transformers"),  # transformers 5: the shared attention interface
])
def test_beit_like_transformers_folder_against_output_attentions(tmp_path, kind, extra, family):
    """Data2VecVision picks its self-attention class (sdpa: no map) per module at construction, so the eager parent
    class is swapped in while probing; BEiT (transformers 5) uses the attention interface, switched to eager."""
    import transformers as tf

    cfg_cls, model_cls = {"data2vec": (tf.Data2VecVisionConfig, tf.Data2VecVisionModel),
                          "beit": (tf.BeitConfig, tf.BeitModel)}[kind]
    torch.manual_seed(0)
    saved = model_cls(cfg_cls(**HF, **extra))
    with torch.no_grad():  # HF initialises the tables to zero: a trained model's bias is not
        for name, p in saved.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    saved.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    model = loaded.model
    attn = [m for m in model.modules() if type(m).__name__.endswith("SelfAttention")]
    classes = [type(m) for m in attn]
    assert (len(classes) == 2 and all("Sdpa" in c.__name__ for c in classes)) == (kind == "data2vec")
    eager = model_cls.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        want = eager(pixel_values=X, output_attentions=True).attentions
        before = model(pixel_values=X).last_hidden_state
    hooks = _hook_counts(model)
    got = _maps(model, X)
    _close(got, want)
    assert not torch.allclose(got[0], _softmax_no_bias(eager, X)[0], atol=1e-4)  # the bias is really inside
    assert [type(m) for m in attn] == classes and _hook_counts(model) == hooks  # sdpa back, hooks gone
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=X).last_hidden_state, before)
    assert loaded.info.num_heads == 4 and loaded.info.family == family and loaded.info.depth == 2


def _softmax_no_bias(eager: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q k^T / sqrt(d)) without the relative position bias, from the eager model's own query/key layers."""
    names = [("query", "key"), ("q_proj", "k_proj")]
    attn = [m for m in eager.modules() if any(isinstance(getattr(m, n, None), torch.nn.Linear) for n, _ in names)]

    def qk(args, m):
        h = args[0]
        q_name, k_name = next(p for p in names if hasattr(m, p[0]))
        q, k = (rearrange(getattr(m, n)(h), "b n (h d) -> b h n d", h=m.num_attention_heads) for n in (q_name, k_name))
        return _softmax_qk(q, k)

    return [r[0] for r in _record(eager, lambda: eager(pixel_values=x), [(m, lambda a, kw, o, m=m: qk(a, m))
                                                                          for m in attn])]


def test_data2vec_folder_through_the_command_line(tmp_path):
    import transformers as tf

    tf.Data2VecVisionModel(tf.Data2VecVisionConfig(**HF, use_relative_position_bias=True)).save_pretrained(
        tmp_path / "hf")
    res = CliRunner().invoke(main, ["similarity", str(tmp_path / "hf"), "--format", "json", *COMMON])
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout)["model"]
    assert model["architecture"] == "transformers:Data2VecVisionModel" and model["depth"] == 2


# --- 3. ViT-MAE: masking off while probing ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mae") / "hf"
    tf.ViTMAEModel(tf.ViTMAEConfig(**HF)).save_pretrained(folder)  # mask_ratio 0.75, HF's default
    return folder


def test_vit_mae_probed_unmasked_equals_hf_attentions_without_masking(mae_folder):
    loaded = load_model(mae_folder)
    model = loaded.model
    assert model.config.mask_ratio == 0.75
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    reference.config.mask_ratio = 0.0
    with torch.no_grad():  # HF's own forward, no masking: ratio 0 and increasing noise keep every patch in order
        out = reference(pixel_values=X, noise=torch.arange(16.0).expand(2, 16), output_attentions=True)
    assert out.last_hidden_state.shape[1] == 17 and bool((out.ids_restore == torch.arange(16)).all())
    first, second = _maps(model, X), _maps(model, X)
    _close(first, out.attentions)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # no randomness left
    assert model.config.mask_ratio == 0.75 and "random_masking" not in vars(model.embeddings)
    with torch.no_grad():  # restored: the model masks 75 % of the patches again
        assert model(pixel_values=X).last_hidden_state.shape[1] == 16 // 4 + 1
    assert "random masking off while probing" in loaded.info.adjustments[0]
    assert "mask_ratio 0.75 set to 0" in loaded.info.architecture_source


def test_vit_mae_two_probes_give_identical_numbers_and_say_so(mae_folder):
    runs = [probe(mae_folder, X, progress=False, device="cpu") for _ in range(2)]
    a, b = (r.attention["probs"] for r in runs)
    assert (a.similarity == b.similarity).all() and (a.cross_head == b.cross_head).all()
    res = CliRunner().invoke(main, ["similarity", str(mae_folder), *COMMON])
    assert res.exit_code == 0, res.output
    assert "random masking off while probing" in _model_line(res.stdout)


def test_vit_mae_with_mask_ratio_zero_still_keeps_the_patch_order():
    """mask_ratio 0 drops nothing but HF still shuffles the patches with fresh noise: probed in image order too."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.ViTMAEModel(tf.ViTMAEConfig(**HF, mask_ratio=0.0)).eval()
    with torch.no_grad():
        shuffled = model(pixel_values=X).ids_restore
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        want = eager(pixel_values=X, noise=torch.arange(16.0).expand(2, 16), output_attentions=True).attentions
    assert not bool((shuffled == torch.arange(16)).all())  # as saved: a random order
    _close(_maps(model, X), want)
    assert "shuffles the patches at random" in probe(model, X, progress=False).model.adjustments[0]


def test_vit_mae_pretraining_model_probes_the_encoder_only(tmp_path):
    import transformers as tf

    cfg = tf.ViTMAEConfig(**HF, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_intermediate_size=64,
                          decoder_num_attention_heads=4)
    tf.ViTMAEForPreTraining(cfg).save_pretrained(tmp_path / "hf")
    info = load_model(tmp_path / "hf").info
    assert info.depth == 2 and any("left out the pre-training decoder's 1 block" in a for a in info.adjustments)


# --- 4. vit-pytorch SimpleViT, T2TViT, CrossViT ----------------------------------------------------------------------

def _vp_maps(model: torch.nn.Module, attns: list[torch.nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q k^T * scale) recomputed from each vit-pytorch Attention's own to_qkv (or to_q / to_kv) output."""
    def qk(a, m):
        h = m.norm(a[0])
        q, k = (m.to_qkv(h).chunk(3, dim=-1)[:2] if hasattr(m, "to_qkv") else (m.to_q(h), m.to_kv(h).chunk(2, -1)[0]))
        q, k = (rearrange(t, "b n (h d) -> b h n d", h=m.heads) for t in (q, k))
        return _softmax_qk(q, k, m.scale)

    return [r[0] for r in _record(model, lambda: model(x), [(m, lambda a, kw, o, m=m: qk(a, m)) for m in attns])]


def _save(model: torch.nn.Module, path) -> None:
    torch.save(model.state_dict(), path)


def test_simple_vit_inferred_with_the_image_size_assumption_said(tmp_path):
    from vit_pytorch.simple_vit import SimpleViT

    torch.manual_seed(0)
    original = SimpleViT(image_size=224, patch_size=32, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64).eval()
    _save(original, tmp_path / "simple.pt")
    loaded = load_model(tmp_path / "simple.pt")
    info = loaded.info
    assert type(loaded.model).__name__ == "SimpleViT" and info.num_heads == 2 and "guess" in info.heads_source
    assert info.input_size == [3, 224, 224] and "image size 224 px assumed (a guess)" in info.adjustments[0]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x))
    _close(_maps(loaded.model, x), _vp_maps(original, [layer[0] for layer in original.transformer.layers], x))
    assert load_model(tmp_path / "simple.pt", num_heads=4).info.num_heads == 4  # --num-heads overrides the guess


def _t2t():
    from vit_pytorch.t2t import T2TViT

    torch.manual_seed(0)
    return T2TViT(image_size=32, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64).eval()


def test_t2t_probes_the_main_transformer_and_says_why(tmp_path):
    original = _t2t()
    _save(original, tmp_path / "t2t.pt")
    loaded = load_model(tmp_path / "t2t.pt")
    info = loaded.info
    assert type(loaded.model).__name__ == "T2TViT" and info.depth == 2 and info.num_heads == 2
    assert info.input_size == [3, 32, 32] and "strides (4, 2, 2) assumed" in info.adjustments[0]
    assert any("left out the 2 tokens-to-token block(s)" in a for a in info.adjustments)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), original(X))
    _close(_maps(loaded.model, X), _vp_maps(original, [layer[0] for layer in original.transformer.layers], X))
    result = probe(original, X, progress=False)  # in memory too: no bare ValueError from unequal token counts
    assert result.depth == 2 and "tokens-to-token" in result.model.architecture_source


def _cross_vit():
    from vit_pytorch.cross_vit import CrossViT

    torch.manual_seed(0)
    return CrossViT(image_size=32, num_classes=10, sm_dim=32, lg_dim=48, sm_patch_size=8, lg_patch_size=16,
                    sm_enc_depth=1, sm_enc_heads=1, sm_enc_mlp_dim=64, lg_enc_depth=2, lg_enc_heads=2,
                    lg_enc_mlp_dim=64, cross_attn_depth=1, cross_attn_heads=1, depth=2, dropout=0.0,
                    emb_dropout=0.0).eval()


def test_cross_vit_probes_its_deeper_branch_and_says_why(tmp_path):
    original = _cross_vit()
    _save(original, tmp_path / "cross.pt")
    loaded = load_model(tmp_path / "cross.pt")
    info = loaded.info
    assert type(loaded.model).__name__ == "CrossViT" and info.depth == 4 and info.num_heads == 2
    assert "guess" in info.heads_source and "both branches and the cross-attention" in info.heads_source
    assert "large-patch branch's 4 blocks (5 tokens" in info.adjustments[0]
    assert "small-patch branch's 2 blocks (17 tokens" in info.adjustments[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), original(X))
    large = [block[0] for layer in original.multi_scale_encoder.layers for block in layer[1].layers]
    _close(_maps(loaded.model, X), _vp_maps(original, large, X))
    result = probe(original, X, progress=False)
    assert result.depth == 4 and result.attention["probs"].similarity.shape == (4, 4)
    res = CliRunner().invoke(main, ["similarity", str(tmp_path / "cross.pt"), "--num-heads", "2", *COMMON])
    assert res.exit_code == 2 and "three head counts" in res.stderr


def test_vit_pytorch_files_through_the_command_line(tmp_path):
    _save(_t2t(), tmp_path / "t2t.pt")
    _save(_cross_vit(), tmp_path / "cross.pt")
    for name in ("t2t.pt", "cross.pt"):
        res = CliRunner().invoke(main, ["similarity", str(tmp_path / name), *COMMON])
        assert res.exit_code == 0, res.output
        assert "left out" in _model_line(res.stdout)


def test_unknown_model_with_unequal_token_counts_is_refused_in_one_line():
    """vit-pytorch PiT pools tokens between stages; no selection rule knows it: a one-line exit-5 refusal."""
    from vit_pytorch.pit import PiT

    model = PiT(image_size=32, patch_size=8, dim=32, num_classes=10, depth=(1, 1), heads=2, mlp_dim=64, dim_head=16)
    with pytest.raises(UnsupportedModelError, match=r"unequal token counts \(.*: 50 tokens, .*: 17\)") as e:
        probe(model.eval(), X, progress=False)
    assert e.value.exit_code == 5 and _hook_counts(model) == 0
