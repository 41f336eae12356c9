"""Weighted PageRank, the variance head filter and RMS aggregation: known answers and a loop reference."""
import math

import pytest
import torch

from tokenreduce.ops.pagerank import (aggregate_heads, head_filter_mask, head_variance, initial_scores,
                                      pagerank_step, rms_aggregate, subgraph, weighted_pagerank, wpr_importance)

from ..methods._pruning_reference import ref_importance, ref_subgraph, ref_wpr

D = torch.float64


def random_attention(b, h, n, sharpness=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(b, h, n, n, generator=g, dtype=D)).softmax(dim=-1)


def test_converges_to_stationary_distribution_by_hand():
    # A birth-death chain: pi = (1/4, 1/2, 1/4) solves pi = pi P (detailed balance).
    p = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]], dtype=D)
    s = weighted_pagerank(p[None, None], 200, initial_scores(3, math.sqrt(3), dtype=D))
    torch.testing.assert_close(s[0, 0], torch.tensor([0.25, 0.5, 0.25], dtype=D), atol=1e-12, rtol=0)


def test_converges_to_stationary_distribution_random():
    p = random_attention(1, 1, 6, sharpness=1.0)[0, 0]
    vals, vecs = torch.linalg.eig(p.T)
    pi = vecs[:, vals.real.argmax()].real
    pi = pi / pi.sum()
    s = weighted_pagerank(p[None, None], 500)
    torch.testing.assert_close(s[0, 0], pi, atol=1e-10, rtol=0)


def test_one_step_votes_by_hand():
    # Token j gives A[j, i] of its score to token i.
    a = torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=D)
    s0 = torch.tensor([0.75, 0.25], dtype=D)
    s1 = pagerank_step(a[None, None], s0[None, None])
    expected = torch.tensor([0.75 * 0.2 + 0.25 * 0.6, 0.75 * 0.8 + 0.25 * 0.4], dtype=D)
    torch.testing.assert_close(s1[0, 0], expected, atol=1e-15, rtol=0)


def test_initial_scores():
    torch.testing.assert_close(initial_scores(4, math.sqrt(4), dtype=D), torch.tensor([2, 1, 1, 1], dtype=D) / 5)
    torch.testing.assert_close(initial_scores(4, None, dtype=D), torch.full((4,), 0.25, dtype=D))


def test_mass_is_preserved_per_head():
    a = random_attention(2, 3, 9)
    s = weighted_pagerank(a, 30, initial_scores(9, 3.0, dtype=D))
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 3, dtype=D), atol=1e-12, rtol=0)


def test_head_variance_filter_and_rms_by_hand():
    n = 4
    uniform = [0.25, 0.25, 0.25, 0.25]           # N·s = 1,1,1,1           var 0     -> below the band
    moderate = [0.35, 0.15, 0.25, 0.25]          # N·s = 1.4,.6,1,1        var 0.08  -> kept
    peaked = [0.7, 0.1, 0.1, 0.1]                # N·s = 2.8,.4,.4,.4      var 1.08  -> above the band
    s = torch.tensor([[uniform, moderate, peaked]], dtype=D)
    torch.testing.assert_close(head_variance(s), torch.tensor([[0.0, 0.08, 1.08]], dtype=D), atol=1e-12, rtol=0)
    mask = head_filter_mask(s, 0.01, 0.7)
    assert mask.tolist() == [[False, True, False]]
    torch.testing.assert_close(aggregate_heads(s, (0.01, 0.7)), torch.tensor([moderate], dtype=D))
    assert n == s.shape[-1]


def test_head_filter_falls_back_to_all_heads():
    s = torch.tensor([[[0.25] * 4, [0.7, 0.1, 0.1, 0.1]]], dtype=D)  # variances 0 and 1.08: none in band
    assert head_filter_mask(s, 0.01, 0.7).tolist() == [[True, True]]
    expected = torch.tensor([[math.sqrt((0.25 ** 2 + 0.7 ** 2) / 2)] + [math.sqrt((0.25 ** 2 + 0.1 ** 2) / 2)] * 3],
                            dtype=D)
    torch.testing.assert_close(aggregate_heads(s, (0.01, 0.7)), expected)
    torch.testing.assert_close(aggregate_heads(s, None), expected)


def test_filter_is_per_sample():
    a = [[0.25] * 4, [0.35, 0.15, 0.25, 0.25]]
    b = [[0.35, 0.15, 0.25, 0.25], [0.25] * 4]
    assert head_filter_mask(torch.tensor([a, b], dtype=D), 0.01, 0.7).tolist() == [[False, True], [True, False]]


def test_rms_by_hand():
    s = torch.tensor([[[0.3, 0.4], [0.4, 0.3], [0.0, 1.0]]], dtype=D)
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(rms_aggregate(s, mask), torch.full((1, 2), math.sqrt(0.125), dtype=D))
    torch.testing.assert_close(rms_aggregate(s), torch.tensor([[math.sqrt(0.25 / 3), math.sqrt(1.25 / 3)]], dtype=D))


@pytest.mark.parametrize("cls_init", ["sqrt_n", "uniform"])
@pytest.mark.parametrize("band", [(0.01, 0.7), None])
def test_importance_matches_loop_reference(cls_init, band):
    a = random_attention(2, 3, 11, sharpness=2.0, seed=1)
    got = wpr_importance(a, 5, cls_token=True, cls_init=cls_init, head_filter=band)
    for b in range(2):
        ref = ref_importance(a[b].tolist(), 5, True, cls_init, band)
        torch.testing.assert_close(got[b], torch.tensor(ref, dtype=D), atol=1e-14, rtol=1e-12)
    per_head = weighted_pagerank(a, 3)
    torch.testing.assert_close(per_head[1], torch.tensor(ref_wpr(a[1].tolist(), 3, [1 / 11] * 11), dtype=D))


def test_subgraph_matches_loop_reference():
    a = random_attention(2, 2, 7)
    idx = torch.tensor([[0, 2, 3, 6], [0, 1, 4, 5]])
    got = subgraph(a, idx)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, 4, dtype=D))
    for b in range(2):
        ref = ref_subgraph(a[b].tolist(), idx[b].tolist())
        torch.testing.assert_close(got[b], torch.tensor(ref, dtype=D))


def test_low_precision_is_computed_in_float32():
    a = random_attention(1, 2, 16)
    low = a.to(torch.bfloat16)
    got = wpr_importance(low, 30)
    assert got.dtype == torch.float32
    # the same bf16 inputs iterated in float32: equal up to float32 rounding (iterating in bf16 is ~1e-2 off)
    torch.testing.assert_close(got, wpr_importance(low.float(), 30), atol=1e-6, rtol=1e-5)
