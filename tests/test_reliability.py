"""Every reproducer of ../shared/reviews/reliability.md, as a test: it now works, or gives the error chosen for it.

Sections follow the review: §3 silent no-ops and over-reduction, §4 state and serialization, §5 claims (fused
attention, compile), §7 the small things. (§1/§2, transformers 5.24 and batched generate, are in
tests/backbones/test_llava.py; §6, DiffRate's mutants, in tests/methods/test_diffrate.py.)
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import tokenreduce

from .conftest import tiny_vit


def _x(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# §3 Settings that silently do nothing, or more than asked
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["topk_attn", "random", "zero_tprune", "l2norm"])
@pytest.mark.parametrize("depth", [2, 3])
def test_pruning_on_shallow_models_prunes(method, depth):
    model = tiny_vit(depth=depth)
    with torch.no_grad():
        ref = model(_x())
        tokenreduce.patch(model, method, keep_ratio=0.5)
        out = model(_x())
    info = tokenreduce.info(model)
    assert info.tokens_per_layer[-1] < info.tokens_per_layer[0]
    assert not torch.equal(out, ref)


def test_a_configuration_that_reduces_nothing_warns():
    model = tiny_vit()
    with pytest.warns(UserWarning, match="reduces nothing"):
        tokenreduce.patch(model, "tome")  # r defaults to 0
    with pytest.warns(UserWarning, match="reduces nothing"):
        tokenreduce.patch(model, "pitome", keep_ratio=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenreduce.patch(model, "tome", r=4)  # a real reduction stays silent


@pytest.mark.parametrize("method,rule", [("tome", "half of the non-prefix tokens"),
                                         ("atc", "all but one of the non-prefix tokens")])
def test_r_beyond_the_clamp_warns(method, rule):
    model = tiny_vit()
    with pytest.warns(UserWarning, match=rule):
        tokenreduce.patch(model, method, r=1000)
    with torch.no_grad():
        model(_x())
    assert tokenreduce.info(model).tokens_per_layer[-1] >= 2


def test_atc_keep_ratio_follows_the_input_size():
    """dynamic_img_size: the compounding keep ratio counts the patches actually present (docs/backbones.md)."""
    model = tiny_vit(depth=6, dynamic_img_size=True)
    tokenreduce.patch(model, "atc", keep_ratio=0.5, layers=[1, 3])
    for size, patches in ((32, 64), (16, 16), (48, 144)):
        with torch.no_grad():
            model(_x(1, size))
        tokens = tokenreduce.info(model).tokens_per_layer
        assert tokens[2] == 1 + int(patches * 0.5) and tokens[4] == 1 + int(patches * 0.25), (size, tokens)


def test_diffrate_counts_refuse_another_input_size():
    model = tiny_vit(dynamic_img_size=True)
    tokenreduce.patch(model, "diffrate", prune_kept=[65, 60, 50, 40], merge_kept=[65, 58, 45, 30])
    with torch.no_grad():
        model(_x(1, 32))
        with pytest.raises(ValueError, match="set for 65 tokens"):
            model(_x(1, 48))


def test_diffrate_without_rates_warns_that_it_is_the_search_mode():
    with pytest.warns(UserWarning, match="rate-search mode"):
        tokenreduce.patch(tiny_vit(), "diffrate")


def test_a_config_for_another_architecture_is_refused():
    model = tiny_vit(img_size=64, patch_size=16)
    with pytest.raises(ValueError, match="was written for vit_small_patch16_224"):
        tokenreduce.patch(model, config="tome/vit_s16_augreg_r13")
    assert not tokenreduce.is_patched(model)


# ---------------------------------------------------------------------------------------------------------------
# §4 State and serialization
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("tome", dict(r=4, trace_source=True)), ("pitome", dict(keep_ratio=0.9)),
                                           ("topk_attn", dict(keep_ratio=0.5)), ("random", dict(keep_ratio=0.5)),
                                           ("diffrate", dict(prune_kept=[65, 60, 50, 40], merge_kept=[65, 58, 45, 30]))])
def test_a_patched_model_pickles_and_saves(method, params, tmp_path):
    model = tiny_vit()
    tokenreduce.patch(model, method, **params)
    with torch.no_grad():
        out = model(_x())
    info = tokenreduce.info(model)
    for restored in (pickle.loads(pickle.dumps(model)), _torch_roundtrip(model, tmp_path)):
        with torch.no_grad():
            assert torch.equal(restored(_x()), out)
        got = tokenreduce.info(restored)
        assert got.tokens_per_layer == info.tokens_per_layer and got.macs == info.macs
        assert torch.equal(got.size, info.size)
        tokenreduce.unpatch(restored)
        assert "forward" not in restored.blocks[0].__dict__


def _torch_roundtrip(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return torch.load(path, weights_only=False)


def test_hand_written_block_loops_start_a_fresh_record():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=4, trace_source=True)
    x = _x()
    with torch.no_grad():
        model(x)
        expected = tokenreduce.info(model)
        for _ in range(2):
            h = model._pos_embed(model.patch_embed(x))
            for blk in model.blocks:
                h = blk(h)
            info = tokenreduce.info(model)
            assert info.tokens_per_layer == expected.tokens_per_layer
            assert torch.equal(info.source, expected.source)


def test_info_after_a_failed_forward_says_what_happened():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad():
        model(_x())
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 4, 32, 32))  # four channels: the patch embedding raises
    with pytest.raises(RuntimeError, match="the last forward raised RuntimeError"):
        tokenreduce.info(model)


def test_unpatch_restores_user_attributes_exactly():
    model = tiny_vit(global_pool="avg", class_token=False)
    custom_pool = lambda x, pool_type=None: x.amax(dim=1)  # noqa: E731
    model.pool = custom_pool
    model.blocks[1].forward = model.blocks[1].forward  # an instance forward someone else installed
    before = {id(m): dict(m.__dict__) for m in model.modules()}
    tokenreduce.patch(model, "tome", r=4)
    tokenreduce.unpatch(model)
    assert model.__dict__["pool"] is custom_pool
    for m in model.modules():
        assert m.__dict__.keys() == before[id(m)].keys()
        for k, v in before[id(m)].items():
            assert m.__dict__[k] is v, (type(m).__name__, k)


# ---------------------------------------------------------------------------------------------------------------
# §5 Claims: fused attention stays on
# ---------------------------------------------------------------------------------------------------------------
class _CountAttention(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sdpa = self.softmax = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.sdpa += 1
        elif func in (torch.softmax, torch.Tensor.softmax, F.softmax):
            self.softmax += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,params", [("tome", dict(r=4)), ("pitome", dict(keep_ratio=0.9)), ("atc", dict(r=4))])
def test_merging_keeps_sdpa_as_the_attention_path(method, params):
    model = tiny_vit()
    tokenreduce.patch(model, method, **params)
    counter = _CountAttention()
    with torch.no_grad(), counter:
        model(_x())
    assert counter.sdpa == len(model.blocks)
    assert counter.softmax == 0


def test_cls_attention_is_one_query_not_the_matrix():
    """topk_attn reads the CLS row: SDPA in every block, one softmax per acting block (of a [B, H, 1, N] row)."""
    model = tiny_vit(depth=4)
    tokenreduce.patch(model, "topk_attn", keep_ratio=0.5, layers=[1])
    counter = _CountAttention()
    with torch.no_grad(), counter:
        model(_x())
    assert counter.sdpa == 4 and counter.softmax == 1


# ---------------------------------------------------------------------------------------------------------------
# §7 The small things
# ---------------------------------------------------------------------------------------------------------------
def test_macs_is_a_plain_number():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad():
        model(_x())
    info = tokenreduce.info(model)
    assert type(info.macs) is int and info.macs > 0
    assert float(info.flops) == info.macs  # the fixtures' tensor form of the same count


@pytest.mark.parametrize("wrap,hint", [(lambda m: torch.nn.DataParallel(m), "tokenreduce.patch\\(dp.module"),
                                       (lambda m: torch.compile(m), "patch the model first, then compile it")])
def test_wrapped_models_say_how_to_patch_them(wrap, hint):
    with pytest.raises(ValueError, match=hint):
        tokenreduce.patch(wrap(tiny_vit()), "tome", r=4)


def test_vlm_methods_on_a_vit_name_the_models_that_offer_them():
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        tokenreduce.patch(tiny_vit(), "visionzip")
    with pytest.raises(ValueError, match="llm_layer"):
        tokenreduce.patch(tiny_vit(), "dart")


def test_deep_copies_and_two_instances_stay_independent():
    a, b = tiny_vit(), tiny_vit()
    tokenreduce.patch(a, "tome", r=4)
    c = copy.deepcopy(a)
    tokenreduce.patch(b, "topk_attn", keep_ratio=0.5)
    with torch.no_grad():
        ya, yc = a(_x()), c(_x())
        b(_x())
    assert torch.equal(ya, yc)
    assert tokenreduce.info(a).tokens_per_layer == tokenreduce.info(c).tokens_per_layer
    assert tokenreduce.info(b).tokens_per_layer != tokenreduce.info(a).tokens_per_layer


# ---------------------------------------------------------------------------------------------------------------
# §1 Versions: below the declared floor, a clear error instead of a failure deep inside generate()
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,ok", [("5.17.0", False), ("4.57.6", False), ("5.18.0", True), ("5.24.0.dev0", True),
                                        ("6.0.0", True)])
def test_the_vlm_backbones_check_the_transformers_floor(version, ok):
    from tokenreduce.backbones.vlm.shrink import check_transformers
    if ok:
        check_transformers(version)
    else:
        with pytest.raises(ValueError, match=r"need transformers >= 5\.18 .*pip install -U 'transformers>=5\.18'"):
            check_transformers(version)


def test_patching_a_vlm_on_an_old_transformers_is_refused_before_touching_it(monkeypatch):
    import transformers

    from .llava_helpers import tiny_llava
    model = tiny_llava()
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(ValueError, match="this is transformers 5.17.0"):
        tokenreduce.patch(model, "visionzip", dominant=4, contextual=2)
    assert not tokenreduce.is_patched(model)
