"""DiffRate ops against plain-loop float64 references and their gradient contracts."""
import torch

from tokenreduce.core import CostModel
from tokenreduce.methods.diffrate.functional import (candidate_counts, keep_probability, kept_count, masked_merge,
                                                     rate_flops, similarity_merge, soft_keep_mask, softmax_with_policy,
                                                     sort_by_importance, ste_ceil, ste_min)

D = torch.float64


def test_sort_pins_prefix():
    cls_attn = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.7], [5.0, 0.1, 0.2, 0.3, 0.4]], dtype=D)
    assert sort_by_importance(cls_attn, 1).tolist() == [[0, 1, 4, 3, 2], [0, 4, 3, 2, 1]]
    assert sort_by_importance(cls_attn, 2).tolist() == [[0, 1, 4, 3, 2], [0, 1, 4, 3, 2]]


def _merge_reference(x, size, m, num_prefix):
    """Loop version of the inference merge of one sample."""
    n = x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True)
    members = {i: [i] for i in range(m)}
    new_size = size[:m].clone()
    for j in range(m, n):
        sims = [(unit[j] @ unit[i]).item() if i >= num_prefix else -float("inf") for i in range(m)]
        best = max(range(m), key=lambda i: sims[i])
        members[best].append(j)
        new_size[best] += size[j] * sims[best]
    merged = torch.stack([x[members[i]].mean(dim=0) for i in range(m)])
    return merged, new_size, members


def test_similarity_merge_matches_loop():
    torch.manual_seed(0)
    x, size = torch.randn(2, 9, 5, dtype=D), torch.rand(2, 9, dtype=D) + 0.5
    source = torch.eye(9, dtype=D).expand(2, 9, 9)
    merged, new_size, new_source = similarity_merge(x, size, source, 4, 1)
    for b in range(2):
        ref_x, ref_size, members = _merge_reference(x[b], size[b], 4, 1)
        torch.testing.assert_close(merged[b], ref_x)
        torch.testing.assert_close(new_size[b], ref_size)
        for i, group in members.items():
            assert new_source[b, i].nonzero().flatten().tolist() == sorted(group)


def test_masked_merge_keeps_length_and_clamps():
    torch.manual_seed(1)
    x, size = torch.randn(2, 10, 6, dtype=D), torch.ones(2, 10, dtype=D)
    out, new_size = masked_merge(x, size, 3, 7, 1)
    assert out.shape == x.shape
    eval_x, _, _ = similarity_merge(x[:, :7], size[:, :7], None, 3, 1)
    torch.testing.assert_close(out[:, :3], eval_x)
    assert torch.equal(out[:, 3:], x[:, 3:])  # sources stay (masked), the rest untouched
    # every source contributes at least 1 (clamp), so the destinations gain exactly 4 in total
    assert torch.equal(new_size[:, 3:], torch.ones(2, 7, dtype=D))
    torch.testing.assert_close(new_size[:, :3].sum(dim=1), torch.full((2,), 7.0, dtype=D))


def test_kept_count_and_ste():
    c = candidate_counts(196, 1, dtype=D)
    assert c[0] == 196 and c[-1] == 1 and len(c) == 196 and len(candidate_counts(196, 4)) == 49
    theta = torch.zeros(196, dtype=D, requires_grad=True)
    kept, probs = kept_count(theta, c, 1)
    assert kept.item() == 100.0  # ceil(98.5) + 1
    kept.backward()
    expected_grad = probs.detach() * (c - (probs.detach() * c).sum())  # d E / d theta
    torch.testing.assert_close(theta.grad, expected_grad)
    x = torch.tensor(2.3, requires_grad=True)
    y = ste_ceil(x)
    y.backward()
    assert y.item() == 3.0 and x.grad.item() == 1.0


def test_keep_probability_and_mask():
    c = torch.tensor([6.0, 4.0, 2.0], dtype=D)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D, requires_grad=True)
    pi = keep_probability(p, c, 8, 1)
    ref = [sum(p[k].item() for k in range(3) if j < c[k] + 1) for j in range(8)]
    torch.testing.assert_close(pi.detach(), torch.tensor(ref, dtype=D))
    mask = soft_keep_mask(pi, kept=4, num_live=6)
    assert mask.detach().tolist() == [1, 1, 1, 1, 0, 0, 1, 1]
    mask.sum().backward()
    torch.testing.assert_close(p.grad, torch.tensor([7.0, 5.0, 3.0], dtype=D))  # d sum(pi) / d p_k = c_k + 1


def test_ste_min_routes_to_both_counts():
    n = torch.tensor(50.0, requires_grad=True)
    p = torch.tensor(40.0, requires_grad=True)
    m = torch.tensor(45.0, requires_grad=True)
    out = ste_min(n, p, m)
    out.backward()
    assert out.item() == 40.0 and n.grad is None and p.grad.item() == 1.0 and m.grad.item() == 1.0


def test_softmax_with_policy():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 5, 5, dtype=D)
    ones = torch.ones(2, 5, dtype=D)
    torch.testing.assert_close(softmax_with_policy(logits, ones, eps=0.0), logits.softmax(-1))
    policy = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=D, requires_grad=True)
    probs = softmax_with_policy(logits, policy, eps=0.0)
    masked = logits.masked_fill(policy.detach()[:, None, None, :] == 0, -float("inf"))
    eye = torch.eye(5, dtype=torch.bool)
    ref = torch.where(eye, logits, masked).softmax(-1)  # a masked token still sees itself
    torch.testing.assert_close(probs, ref)
    # unlike an additive log-mask, the gradient reaches the masked keys' policy
    probs[:, :, 0].sum().backward()
    assert (policy.grad[0, [2, 4]].abs() > 0).all()
    half = softmax_with_policy(logits.to(torch.bfloat16), policy.detach().float())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    # computed in float32 and only then rounded: bit-equal to the float32 result of the same bf16 logits (a bf16
    # computation inside would round every intermediate and differ)
    exact = softmax_with_policy(logits.to(torch.bfloat16).float(), policy.detach().float()).to(torch.bfloat16)
    assert torch.equal(half, exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same under autocast, as in a GPU rate search
        assert torch.equal(softmax_with_policy(logits.to(torch.bfloat16), policy.detach().float()), exact)


def test_rate_flops_ints_and_tensors():
    cost = CostModel(constant=100.0, attn_linear=(4.0, 4.0), attn_quadratic=(2.0, 2.0), mlp=(8.0, 8.0))
    ref = 100 + (4 * 10 + 2 * 100 + 8 * 7) + (4 * 7 + 2 * 49 + 8 * 5)
    assert rate_flops([9, 5], [7, 6], cost, 10) == ref
    p = [torch.tensor(9.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)]
    m = [torch.tensor(7.0, requires_grad=True), torch.tensor(6.0, requires_grad=True)]
    f = rate_flops(p, m, cost, 10)
    f.backward()
    assert f.item() == ref
    # N_1 = min(...) feeds mlp_0 + attention of block 1 (4 + 2·2·7), both counts of block 0 get it
    assert p[0].grad.item() == m[0].grad.item() == 8 + 4 + 2 * 2 * 7
    assert p[1].grad.item() == m[1].grad.item() == 8
