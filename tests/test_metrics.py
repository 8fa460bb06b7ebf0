"""Metrics against closed forms, invariances and a slow float64 reference written here."""
from __future__ import annotations

import math

import pytest
import torch

from collapse_probe.metrics import functional as MF
from collapse_probe.metrics.streaming import (
    CrossHeadAccumulator,
    CrossLayerAccumulator,
    FeatureAccumulator,
    RankAccumulator,
)


def random_maps(L=4, B=3, H=2, N=5, seed=0) -> torch.Tensor:
    """[L, B, H, N, N] row-stochastic maps."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, H, N, N, generator=g).mul(2).softmax(-1)


def slow_similarity(maps: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop reference in float64, straight from the paper's definition of M^{p,q}_{h,t}."""
    L, B, H, N, _ = maps.shape
    m = maps.double()
    S, R = torch.zeros(L, L, dtype=torch.float64), torch.zeros(L, L, dtype=torch.float64)
    for p in range(L):
        for q in range(L):
            vals = []
            for b in range(B):
                for h in range(H):
                    for t in range(N):
                        u, v = m[p, b, h, :, t], m[q, b, h, :, t]
                        vals.append(float(u @ v / (u.norm() * v.norm())))
            S[p, q] = sum(vals) / len(vals)
            R[p, q] = sum(x > threshold for x in vals) / len(vals)
    return S, R


def test_identical_maps_have_similarity_one():
    m = random_maps(L=1).expand(3, -1, -1, -1, -1)
    S, R = MF.cross_layer_similarity(m, threshold=0.9)
    torch.testing.assert_close(S, torch.ones(3, 3, dtype=torch.float64))
    torch.testing.assert_close(R, torch.ones(3, 3, dtype=torch.float64))


def test_uniform_attention_rank_one_and_similarity_one():
    N = 7
    u = torch.full((2, 3, N, N), 1.0 / N)
    erank, erank99 = MF.singular_value_ranks(u)
    torch.testing.assert_close(erank, torch.ones(2, 3), atol=1e-4, rtol=0)
    assert torch.equal(erank99, torch.ones(2, 3))
    S, _ = MF.cross_layer_similarity(torch.stack([u, u, u]))
    torch.testing.assert_close(S, torch.ones(3, 3, dtype=torch.float64))


def test_disjoint_one_hot_columns_give_zero():
    # block 0 attends from every query to key (i mod N), block 1 to key (i+1 mod N): every column of one map is a
    # one-hot on queries that the other map's same column never uses -> cosine 0 for every (b, h, t)
    N = 6
    a = torch.eye(N)
    b = torch.roll(torch.eye(N), 1, dims=1)
    maps = torch.stack([a, b])[:, None, None].expand(2, 2, 3, N, N)
    S, R = MF.cross_layer_similarity(maps)
    assert S[0, 1] == 0 and S[1, 0] == 0 and R[0, 1] == 0
    assert S[0, 0] == pytest.approx(1.0)


def test_identity_map_full_rank():
    N = 9
    erank, erank99 = MF.singular_value_ranks(torch.eye(N)[None])
    assert erank.item() == pytest.approx(N, rel=1e-5)
    assert erank99.item() == N


