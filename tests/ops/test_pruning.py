"""Pruning ops: keep schedules, the FLOPs search, top-k keep and Zero-TPrune's similarity stage."""
import math

import pytest
import torch

from tokenreduce.ops.pruning import (compose, importance_keep, keep_count, max_cosine, search_keep_ratio,
                                     sequential_partition, similarity_keep, split_drop, tokens_per_block, topk_keep)

from ..methods._pruning_reference import ref_cosine, ref_keep, ref_similarity_stage

D = torch.float64


def unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_keep_count():
    assert keep_count(196, 100) == 100
    assert keep_count(196, 0.7) == 138                 # ceil(137.2)
    assert keep_count(10, 0.7) == 7                    # 0.7 * 10 is 7.000000000000001 in floats
    assert keep_count(10, 1.0) == 10
    assert keep_count(10, 0.01) == 1                   # at least one token
    for n in range(1, 200):
        for f in (0.1, 0.3, 0.5, 0.7, 0.9, 0.95):
            assert keep_count(n, f) == ref_keep(n, f)
    with pytest.raises(ValueError, match="only 10"):
        keep_count(10, 11)
    with pytest.raises(ValueError):
        keep_count(10, 0)


def test_split_drop():
    assert split_drop(196, 58, 0.5) == (29, 29)
    assert split_drop(196, 5, 0.5) == (2, 3)           # the similarity stage gets the floor
    assert split_drop(10, 9, 1.0) == (5, 4)            # capped at the less important half
    assert split_drop(10, 4, 0.0) == (0, 4)


def test_tokens_per_block():
    assert tokens_per_block(196, 1, 12, {3: 0.7, 6: 0.7, 9: 0.7}) == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert tokens_per_block(36, 2, 4, {0: 20, 2: 5}) == [38, 22, 22, 7]


def test_search_keep_ratio_finds_last_fitting_step():
    cost = lambda r: math.ceil(r * 100)  # noqa: E731  (a step function, like integer token counts)
    ratio = search_keep_ratio(cost, 37)
    assert cost(ratio) == 37 and cost(ratio + 1e-6) == 38
    assert search_keep_ratio(cost, 100) == 1.0
    assert search_keep_ratio(lambda r: 10 + r, 5) is None


def test_topk_keep_by_hand():
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9], [0.0, 0.8, 0.2, 0.7, 0.1]])
    assert topk_keep(scores, 1, 2).tolist() == [[0, 2, 4], [0, 1, 3]]
    assert topk_keep(scores, 0, 1).tolist() == [[0], [1]]
    assert topk_keep(scores, 2, 3).tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_compose():
    outer = torch.tensor([[0, 2, 5, 7]])
    assert compose(outer, torch.tensor([[0, 2, 3]])).tolist() == [[0, 5, 7]]


def test_sequential_partition_by_hand():
    imp = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    a, b = sequential_partition(imp)
    assert b.tolist() == [[3, 1, 2]]   # the more important half, ceil(5 / 2)
    assert a.tolist() == [[4, 0]]      # the less important half, floor(5 / 2)


def test_max_cosine_matches_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 6, generator=g, dtype=D), torch.randn(2, 5, 6, generator=g, dtype=D)
    got = max_cosine(a, b)
    for s in range(2):
        for i in range(4):
            ref = max(ref_cosine(a[s, i].tolist(), b[s, j].tolist()) for j in range(5))
            assert abs(got[s, i].item() - ref) < 1e-14


def test_similarity_stage_by_hand():
    # Token 0 is CLS. Importance ranks tokens 1, 2, 3 above 4, 5, 6, so B = {1, 2, 3} (keys at 0, 90, 180 deg)
    # and A = {4, 5, 6}: token 4 at 10 deg is 10 deg from token 1, token 5 at 135 deg 45 deg from B, token 6 at
    # 265 deg 85 deg from B. Most redundant first: 4, then 5.
    keys = torch.tensor([[unit(45), unit(0), unit(90), unit(180), unit(10), unit(135), unit(265)]], dtype=D)
    imp = torch.tensor([[1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]], dtype=D)
    assert similarity_keep(keys, imp, 1, 1).tolist() == [[0, 1, 2, 3, 5, 6]]
    assert similarity_keep(keys, imp, 1, 2).tolist() == [[0, 1, 2, 3, 6]]
    assert similarity_keep(keys, imp, 1, 0).tolist() == [[0, 1, 2, 3, 4, 5, 6]]
    # Swap the roles of tokens 1 and 4: now token 1 (0 deg) is in A and is 10 deg from token 4 in B; it goes first.
    imp2 = torch.tensor([[1.0, 0.3, 0.5, 0.4, 0.6, 0.2, 0.1]], dtype=D)
    assert similarity_keep(keys, imp2, 1, 1).tolist() == [[0, 2, 3, 4, 5, 6]]
    # Per sample: the two partitions in one batch.
    both = similarity_keep(keys.expand(2, -1, -1), torch.cat([imp, imp2]), 1, 1)
    assert both.tolist() == [[0, 1, 2, 3, 5, 6], [0, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="at most 3"):
        similarity_keep(keys, imp, 1, 4)


def test_similarity_stage_matches_loops():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 20, 8, generator=g, dtype=D)
    imp = torch.rand(3, 20, generator=g, dtype=D)
    for p, r in [(1, 5), (2, 9), (0, 10), (5, 3)]:
        got = similarity_keep(keys, imp, p, r)
        for s in range(3):
            ref = list(range(p)) + ref_similarity_stage(keys[s].tolist(), imp[s].tolist(), p, r)
            assert got[s].tolist() == ref


def test_importance_keep_by_hand():
    selection = torch.tensor([[0, 2, 3, 5, 6]])
    imp = torch.tensor([[5.0, 0.1, 0.9, 0.5, 0.2]])   # scores of tokens 0, 2, 3, 5, 6
    assert importance_keep(imp, selection, 1, 2).tolist() == [[0, 3, 5]]
