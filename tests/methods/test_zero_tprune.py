"""Zero-TPrune against an independent float64 loop reference (tests/methods/_pruning_reference.py), stage by stage
and end to end on random tiny timm ViTs, plus schedules, variants and errors."""
import copy

import pytest
import torch

import tokenreduce
from tokenreduce.methods.zero_tprune import default_iterations, zero_tprune_select
from tokenreduce.methods.pruning import default_prune_layers

from ._pruning_reference import (block_attention, ref_forward, ref_split, ref_zero_tprune_step, sharp_vit,
                                 zero_tprune_selector)

D = torch.float64


def images(n=2, size=24, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=D)


def run_both(model, x, steps, selector, **params):
    """(patched logits, info, reference logits, reference kept, reference tokens per block)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        ref_logits, ref_kept, ref_tokens = ref_forward(reference, x, steps, selector)
        tokenreduce.patch(model, "zero_tprune", **params)
        logits = model(x)
    return logits, tokenreduce.info(model), ref_logits, ref_kept, ref_tokens


def assert_matches(logits, info, ref_logits, ref_kept, ref_tokens, num_prefix):
    assert info.tokens_per_layer == ref_tokens
    assert sorted(info.kept) == sorted(ref_kept)
    for layer, kept in ref_kept.items():
        assert info.kept[layer].tolist() == kept, f"layer {layer}"
        assert (info.kept[layer][:, :num_prefix] == torch.arange(num_prefix)).all()
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# per stage

@pytest.mark.parametrize("graph", ["full", "survivors"])
def test_stages_match_reference(graph):
    model = sharp_vit()
    x = images()
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for layer in range(2):
            probs, k = block_attention(model.blocks[layer], h)
            h = model.blocks[layer](h)
            b, heads, n, d = k.shape
            keys = k.transpose(1, 2).reshape(b, n, heads * d)
            r_sim, r_imp = ref_split(n - 1, 14, 0.5)
            got = zero_tprune_select(probs, keys, 1, r_sim, r_imp, iterations=default_iterations(4)[layer],
                                     importance_graph=graph)
            for s in range(b):
                ref = ref_zero_tprune_step(probs[s].tolist(), keys[s].tolist(), 1, r_sim, r_imp,
                                           iterations=default_iterations(4)[layer], cls_token=True, graph=graph)
                torch.testing.assert_close(got.pre_importance[s], torch.tensor(ref["pre"], dtype=D),
                                           atol=1e-14, rtol=1e-12)
                assert got.similarity_index[s].tolist() == ref["after_sim"]
                torch.testing.assert_close(got.importance[s], torch.tensor(ref["importance"], dtype=D),
                                           atol=1e-14, rtol=1e-12)
                assert got.index[s].tolist() == ref["index"]


def test_head_filter_is_exercised_by_the_test_models():
    """The sharp test models have heads on both sides of the 0.7 bound, so the filter changes the scores."""
    from tokenreduce.ops.pagerank import head_filter_mask, initial_scores, weighted_pagerank
    model = sharp_vit()
    partial = 0
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(images())))
        for blk in model.blocks:
            probs, _ = block_attention(blk, h)
            h = blk(h)
            n = probs.shape[-1]
            for its in (1, 30):
                mask = head_filter_mask(weighted_pagerank(probs, its, initial_scores(n, n ** 0.5, dtype=D)), 0.01, 0.7)
                partial += int((mask.any(-1) & ~mask.all(-1)).sum())
    assert partial >= 4


# ---------------------------------------------------------------------------------------------------------------
# end to end

CONFIGS = [
    dict(prune_layers=[0, 1, 2], keep=[24, 14, 8]),
    dict(prune_layers=[0, 2], keep=0.6, importance_graph="survivors"),
    dict(prune_layers=[1, 2], keep=[0.5, 10], keys="mean", sim_fraction=1.0),
    dict(prune_layers=[0, 1], keep=[30, 20], head_filter=None, cls_init="uniform", iterations=3),
    dict(prune_layers=[0, 1, 2], keep=[20, 19, 18], sim_fraction=0.0),
]


@pytest.mark.parametrize("params", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_end_to_end_matches_reference(params):
    model = sharp_vit()
    x = images()
    keep = params["keep"]
    keep = keep if isinstance(keep, list) else [keep] * len(params["prune_layers"])
    steps = dict(zip(params["prune_layers"], keep))
    its = params.get("iterations")
    selector = zero_tprune_selector(
        default_iterations(4) if its is None else [its] * 4, cls_token=True,
        sim_fraction=params.get("sim_fraction", 0.5), cls_init=params.get("cls_init", "sqrt_n"),
        band=params.get("head_filter", (0.01, 0.7)), graph=params.get("importance_graph", "full"),
        keys=params.get("keys", "concat"))
    assert_matches(*run_both(model, x, steps, selector, **params), num_prefix=1)


VARIANTS = {
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "registers": dict(reg_tokens=4),
    "registers_no_cls": dict(reg_tokens=4, class_token=False, global_pool="avg"),
    "distilled": dict(distilled=True),
    "dynamic_img_size": dict(dynamic_img_size=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_variants_match_reference(variant):
    model = sharp_vit(**VARIANTS[variant])
    p = model.num_prefix_tokens
    size = 32 if variant == "dynamic_img_size" else 24  # 64 patches instead of the default 36
    x = images(size=size)
    steps = {0: 0.7, 2: 0.5}
    selector = zero_tprune_selector(default_iterations(4), cls_token=model.cls_token is not None)
    logits, info, *ref = run_both(model, x, steps, selector, prune_layers=[0, 2], keep=[0.7, 0.5])
    assert_matches(logits, info, *ref, num_prefix=p)
    n = size * size // 16                      # 36 patches, or 64 at 32x32
    n1 = -(-n * 7 // 10)                       # ceil(0.7 n)
    assert info.tokens_per_layer == [p + n, p + n1, p + n1, p + -(-n1 // 2)]


def test_token_counts_follow_the_schedule():
    model = sharp_vit(depth=6)
    tokenreduce.patch(model, "zero_tprune", prune_layers=[1, 3, 4], keep=[30, 0.5, 9])
    with torch.no_grad():
        model(images())
    assert tokenreduce.info(model).tokens_per_layer == [37, 37, 31, 31, 16, 10]
    tokenreduce.patch(model, "zero_tprune", keep_ratio=0.5)        # default layers for 6 blocks: 1, 3, 4
    with torch.no_grad():
        model(images())
    assert tokenreduce.info(model).tokens_per_layer == [37, 37, 19, 19, 10, 6]


def test_defaults():
    assert default_iterations(12) == [30, 30, 30, 5, 5, 5, 5, 5, 5, 1, 1, 1]
    assert default_iterations(4) == [30, 30, 30, 1]
    assert default_prune_layers(12) == [3, 6, 9]
    assert default_prune_layers(24) == [6, 12, 18]
    assert default_prune_layers(4) == [1, 2]


def test_zero_reduction_gives_the_unpatched_output():
    model = sharp_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        for params in ({}, dict(keep_ratio=1.0), dict(prune_layers=[0, 1], keep=[36, 36])):
            tokenreduce.patch(model, "zero_tprune", **params)
            assert torch.equal(model(x), ref)
            tokenreduce.unpatch(model)


def test_attention_matrix_only_in_pruning_layers():
    model = sharp_vit()
    tokenreduce.patch(model, "zero_tprune", prune_layers=[1], keep=20)
    method = model._tokenreduce.method
    assert [method.needs_at(i) for i in range(4)] == [frozenset(), frozenset({"attn", "keys_per_head"}),
                                                      frozenset(), frozenset()]
    tokenreduce.patch(model, "zero_tprune", prune_layers=[1], keep=20, keys="mean")
    assert model._tokenreduce.method.needs_at(1) == frozenset({"attn", "keys"})
    tokenreduce.patch(model, "zero_tprune", prune_layers=[1, 2], keep=[1.0, 0.5])   # 1.0: no step at all
    assert [model._tokenreduce.method.acts_at(i) for i in range(4)] == [False, False, True, False]


def test_source_and_size_follow_the_pruning():
    model = sharp_vit()
    tokenreduce.patch(model, "zero_tprune", prune_layers=[0, 2], keep=[20, 9], trace_source=True)
    with torch.no_grad():
        model(images())
    info = tokenreduce.info(model)
    original = info.kept[0].gather(1, info.kept[2])                 # input index of every surviving token
    expected = torch.nn.functional.one_hot(original, 37).to(info.source.dtype)
    assert torch.equal(info.source, expected)
    assert torch.equal(info.size, torch.ones(2, 10, dtype=info.size.dtype))


def test_target_flops_meets_the_budget():
    model = sharp_vit(depth=8)
    x = images()
    with torch.no_grad():
        tokenreduce.patch(model, "zero_tprune", keep_ratio=1.0)
        model(x)
        dense = float(tokenreduce.info(model).flops)
        tokenreduce.patch(model, "zero_tprune", target_flops=0.6, prune_layers=[1, 3, 5])
        model(x)
        ratio = model._tokenreduce.method.steps[1]
        got = float(tokenreduce.info(model).flops)
        assert got <= 0.6 * dense
        # The largest such ratio: keeping a little more breaks the budget.
        tokenreduce.patch(model, "zero_tprune", keep_ratio=min(1.0, ratio + 1 / 36), prune_layers=[1, 3, 5])
        model(x)
        assert tokenreduce.info(model).flops > 0.6 * dense
        tokenreduce.patch(model, "zero_tprune", target_flops=float(got))   # absolute MACs, default layers
        model(x)
        assert tokenreduce.info(model).flops <= got


def test_low_precision_runs():
    model = sharp_vit().float()
    tokenreduce.patch(model, "zero_tprune", keep_ratio=0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images().float())
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("params, match", [
    (dict(prune_layers=[1, 4], keep=10), r"out of range.*4 blocks"),
    (dict(prune_layers=[2, 1], keep=10), "strictly increasing"),
    (dict(prune_layers=[0, 1], keep=[20, 30]), "after block 1 keeps 30 tokens but only 20"),
    (dict(prune_layers=[0], keep=37), "only 36"),
    (dict(prune_layers=[0, 1], keep=[20]), "1 values but there are 2 pruning layers"),
    (dict(keep=10, keep_ratio=0.5), "only one of"),
    (dict(prune_layers=[1]), "nothing says how many"),
    (dict(prune_layers=[2], target_flops=0.2), "unreachable"),
    (dict(keep_ratio=0.5, iterations=[5, 5]), "2 values but the model has 4 blocks"),
])
def test_bad_schedules_raise(params, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.patch(sharp_vit(), "zero_tprune", **params)


@pytest.mark.parametrize("params", [dict(sim_fraction=1.5), dict(head_filter=(0.7, 0.01)), dict(keep=0),
                                    dict(keep_ratio=1.5), dict(cls_init="cls"), dict(keys="values"),
                                    dict(iterations=0), dict(prune_layers=[-1], keep=3), dict(keep=True)])
def test_bad_values_raise(params):
    with pytest.raises(ValueError):
        tokenreduce.patch(sharp_vit(), "zero_tprune", **params)


def test_int_keep_larger_than_tokens_present_at_run_time():
    model = sharp_vit(dynamic_img_size=True)
    tokenreduce.patch(model, "zero_tprune", prune_layers=[0], keep=30)
    with torch.no_grad(), pytest.raises(ValueError, match="only 16 non-prefix tokens are present"):
        model(images(size=16))
