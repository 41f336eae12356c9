"""Bipartite soft matching against a plain-loop float64 reference of ToMe's rule."""
import pytest
import torch

from tokenreduce.ops import best_match, bipartite_soft_matching, clamp_r, merge_source, merge_weighted


def reference_tome(metric, x, r, num_prefix):
    """One sample, plain Python: returns the output groups (lists of input positions) in output order."""
    n = metric.shape[0]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    best = []
    for i, ai in enumerate(a_pos):
        scores = [float("-inf") if (i < pa or j < pb) else float(unit[ai] @ unit[bj]) for j, bj in enumerate(b_pos)]
        j = max(range(len(scores)), key=lambda k: (scores[k], -k))
        best.append((scores[j], i, j))
    r = max(0, min(r, (n - num_prefix) // 2))
    ranked = sorted(best, key=lambda t: -t[0])
    merged, kept = ranked[:r], ranked[r:]
    if num_prefix:
        kept = sorted(kept, key=lambda t: t[1])
    groups_b = {j: [b_pos[j]] for j in range(len(b_pos))}
    for _, i, j in merged:
        groups_b[j].append(a_pos[i])
    prefix = [[p] for p in range(num_prefix)]
    kept_groups = [[a_pos[i]] for _, i, _ in kept if a_pos[i] >= num_prefix]
    b_groups = [sorted(groups_b[j]) for j in range(pb, len(b_pos))]
    return prefix + kept_groups + b_groups


@pytest.mark.parametrize("n,r,num_prefix", [(7, 2, 1), (8, 3, 0), (11, 5, 2), (12, 4, 5), (5, 9, 1), (6, 0, 1)])
def test_groups_match_reference(n, r, num_prefix):
    g = torch.Generator().manual_seed(n * 31 + r)
    metric = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 2, generator=g, dtype=torch.float64)
    match = bipartite_soft_matching(metric, r, num_prefix)
    for b in range(3):
        groups = reference_tome(metric[b], x[b], r, num_prefix)
        if match is None:
            assert len(groups) == n
            continue
        src = merge_source(torch.eye(n, dtype=torch.float64)[None], match.assign[b:b + 1], match.num_out)[0]
        got = [torch.nonzero(row).flatten().tolist() for row in src]
        assert got == groups
        merged, size = merge_weighted(x[b:b + 1], torch.ones(1, n, dtype=torch.float64), match.assign[b:b + 1],
                                      match.num_out)
        expected = torch.stack([x[b, grp].mean(0) for grp in groups])
        torch.testing.assert_close(merged[0], expected)
        assert size[0].tolist() == [float(len(grp)) for grp in groups]


def test_clamp_r():
    assert clamp_r(16, 21, 1) == 10
    assert clamp_r(16, 198, 2) == 16
    assert clamp_r(3, 1, 1) == 0


def test_best_match_protection():
    a = torch.nn.functional.normalize(torch.randn(2, 4, 3), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(2, 5, 3), dim=-1)
    score, idx = best_match(a, b, protect_rows=1, protect_cols=2)
    assert torch.isinf(score[:, 0]).all() and (idx[:, 1:] >= 2).all()
    torch.testing.assert_close(score[:, 1:], (a @ b.transpose(1, 2))[:, 1:, 2:].max(-1).values)
