"""The pruning baselines: random (seeded) and topk_attn (EViT's CLS-attention criterion without fusion)."""
import copy

import pytest
import torch

import tokenreduce

from ._pruning_reference import ref_forward, sharp_vit, topk_attn_selector

D = torch.float64


def images(n=3, size=24, seed=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=D)


def kept_after(model, x, method, **params):
    tokenreduce.patch(model, method, **params)
    with torch.no_grad():
        model(x)
    return tokenreduce.info(model)


# ---------------------------------------------------------------------------------------------------------------
# topk_attn

@pytest.mark.parametrize("variant", ["plain", "registers", "distilled", "dynamic_img_size"])
def test_topk_attn_matches_reference(variant):
    kwargs = {"plain": {}, "registers": dict(reg_tokens=4), "distilled": dict(distilled=True),
              "dynamic_img_size": dict(dynamic_img_size=True)}[variant]
    model = sharp_vit(**kwargs)
    p = model.num_prefix_tokens
    x = images(size=28 if variant == "dynamic_img_size" else 24)
    steps = {0: 0.7, 1: 12, 2: 0.5}
    with torch.no_grad():
        ref_logits, ref_kept, ref_tokens = ref_forward(copy.deepcopy(model), x, steps, topk_attn_selector)
        info = kept_after(model, x, "topk_attn", prune_layers=[0, 1, 2], keep=[0.7, 12, 0.5])
        logits = model(x)
    assert info.tokens_per_layer == ref_tokens
    for layer, kept in ref_kept.items():
        assert info.kept[layer].tolist() == kept
        assert (info.kept[layer][:, :p] == torch.arange(p)).all()
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-10)


def test_topk_attn_needs_a_class_token():
    with pytest.raises(ValueError, match="no class token"):
        tokenreduce.patch(sharp_vit(class_token=False, global_pool="avg"), "topk_attn", keep_ratio=0.5)


# ---------------------------------------------------------------------------------------------------------------
# random

def test_random_follows_its_seed():
    x = images()
    model = sharp_vit(reg_tokens=2)  # 3 prefix tokens
    a = kept_after(model, x, "random", keep_ratio=0.5, seed=7)
    b = kept_after(model, x, "random", keep_ratio=0.5, seed=7)
    c = kept_after(model, x, "random", keep_ratio=0.5, seed=8)
    assert a.tokens_per_layer == [39, 39, 21, 12]
    for layer in a.kept:
        assert torch.equal(a.kept[layer], b.kept[layer])
        assert a.kept[layer].shape[1] == a.tokens_per_layer[layer + 1]
        assert (a.kept[layer][:, :3] == torch.arange(3)).all()
        assert (a.kept[layer][:, 1:].diff(dim=1) > 0).all()          # prefix first, then spatial order
    assert not torch.equal(a.kept[1], c.kept[1])
    assert not torch.equal(a.kept[1][0], a.kept[1][1])              # every sample draws its own tokens


def test_random_is_a_deterministic_function_of_its_input_with_a_seed():
    model = sharp_vit()
    tokenreduce.patch(model, "random", layers=[0], keep=10, seed=0)
    x = images()
    with torch.no_grad():
        model(x)
        first = tokenreduce.info(model).kept[0].clone()
        model(x)
        second = tokenreduce.info(model).kept[0]
    assert torch.equal(first, second)
    # The draw is torch.rand on a CPU generator seeded with `seed` for every forward, top-k per sample.
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 37, generator=g)[:, 1:]
    expected = [[0] + sorted((scores[s].argsort(descending=True)[:10] + 1).tolist()) for s in range(3)]
    assert first.tolist() == expected


def test_random_without_a_seed_draws_fresh_tokens_from_the_global_generator():
    model = sharp_vit()
    tokenreduce.patch(model, "random", layers=[0], keep=10, seed=None)
    x = images()
    with torch.no_grad():
        torch.manual_seed(1)
        model(x)
        first = tokenreduce.info(model).kept[0].clone()
        model(x)
        second = tokenreduce.info(model).kept[0].clone()
        torch.manual_seed(1)
        model(x)
        again = tokenreduce.info(model).kept[0]
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_same_schedule_same_flops():
    x = images()
    flops = {m: float(kept_after(sharp_vit(), x, m, keep=[20, 9], prune_layers=[0, 2]).flops)
             for m in ("zero_tprune", "random", "topk_attn")}
    assert len(set(flops.values())) == 1


def test_random_works_without_class_token_and_at_other_sizes():
    model = sharp_vit(class_token=False, global_pool="avg", dynamic_img_size=True)
    info = kept_after(model, images(size=32), "random", keep_ratio=0.5)
    assert info.tokens_per_layer == [64, 64, 32, 16]


@pytest.mark.parametrize("method", ["random", "topk_attn"])
def test_baselines_reject_bad_schedules(method):
    with pytest.raises(ValueError, match="out of range"):
        tokenreduce.patch(sharp_vit(), method, prune_layers=[4], keep=3)
    with pytest.raises(ValueError, match="only 36"):
        tokenreduce.patch(sharp_vit(), method, prune_layers=[0], keep=40)
