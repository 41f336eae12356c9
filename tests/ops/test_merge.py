"""Weighted merge, source tracking and gather against plain loops."""
import torch

from tokenreduce.ops import gather_tokens, merge_mean, merge_source, merge_weighted


def test_merge_weighted_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    size = torch.rand(2, 9, generator=g, dtype=torch.float64) + 0.5
    assign = torch.tensor([[0, 1, 2, 0, 3, 1, 2, 3, 3], [3, 3, 3, 2, 1, 0, 0, 0, 1]])
    out, new_size = merge_weighted(x, size, assign, 4)
    for b in range(2):
        for m in range(4):
            members = (assign[b] == m).nonzero().flatten()
            w = size[b, members]
            torch.testing.assert_close(out[b, m], (x[b, members] * w[:, None]).sum(0) / w.sum())
            torch.testing.assert_close(new_size[b, m], w.sum())
    torch.testing.assert_close(merge_mean(x, assign, 4)[0, 3], x[0, [4, 7, 8]].mean(0))


def test_merge_source_is_union():
    src = torch.eye(5)[None]
    assign = torch.tensor([[1, 0, 1, 2, 0]])
    assert merge_source(src, assign, 3)[0].tolist() == [[0, 1, 0, 0, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0]]


def test_gather_tokens():
    x = torch.arange(24.).reshape(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 1]])
    assert gather_tokens(x, idx).tolist() == [[x[0, 3].tolist(), x[0, 0].tolist()], [x[1, 1].tolist()] * 2]
    assert gather_tokens(x[..., 0], idx).tolist() == [[9.0, 0.0], [15.0, 15.0]]