def test_energy_rank_of_rank_two_matrix():
    # two orthogonal row patterns with equal energy: 2 singular values needed for 99 % energy, 1 for 50 %
    N = 6
    m = torch.zeros(N, N)
    m[: N // 2, 0] = 1
    m[N // 2:, 1] = 1
    assert MF.singular_value_ranks(m[None])[1].item() == 2
    assert MF.singular_value_ranks(m[None], energy=0.5)[1].item() == 1


def test_parity_with_float64_reference():
    maps = random_maps()
    S, R = MF.cross_layer_similarity(maps, threshold=0.8)
    S_ref, R_ref = slow_similarity(maps, 0.8)
    torch.testing.assert_close(S, S_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(R, R_ref)


def test_head_permutation_invariance():
    maps = random_maps(H=4)
    perm = torch.tensor([2, 0, 3, 1])
    S1, R1 = MF.cross_layer_similarity(maps)
    S2, R2 = MF.cross_layer_similarity(maps[:, :, perm])
    torch.testing.assert_close(S1, S2)
    torch.testing.assert_close(R1, R2)
    # cross-head similarity is a mean over head pairs: also invariant
    assert MF.cross_head_similarity(maps[0]) == pytest.approx(MF.cross_head_similarity(maps[0, :, perm]))


def test_cross_head_similarity_closed_forms():
    m = random_maps(L=1, H=1)[0]
    assert MF.cross_head_similarity(m.expand(-1, 4, -1, -1)) == pytest.approx(1.0)
    N = 5
    heads = torch.stack([torch.eye(N), torch.roll(torch.eye(N), 1, dims=1)])[None]
    assert MF.cross_head_similarity(heads) == 0.0


def test_neighbor_similarity_and_similar_blocks():
    sim = torch.tensor([[1.0, 0.5, 0.2, 0.1],
                        [0.5, 1.0, 0.95, 0.3],
                        [0.2, 0.95, 1.0, 0.97],
                        [0.1, 0.3, 0.97, 1.0]], dtype=torch.float64)
    nb1 = MF.neighbor_similarity(sim, 1)
    assert math.isnan(nb1[0]) and nb1[1:].tolist() == [0.5, 0.95, 0.97]
    nb2 = MF.neighbor_similarity(sim, 2)
    assert nb2[2] == pytest.approx((0.95 + 0.2) / 2) and nb2[3] == pytest.approx((0.97 + 0.3) / 2)
    assert MF.similar_indices(sim, 0.9, k=1) == [2, 3] and MF.similar_blocks(sim, 0.9, k=1) == [3, 4]  # 0- / 1-based
    assert MF.similar_blocks(sim, 0.9, k=2) == []


@pytest.mark.parametrize("split", [[6], [1, 5], [2, 2, 2], [4, 1, 1]])
def test_streaming_equals_one_batch(split):
    maps = random_maps(L=5, B=6, H=3, N=6, seed=3)
    feats = torch.randn(5, 6, 6, 8, generator=torch.Generator().manual_seed(4))
    S_ref, R_ref = MF.cross_layer_similarity(maps, threshold=0.85)
    cl, ch = CrossLayerAccumulator(5, 0.85), CrossHeadAccumulator(5, 3)
    rk, ft = RankAccumulator(5), FeatureAccumulator(5)
    start = 0
    for n in split:
        for blk in reversed(range(5)):  # order of blocks within a batch does not matter
            part = maps[blk, start:start + n]
            cl.add(blk, part)
            ch.add(blk, part)
            rk.add(blk, part)
            ft.add(blk, feats[blk, start:start + n])
        cl.end_batch()
        ft.end_batch()
        start += n
    torch.testing.assert_close(cl.similarity(), S_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(cl.ratio(), R_ref)
    for blk in range(5):
        assert ch.mean()[blk].item() == pytest.approx(MF.cross_head_similarity(maps[blk]), abs=1e-6)
        er, en = MF.singular_value_ranks(maps[blk])
        assert rk.effective_rank()[blk].item() == pytest.approx(er.double().mean().item(), rel=1e-5)
        assert rk.energy_rank()[blk].item() == pytest.approx(en.double().mean().item())
    torch.testing.assert_close(ft.similarity(), MF.token_feature_similarity(feats), atol=1e-6, rtol=0)


def test_merge_equals_single_accumulator():
    maps = random_maps(L=3, B=4)
    a, b, whole = CrossLayerAccumulator(3), CrossLayerAccumulator(3), CrossLayerAccumulator(3)
    for blk in range(3):
        a.add(blk, maps[blk, :1])
        b.add(blk, maps[blk, 1:])
        whole.add(blk, maps[blk])
    for acc in (a, b, whole):
        acc.end_batch()
    a.merge(b)
    torch.testing.assert_close(a.similarity(), whole.similarity())


def test_half_precision_storage_error_is_small():
    maps = random_maps(L=4, B=4, H=3, N=16, seed=7)
    exact, half = CrossLayerAccumulator(4), CrossLayerAccumulator(4, storage_dtype=torch.float16)
    for blk in range(4):
        exact.add(blk, maps[blk])
        half.add(blk, maps[blk])
    exact.end_batch()
    half.end_batch()
    # unit vectors rounded to fp16 (rel. error 2^-11 per entry): the cosine moves by at most ~2 * 2^-11 * sqrt(N)
    assert (exact.similarity() - half.similarity()).abs().max() < 2 * 2**-11 * 4


def test_accumulator_memory_is_bounded_by_batch():
    acc = CrossLayerAccumulator(3)
    for _ in range(3):
        for blk in range(3):
            acc.add(blk, random_maps(L=1, B=2)[0])
        assert acc._buf.numel() == 2 * 2 * 5 * 3 * 5  # B*H*N rows x L x N, whatever the batches seen so far
        acc.end_batch()
        assert acc._buf is None


def test_token_feature_similarity_closed_form():
    x = torch.randn(1, 2, 3, 4)
    feats = torch.cat([x, 2 * x, -x])  # same direction, scaled, opposite
    S = MF.token_feature_similarity(feats)
    torch.testing.assert_close(S[0, 1], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(S[0, 2], torch.tensor(-1.0, dtype=torch.float64))


def test_residual_norm_ratio_zero_for_rank_one_tokens():
    tokens = torch.randn(1, 1, 8).expand(2, 5, 8)
    assert MF.residual_norm_ratio(tokens).abs().max() < 1e-6
    assert MF.residual_norm_ratio(torch.randn(2, 5, 8)).min() > 0.1
