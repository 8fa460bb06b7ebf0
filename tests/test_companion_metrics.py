"""Companion per-block metrics against float64 references written here from their formulas, closed forms, batch-split
invariance, exclusion of non-finite images, per-image rows and the JSON round trip."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import timm
import torch

import collapse_probe.models  # noqa: F401  (registers our models with timm)
from collapse_probe.hooks.capture import Site
from collapse_probe.metrics.cka import CkaAccumulator
from collapse_probe.metrics.columns import ColumnAccumulator
from collapse_probe.metrics.distance import DistanceAccumulator, patch_grid
from collapse_probe.metrics.rows import RowAccumulator
from collapse_probe.metrics.streaming import CrossLayerAccumulator, FeatureAccumulator
from collapse_probe.probing.collector import CollapseCollector
from collapse_probe.probing.result import AttentionStats, FeatureStats, ProbeResult
from collapse_probe.probing.run import probe

F64 = torch.float64


def softmax_maps(L=4, B=3, H=3, N=7, scale=2.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, H, N, N, generator=g).mul(scale).softmax(-1)


def feed(acc, maps: torch.Tensor, split=None):
    """Feed [L, B, ...] block by block (in reverse: order must not matter), in batches of ``split`` images."""
    split = split or [maps.shape[1]]
    start = 0
    for n in split:
        for blk in reversed(range(maps.shape[0])):
            acc.add(blk, maps[blk, start:start + n])
        acc.end_batch()
        start += n
    return acc


# ------------------------------------------------------------------------------------------- float64 references


def ref_columns(maps: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Column statistics straight from the formulas, float64. Returns per-image [B, L, L] / [B, L] means."""
    m = maps.double()
    L, B, H, N, _ = m.shape
    cols = m.transpose(-1, -2)  # [L, B, H, t, i]: column t over the queries i
    norm, mu = cols.norm(dim=-1), cols.mean(-1)
    cos = torch.einsum("pbhti,qbhti->bpqht", cols / norm[..., None], cols / norm[..., None])
    floor = N * torch.einsum("pbht,qbht->bpqht", mu / norm, mu / norm)
    cen = cols - mu[..., None]
    cen = cen / cen.norm(dim=-1, keepdim=True)
    pear = torch.einsum("pbhti,qbhti->bpqht", cen, cen)
    hh = torch.einsum("pbgti,qbhti->pqgh", cols / norm[..., None], cols / norm[..., None]) / (B * N)
    heads = torch.einsum("lbgti,lbhti->blgh", cols / norm[..., None], cols / norm[..., None]) / N  # per image
    off = (heads.sum((-1, -2)) - heads.diagonal(dim1=-2, dim2=-1).sum(-1)) / (H * (H - 1))
    resid = torch.zeros(B, L, dtype=F64)
    for lb in range(L):
        for b in range(B):
            for h in range(H):
                a = m[lb, b, h]
                resid[b, lb] += (a - a.mean(0, keepdim=True)).norm() / a.norm() / H
    return {"similarity": cos.mean((-1, -2)), "ratio": (cos > threshold).double().mean((-1, -2)),
            "floor": floor.mean((-1, -2)), "pearson": pear.mean((-1, -2)), "hh": hh, "cross_head": off,
            "rank1_residual": resid}


def ref_matched(hh: torch.Tensor) -> torch.Tensor:
    """Best head matching by brute force over every permutation (independent of scipy's assignment solver)."""
    L, _, H, _ = hh.shape
    out = torch.zeros(L, L, dtype=F64)
    for p, q in itertools.product(range(L), range(L)):
        out[p, q] = max(float(np.mean([hh[p, q, g, perm[g]] for g in range(H)]))
                        for perm in itertools.permutations(range(H)))
    return out


