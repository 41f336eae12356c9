"""The attention of a patch merger's tokens (tokenreduce.ops.merged_attention) against loop references in float64."""
from __future__ import annotations

import math

import torch

from tokenreduce.backbones.vlm.prompt import keep_columns
from tokenreduce.backbones.vlm.tower import merged_analysis
from tokenreduce.core import Need
from tokenreduce.ops.merged_attention import group_mean, merged_attention_rows


def _loop_rows(q, k, rows, scale, segments, group):
    """P_m[r, c] = (1/g) sum_{i in r} sum_{j in c} P[i, j], one scalar at a time."""
    b, h, n, d = q.shape
    m = n // group
    out = torch.zeros(b, h, rows.shape[1], m, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for qi, r in enumerate(rows[bi].tolist()):
                for i in range(r * group, r * group + group):
                    allowed = [j for j in range(n) if segments[bi, j] == segments[bi, i]]
                    logits = [float(q[bi, hi, i] @ k[bi, hi, j]) * scale for j in allowed]
                    top = max(logits)
                    z = sum(math.exp(v - top) for v in logits)
                    for j, v in zip(allowed, logits):
                        out[bi, hi, qi, j // group] += math.exp(v - top) / z / group
    return out


def test_rows_match_loop_reference_with_segments():
    g = torch.Generator().manual_seed(0)
    b, h, m, group, d = 2, 3, 6, 4, 5
    q = torch.randn(b, h, m * group, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, m * group, d, generator=g, dtype=torch.float64)
    # row 0: one segment; row 1: two windows of 3 merged tokens each
    segments = torch.stack([torch.zeros(m * group, dtype=torch.long),
                            torch.arange(m * group) // (3 * group)])
    rows = torch.tensor([[0, 5, 2], [4, 1, 3]])
    got = merged_attention_rows(q, k, rows, 0.7, segments, group)
    torch.testing.assert_close(got, _loop_rows(q, k, rows, 0.7, segments, group), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(-1), torch.ones(b, h, 3, dtype=torch.float64))
    # a window's rows give nothing to the other window
    assert got[1, :, 0, :3].abs().max() == 0 and got[1, :, 1, 3:].abs().max() == 0


def test_analysis_keys_are_group_and_head_means():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 8, 3, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 8, 3, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 8, 3, generator=g, dtype=torch.float64)
    seg = torch.zeros(1, 8, dtype=torch.long)
    out = merged_analysis(frozenset({Need.KEYS, Need.VALUES_PER_HEAD, Need.ATTN}), q, k, v, 0.5, seg, 4)
    torch.testing.assert_close(out["keys"][0, 1], k[0, :, 4:8].mean(dim=(0, 1)))
    torch.testing.assert_close(out["values_per_head"], group_mean(v, 4))
    torch.testing.assert_close(out["attn"], merged_attention_rows(q, k, torch.tensor([[0, 1]]), 0.5, seg, 4))


def test_keep_columns_repads_left_and_right():
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    ids = torch.arange(8).view(2, 4)
    pos = torch.arange(24).view(3, 2, 4)
    left = keep_columns(keep, {"ids": (ids, -1), "pos": (pos, 0)}, pad_left=True)
    assert left["ids"].tolist() == [[0, 2, 3], [-1, -1, 5]]
    assert left["pos"][2].tolist() == [[16, 18, 19], [0, 0, 21]]
    assert keep_columns(keep, {"ids": (ids, -1)}, pad_left=False)["ids"].tolist() == [[0, 2, 3], [5, -1, -1]]