def ref_rows(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    m = maps.double()
    L, B, H, N, _ = m.shape
    entropy = -torch.xlogy(m, m).sum(-1) / math.log(N)  # [L, B, H, i]
    tv = 0.5 * (m - 1.0 / N).abs().sum(-1)
    unit = m / m.norm(dim=-1, keepdim=True)
    rowcos = torch.einsum("pbhij,qbhij->pq", unit, unit) / (B * H * N)
    jsd = torch.full((L,), math.nan, dtype=F64)
    for lb in range(1, L):
        p, q = m[lb], m[lb - 1]
        mid = (p + q) / 2
        kl_p = (torch.xlogy(p, p) - torch.xlogy(p, mid)).sum(-1)
        kl_q = (torch.xlogy(q, q) - torch.xlogy(q, mid)).sum(-1)
        jsd[lb] = (0.5 * kl_p + 0.5 * kl_q).mean()
    return {"entropy": entropy.mean((2, 3)).T, "tv_uniform": tv.mean((2, 3)).T, "row_cosine": rowcos, "jsd": jsd}


def ref_distance(maps: torch.Tensor, prefix: int) -> torch.Tensor:
    """[L, H] mean over images and patch queries of sum_j A_ij d(i, j), with explicit grid coordinates."""
    m = maps.double()
    N = m.shape[-1]
    g = math.isqrt(N - prefix)
    pos = [(k // g, k % g) for k in range(g * g)]
    d = torch.tensor([[math.dist(a, b) for b in pos] for a in pos], dtype=F64)
    return (m[..., prefix:, prefix:] * d).sum(-1).mean(-1).mean(1)


def ref_uniformity(feats: torch.Tensor) -> torch.Tensor:
    """[L, B, N, C] -> [B, L] mean cosine over pairs of different tokens, by explicit pairs."""
    f = feats.double()
    L, B, N, _ = f.shape
    out = torch.zeros(B, L, dtype=F64)
    for lb, b in itertools.product(range(L), range(B)):
        x = f[lb, b]
        out[b, lb] = np.mean([float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
                              for i in range(N) for j in range(N) if i != j])
    return out


def ref_cka(feats: torch.Tensor) -> torch.Tensor:
    """Kornblith et al.'s linear CKA via the centring matrix H: HSIC(K, L) = tr(K H L H), per image, averaged."""
    f = feats.double()
    L, B, N, _ = f.shape
    Hc = torch.eye(N, dtype=F64) - 1.0 / N
    out = torch.zeros(L, L, dtype=F64)
    for b in range(B):
        K = [f[lb, b] @ f[lb, b].T for lb in range(L)]
        hsic = torch.tensor([[float(torch.trace(K[p] @ Hc @ K[q] @ Hc)) for q in range(L)] for p in range(L)])
        out += hsic / torch.outer(hsic.diagonal(), hsic.diagonal()).sqrt() / B
    return out


# ------------------------------------------------------------------------------------------------------ parity


def test_column_metrics_equal_float64_reference():
    maps = softmax_maps()
    acc = feed(ColumnAccumulator(4, 3, threshold=0.8), maps)
    ref = ref_columns(maps, 0.8)
    close = {"atol": 1e-6, "rtol": 0}
    torch.testing.assert_close(acc.similarity(), ref["similarity"].mean(0), **close)
    torch.testing.assert_close(acc.ratio(), ref["ratio"].mean(0), **close)
    torch.testing.assert_close(acc.floor(), ref["floor"].mean(0), **close)
    torch.testing.assert_close(acc.pearson(), ref["pearson"].mean(0), **close)
    torch.testing.assert_close(acc.head_matrices(), ref["hh"], **close)
    torch.testing.assert_close(acc.matched(), ref_matched(ref["hh"]), **close)
    torch.testing.assert_close(acc.cross_head(), ref["cross_head"].mean(0), **close)
    torch.testing.assert_close(acc.rank1_residual(), ref["rank1_residual"].mean(0), **close)
    rows = acc.per_image()
    for name in ("similarity", "ratio", "cross_head", "rank1_residual"):
        torch.testing.assert_close(rows[name].double(), ref[name], atol=1e-6, rtol=0, msg=name)
    prev = rows["pearson_prev"].double()
    assert torch.isnan(prev[:, 0]).all()
    torch.testing.assert_close(prev[:, 1:], ref["pearson"].diagonal(offset=-1, dim1=1, dim2=2), atol=1e-6, rtol=0)
    # each image weighs the same: the mean of the per-image rows is the per-block mean
    torch.testing.assert_close(rows["similarity"].double().mean(0), acc.similarity(), atol=1e-6, rtol=0)


def test_column_metrics_of_mixed_maps_equal_reference():
    """Maps after Re-attention's Theta and Norm: negative entries, rows not summing to 1; same formulas apply."""
    maps = torch.randn(3, 2, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    acc = feed(ColumnAccumulator(3, 2), maps)
    ref = ref_columns(maps, 0.9)
    for got, name in ((acc.similarity(), "similarity"), (acc.floor(), "floor"), (acc.pearson(), "pearson"),
                      (acc.rank1_residual(), "rank1_residual")):
        torch.testing.assert_close(got, ref[name].mean(0), atol=1e-6, rtol=0, msg=name)
    rows = feed(RowAccumulator(3, distributions=False), maps)
    torch.testing.assert_close(rows.row_cosine(), ref_rows(maps)["row_cosine"], atol=1e-6, rtol=0)
    assert torch.isnan(rows.entropy()).all() and torch.isnan(rows.tv_uniform()).all()
    assert torch.isnan(rows.jsd_prev()).all() and torch.isnan(rows.per_image()["entropy"]).all()


def test_row_metrics_equal_float64_reference():
    maps = softmax_maps(scale=3.0)
    maps[1, 0, 0, 2, :3] = 0  # exact zeros (underflowed softmax entries) contribute 0 log 0 = 0
    maps[1, 0, 0, 2] /= maps[1, 0, 0, 2].sum()
    acc = feed(RowAccumulator(4), maps)
    ref = ref_rows(maps)
    torch.testing.assert_close(acc.entropy(), ref["entropy"].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(acc.tv_uniform(), ref["tv_uniform"].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(acc.row_cosine(), ref["row_cosine"], atol=1e-6, rtol=0)
    torch.testing.assert_close(acc.jsd_prev(), ref["jsd"], atol=1e-6, rtol=0, equal_nan=True)
    rows = acc.per_image()
    torch.testing.assert_close(rows["entropy"].double(), ref["entropy"], atol=1e-6, rtol=0)
    torch.testing.assert_close(rows["tv_uniform"].double(), ref["tv_uniform"], atol=1e-6, rtol=0)


def test_pearson_parity_on_near_uniform_maps():
    """Maps within ~1e-3 of uniform (a random-init ViT's): cosine and floor agree to ~1e-6, so their float32
    difference is noise; the centred Gram keeps Pearson at float64 accuracy."""
    maps = softmax_maps(L=3, B=2, H=2, N=50, scale=1e-3, seed=2)
    acc = feed(ColumnAccumulator(3, 2), maps)
    ref = ref_columns(maps, 0.9)
    assert (ref["similarity"].mean(0) - ref["floor"].mean(0)).abs().max() < 1e-5  # the regime that needs care
    torch.testing.assert_close(acc.pearson(), ref["pearson"].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(acc.floor(), ref["floor"].mean(0), atol=1e-6, rtol=0)
    # the uncentred route, (cos - floor) / sqrt((1 - floor_pp)(1 - floor_qq)) from float32 unit columns, is far off
    cols = maps.transpose(-1, -2) / maps.transpose(-1, -2).norm(dim=-1, keepdim=True)
    a = cols.mean(-1) * math.sqrt(50)
    cos = torch.einsum("pbhti,qbhti->pqbht", cols, cols)
    naive = (cos - a[:, None] * a[None]) / ((1 - a**2)[:, None] * (1 - a**2)[None]).clamp_min(1e-30).sqrt()
    naive_err = (naive.double().mean((2, 3, 4)) - ref["pearson"].mean(0)).abs().max()
    ours_err = (acc.pearson() - ref["pearson"].mean(0)).abs().max()
    assert naive_err > 100 * ours_err


def test_feature_metrics_equal_float64_reference():
    feats = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(3))
    fa, ck = FeatureAccumulator(3), CkaAccumulator(3)
    for blk in range(3):
        fa.add(blk, feats[blk])
        ck.add(blk, feats[blk])
    fa.end_batch()
    ck.end_batch()
    unif = ref_uniformity(feats)
    torch.testing.assert_close(fa.token_uniformity(), unif.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(fa.per_image()["token_uniformity"].double(), unif, atol=1e-6, rtol=0)
    torch.testing.assert_close(ck.cka(), ref_cka(feats), atol=1e-6, rtol=0)


def test_attention_distance_equals_reference_and_grid_rules():
    maps = softmax_maps(L=2, B=2, H=2, N=1 + 64, scale=3.0)
    acc = feed(DistanceAccumulator(2, 2, prefix_tokens=1), maps)
    assert acc.note is None
    torch.testing.assert_close(acc.heads(), ref_distance(maps, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(acc.mean(), ref_distance(maps, 1).mean(1), atol=1e-5, rtol=0)
    assert patch_grid(1 + 16, 1) == (None, "patch grid 4x4 is under 8x8")
    assert patch_grid(2 + 100, 2) == (10, None)
    assert "not a square patch grid" in patch_grid(66, 1)[1]
    assert "unknown" in patch_grid(65, None)[1]
    small = feed(DistanceAccumulator(2, 2, prefix_tokens=1), softmax_maps(L=2, B=1, H=2, N=17))
    assert small.note == "patch grid 4x4 is under 8x8"


# ------------------------------------------------------------------------------------------------ closed forms


def test_uniform_maps_closed_forms():
    N = 9
    u = torch.full((3, 2, 2, N, N), 1.0 / N)
    col, row = feed(ColumnAccumulator(3, 2), u), feed(RowAccumulator(3), u)
    ones, close = torch.ones(3, 3, dtype=F64), {"atol": 1e-6, "rtol": 0}
    torch.testing.assert_close(col.similarity(), ones, **close)
    torch.testing.assert_close(col.floor(), ones, **close)
    torch.testing.assert_close(col.matched(), ones, **close)
    assert torch.equal(col.pearson(), torch.zeros(3, 3, dtype=F64))  # constant columns: no direction
    assert col.rank1_residual().abs().max() < 1e-6
    torch.testing.assert_close(row.entropy(), torch.ones(3, dtype=F64), **close)
    assert row.tv_uniform().abs().max() < 1e-6
    torch.testing.assert_close(row.row_cosine(), ones, **close)
    assert row.jsd_prev()[1:].abs().max() < 1e-6


def test_identical_rows_on_disjoint_keys():
    """Every query of block 0 attends to the first half of the keys, every query of block 1 to the second half (with
    a 1e-4 leak so no column is exactly zero): all columns are constant, so the column cosine is 1.000, exactly its
    floor; the rows that actually differ show it: row cosine ~0 and JSD ~log 2."""
    N, leak = 8, 1e-4
    first = torch.cat([torch.full((N // 2,), (1 - leak) / (N // 2)), torch.full((N // 2,), leak / (N // 2))])
    maps = torch.stack([first, first.flip(0)])[:, None, None, None, :].expand(2, 2, 2, N, N).contiguous()
    col, row = feed(ColumnAccumulator(2, 2), maps), feed(RowAccumulator(2), maps)
    assert col.similarity()[1, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert col.floor()[1, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert abs(col.pearson()[1, 0].item()) < 1e-6
    assert row.row_cosine()[1, 0].item() < 1e-3
    assert row.jsd_prev()[1].item() == pytest.approx(math.log(2), abs=2e-3)


def test_permuted_heads_matched_one_same_head_low():
    maps = softmax_maps(L=1, B=2, H=4, N=12, scale=6.0, seed=4)
    perm = torch.tensor([2, 0, 3, 1])
    acc = feed(ColumnAccumulator(2, 4), torch.cat([maps, maps[:, :, perm]]))
    assert acc.matched()[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert acc.similarity()[0, 1].item() < 0.6


def test_fixed_key_offset_gives_that_distance():
    """Each patch query attends to the key 3 columns and 4 rows away (whichever direction stays in the 8x8 grid):
    distance 5 for every query, head and block."""
    g, prefix = 8, 1
    N = prefix + g * g
    a = torch.zeros(N, N)
    a[:prefix, 0] = 1
    for r, c in itertools.product(range(g), range(g)):
        r2, c2 = (r + 4 if r + 4 < g else r - 4), (c + 3 if c + 3 < g else c - 3)
        a[prefix + r * g + c, prefix + r2 * g + c2] = 1
    acc = feed(DistanceAccumulator(2, 3, prefix_tokens=prefix), a.expand(2, 2, 3, N, N))
    torch.testing.assert_close(acc.heads(), torch.full((2, 3), 5.0, dtype=F64))


def test_token_uniformity_and_cka_closed_forms():
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    rot = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))[0]
    feats = torch.stack([x, 3 * x @ rot + 1.5, torch.randn(1, 1, 5).expand(2, 6, 5)])
    fa, ck = FeatureAccumulator(3), CkaAccumulator(3)
    for blk in range(3):
        fa.add(blk, feats[blk])
        ck.add(blk, feats[blk])
    fa.end_batch()
    ck.end_batch()
    assert fa.token_uniformity()[2].item() == pytest.approx(1.0, abs=1e-6)  # identical tokens
    assert ck.cka()[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # rotated, scaled, shifted copy
    assert torch.isnan(ck.cka()[2, 0])  # identical tokens: no centred geometry, CKA undefined


def test_half_storage_moves_columns_within_bound():
    maps = softmax_maps(L=3, B=2, H=2, N=16, seed=6)
    exact, half = feed(ColumnAccumulator(3, 2), maps), feed(ColumnAccumulator(3, 2, storage_dtype=torch.float16), maps)
    # z rounded to float16 (relative error u = 2^-11 per entry): cosine and excess move by at most ~2u
    assert (exact.similarity() - half.similarity()).abs().max() < 2 * 2**-11 + 1e-6
    assert (exact.pearson() - half.pearson()).abs().max() < 4 * 2**-11


# ------------------------------------------------------------------------------ collector: batches, NaN, merge


L3, H2, N65, C = 3, 2, 65, 8
SITES = [Site(f"blocks.{b}.attn.{k}", k, b) for b in range(L3) for k in ("probs", "mixed")] + \
    [Site(f"blocks.{b}.out", "out", b) for b in range(L3)]


def synthetic(B=6, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"probs": torch.randn(L3, B, H2, N65, N65, generator=g).mul(3).softmax(-1),
            "mixed": torch.randn(L3, B, H2, N65, N65, generator=g),
            "out": torch.randn(L3, B, N65, C, generator=g)}


def collect(data: dict[str, torch.Tensor], split: list[int]) -> ProbeResult:
    col = CollapseCollector(SITES, threshold=0.5, rank_images=0, num_heads=H2, prefix_tokens=1)
    start = 0
    for n in split:
        for s in SITES:
            col(s, data[s.kind][s.block, start:start + n])
        col.end_batch()
        start += n
    return col.result()


COMPANIONS = ("entropy", "tv_uniform", "cosine_floor", "pearson", "row_cosine", "row_jsd_prev", "matched",
              "rank1_residual", "similarity", "ratio", "cross_head")


def assert_results_close(a: ProbeResult, b: ProbeResult, atol: float = 1e-6) -> None:
    for kind in ("probs", "mixed"):
        sa, sb = a.attention[kind], b.attention[kind]
        for name in COMPANIONS:
            np.testing.assert_allclose(getattr(sa, name), getattr(sb, name), atol=atol, rtol=0, err_msg=name)
        assert sa.per_image.keys() == sb.per_image.keys()
        for name in sa.per_image:
            np.testing.assert_allclose(sa.per_image[name], sb.per_image[name], atol=atol, rtol=0, err_msg=name)
    if a.attention["probs"].attention_distance is not None:
        np.testing.assert_allclose(a.attention["probs"].attention_distance_heads,
                                   b.attention["probs"].attention_distance_heads, atol=atol, rtol=0)
    for name in ("token_uniformity", "cka", "residual"):
        np.testing.assert_allclose(getattr(a.features, name), getattr(b.features, name), atol=atol, rtol=0)
    for name in a.features.per_image:
        np.testing.assert_allclose(a.features.per_image[name], b.features.per_image[name], atol=atol, rtol=0)


def test_batch_split_invariance():
    data = synthetic()
    one, three = collect(data, [6]), collect(data, [3, 1, 2])
    assert_results_close(one, three)
    st = one.attention["probs"]
    assert st.per_image["similarity"].shape == (6, L3, L3) and st.per_image["entropy"].shape == (6, L3)
    assert st.attention_distance.shape == (L3,) and st.attention_distance_heads.shape == (L3, H2)
    mixed = one.attention["mixed"]
    assert np.isnan(mixed.entropy).all() and np.isnan(mixed.row_jsd_prev).all()
    assert mixed.attention_distance is None and "not row-stochastic" in mixed.distance_note
    assert not np.isnan(mixed.pearson).any() and not np.isnan(mixed.rank1_residual).any()
    assert one.features.per_image["token_uniformity"].shape == (6, L3)


def test_nonfinite_image_excluded_from_its_blocks_only():
    data = synthetic()
    poisoned = {k: v.clone() for k, v in data.items()}
    poisoned["probs"][2, 1, 0, 3, 3] = math.nan  # image 1, block 2
    bad, clean = collect(poisoned, [4, 2]), collect(data, [6])
    keep = [0, 2, 3, 4, 5]
    without = collect({k: v[:, keep] for k, v in data.items()}, [5])
    got, full, sub = bad.attention["probs"], clean.attention["probs"], without.attention["probs"]
    for name in ("similarity", "cosine_floor", "pearson", "row_cosine", "matched"):  # pairs with block 2: 5 images
        m = getattr(got, name)
        np.testing.assert_allclose(m[2], getattr(sub, name)[2], atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_allclose(m[:2, :2], getattr(full, name)[:2, :2], atol=1e-6, rtol=0, err_msg=name)
    for name in ("entropy", "tv_uniform", "rank1_residual", "cross_head"):
        v = getattr(got, name)
        assert v[2] == pytest.approx(getattr(sub, name)[2], abs=1e-6)
        np.testing.assert_allclose(v[:2], getattr(full, name)[:2], atol=1e-6, rtol=0, err_msg=name)
    assert got.row_jsd_prev[2] == pytest.approx(sub.row_jsd_prev[2], abs=1e-6)
    np.testing.assert_allclose(got.attention_distance[2], sub.attention_distance[2], atol=1e-6)
    rows = got.per_image
    assert np.isnan(rows["similarity"][1, 2]).all() and np.isnan(rows["similarity"][1, :, 2]).all()
    assert np.isnan(rows["entropy"][1, 2]) and not np.isnan(rows["entropy"][1, :2]).any()
    np.testing.assert_allclose(rows["similarity"][keep], full.per_image["similarity"][keep], atol=1e-6)
    assert [f["name"] for f in bad.findings] == ["blocks.2.attn.probs"]


def test_merge_adds_sums_and_concatenates_images():
    maps = softmax_maps(L=3, B=5, H=2, N=6)
    whole = feed(ColumnAccumulator(3, 2), maps)
    a, b = feed(ColumnAccumulator(3, 2), maps[:, :2]), feed(ColumnAccumulator(3, 2), maps[:, 2:])
    a.merge(b)
    torch.testing.assert_close(a.similarity(), whole.similarity())
    torch.testing.assert_close(a.matched(), whole.matched())
    torch.testing.assert_close(a.per_image()["similarity"], whole.per_image()["similarity"], atol=1e-6, rtol=0)
    r, r1, r2 = (feed(RowAccumulator(3), m) for m in (maps, maps[:, :3], maps[:, 3:]))
    r1.merge(r2)
    torch.testing.assert_close(r1.jsd_prev(), r.jsd_prev(), equal_nan=True)
    torch.testing.assert_close(r1.per_image()["entropy"], r.per_image()["entropy"])


def test_column_accumulator_same_similarity_as_cross_layer_accumulator():
    maps = softmax_maps(L=3, B=2, H=2, N=10, seed=9)
    new, old = feed(ColumnAccumulator(3, 2, threshold=0.7), maps), feed(CrossLayerAccumulator(3, 0.7), maps)
    torch.testing.assert_close(new.similarity(), old.similarity(), atol=1e-6, rtol=0)
    torch.testing.assert_close(new.ratio(), old.ratio())


# ------------------------------------------------------------------------------------------- probe end to end


@pytest.fixture(scope="module")
def probed() -> ProbeResult:
    torch.manual_seed(0)
    model = timm.create_model("deepvit_micro", depth=3).eval()  # 32 px, patch 4: 8x8 grid + class token
    return probe(model, torch.randn(5, 3, 32, 32), batch_size=2, progress=False)


def test_probe_fills_companion_fields(probed):
    st = probed.attention["probs"]
    assert st.distance_note is None and st.attention_distance_heads.shape == (3, 4)
    assert 0 < st.attention_distance.min() and st.attention_distance.max() < 8 * math.sqrt(2)
    assert st.per_image["ratio"].shape == (5, 3, 3) and st.per_image["pearson_prev"].shape == (5, 3)
    np.testing.assert_allclose(np.nanmean(st.per_image["similarity"], 0), st.similarity, atol=1e-6)
    np.testing.assert_allclose(np.nanmean(st.per_image["entropy"], 0), st.entropy, atol=1e-6)
    assert np.isnan(st.row_jsd_prev[0]) and not np.isnan(st.row_jsd_prev[1:]).any()
    assert probed.features.cka.shape == (3, 3) and probed.features.per_image["residual"].shape == (5, 3)
    assert np.isnan(probed.attention["mixed"].tv_uniform).all()


def test_json_round_trip_and_old_json(probed):
    back = ProbeResult.from_json(probed.to_json())
    for kind, st in probed.attention.items():
        for name in COMPANIONS:
            np.testing.assert_allclose(getattr(back.attention[kind], name), getattr(st, name), err_msg=name)
        for name, rows in st.per_image.items():  # 6 significant digits
            np.testing.assert_allclose(back.attention[kind].per_image[name], rows, rtol=1e-5, atol=1e-12)
        assert back.attention[kind].distance_note == st.distance_note
    np.testing.assert_allclose(back.attention["probs"].attention_distance, probed.attention["probs"].attention_distance)
    np.testing.assert_allclose(back.features.cka, probed.features.cka)
    d = probed.to_dict()
    for st in d["attention"].values():  # a result written before the companion metrics existed
        for k in (*COMPANIONS[:8], "attention_distance", "attention_distance_heads", "distance_note", "per_image"):
            st.pop(k)
    for k in ("token_uniformity", "cka", "per_image"):
        d["features"].pop(k)
    old = ProbeResult.from_dict(d)
    st = old.attention["probs"]
    assert st.entropy.shape == (3,) and np.isnan(st.entropy).all() and np.isnan(st.matched).all()
    assert st.attention_distance is None and st.distance_note and st.per_image == {}
    assert np.isnan(old.features.cka).all() and old.features.token_uniformity.shape == (3,)
    hand = AttentionStats("probs", [0, 1], ["a", "b"], 0.9, np.eye(2), np.eye(2), np.zeros((2, 2, 2)), np.zeros(2),
                          np.ones(2), np.ones(2))
    assert hand.pearson.shape == (2, 2) and np.isnan(hand.row_jsd_prev).all()
    assert FeatureStats([0], ["x"], np.eye(1), np.zeros(1)).cka.shape == (1, 1)
