"""PiToMe against the official implementation's recorded outputs (../shared/fixtures/pitome), a plain-loop
reference of its two matching variants, its options and the upstream failures it fixes."""
import math

import pytest
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.methods.pitome import (bsm_blocks, energy_bipartite_assign, energy_protected_assign,
                                        margin_schedule, pitome_r)
from tokenreduce.ops.energy import energy_score
from tokenreduce.ops.merge import merge_source

from ..conftest import build_fixture_model, fixture_cases, load_case, run_forward_fixture, tiny_vit


@pytest.mark.parametrize("case", fixture_cases("pitome"))
def test_forward_fixture(case):
    results = run_forward_fixture("pitome", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


@pytest.mark.slow
def test_tokens_per_block_as_upstream():
    """The fixtures' recorded token counts per block follow from r = floor(T - T*ratio) evaluated literally."""
    spec, tensors = load_case("pitome", "deit_ratio0.9")
    model = build_fixture_model(spec["model"])
    tokenreduce.patch(model, "pitome", **spec["params"])
    with torch.no_grad():
        model(tensors["input"])
    assert tokenreduce.info(model).tokens_per_layer == tensors["tokens_in"].long().tolist()


def test_r_is_upstreams_literal_expression_then_clamped():
    assert pitome_r(10, 0.9) == 1          # floor(10 - 9.0); floor(10 * (1 - 0.9)) would give 0
    assert pitome_r(196, 0.9) == 19
    assert pitome_r(40, 0.925) == 3        # 40 - 37.0 exactly
    assert pitome_r(196, 0.3) == 98        # clamped to half: every merge needs a partner
    assert pitome_r(1, 0.5) == 0 and pitome_r(0, 0.5) == 0
    assert pitome_r(50, 1.0) == 0


def test_margin_schedule_and_variants():
    assert margin_schedule(None, 12) == [0.75 - 0.75 * i / 12 for i in range(12)]
    assert margin_schedule(0.5, 3) == [0.5, 0.5, 0.5]
    assert margin_schedule([0.1, 0.2], 2) == [0.1, 0.2]
    with pytest.raises(ValueError, match="margin lists 2 values but the model has 3 blocks"):
        margin_schedule([0.1, 0.2], 3)
    assert bsm_blocks(None, 12) == frozenset(range(6)) and bsm_blocks(None, 7) == frozenset(range(4))
    assert bsm_blocks(3, 12) == frozenset({0, 1, 2}) and bsm_blocks([1, 5], 12) == frozenset({1, 5})
    with pytest.raises(ValueError, match="out of range"):
        bsm_blocks([12], 12)


# ---------------------------------------------------------------------------------------------------------------
def reference_groups(metric, r, margin, bsm):
    """One sample, plain Python, from the upstream description: output groups (input positions) in order."""
    t = metric.shape[0]
    unit = [row / row.norm() for row in metric]
    cos = [[float(unit[i] @ unit[j]) for j in range(t)] for i in range(t)]
    energy = [sum((c - margin) if c - margin > 0 else math.exp(c - margin) - 1 for c in cos[i]) / t
              for i in range(t)]
    order = sorted(range(t), key=lambda i: -energy[i])
    if bsm:
        a, b = order[0::2], order[1::2]
        best = [max(range(len(b)), key=lambda j: (cos[i][b[j]], -j)) for i in a]
        node_max = [cos[i][b[j]] for i, j in zip(a, best)]
        ranked = sorted(range(len(a)), key=lambda k: -node_max[k])
        merged, kept = ranked[:r], ranked[r:]
        b_groups = [[x] for x in b]
        for k in merged:
            b_groups[best[k]].append(a[k])
        return [[a[k]] for k in kept] + [sorted(g) for g in b_groups]
    a, b, rest = order[0:2 * r:2], order[1:2 * r:2], order[2 * r:]
    b_groups = [[x] for x in b]
    for i in a:
        b_groups[max(range(len(b)), key=lambda j: (cos[i][b[j]], -j))].append(i)
    return [[x] for x in rest] + [sorted(g) for g in b_groups]


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("t,r", [(9, 2), (16, 8), (17, 1), (30, 7)])
def test_variants_match_reference(bsm, t, r):
    g = torch.Generator().manual_seed(t * 7 + r)
    metric = torch.randn(3, t, 6, generator=g, dtype=torch.float64)
    margin = 0.3
    order = energy_score(metric, margin).argsort(dim=-1, descending=True, stable=True)
    variant = energy_bipartite_assign if bsm else energy_protected_assign
    assign, num_out = variant(F.normalize(metric, dim=-1), order, r)
    assert num_out == t - r
    source = merge_source(torch.eye(t, dtype=torch.float64).expand(3, t, t), assign, num_out)
    for b in range(3):
        got = [row.nonzero().flatten().tolist() for row in source[b]]
        assert got == reference_groups(metric[b], r, margin, bsm)


# ---------------------------------------------------------------------------------------------------------------
def _images(b=2, hw=32):
    return torch.randn(b, 3, hw, hw)


def _run(model, x, **params):
    tokenreduce.patch(model, "pitome", trace_source=True, **params)
    with torch.no_grad():
        out = model(x)
    return out, tokenreduce.info(model)


def test_ratio_one_is_the_unpatched_model():
    model, x = tiny_vit(), _images()
    with torch.no_grad():
        expected = model(x)
    out, info = _run(model, x, ratio=1.0)
    assert torch.equal(out, expected) and info.tokens_per_layer == [65] * 4


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.49])
def test_low_ratios_clamp_to_half(ratio):
    """Upstream crashes below 0.5; here r is clamped to half the unprotected tokens, like ToMe."""
    out, info = _run(tiny_vit(), _images(), ratio=ratio)
    n, expected = 64, []
    for _ in range(4):
        expected.append(n + 1)
        n -= pitome_r(n, ratio)
    assert info.tokens_per_layer == expected and torch.isfinite(out).all()


def test_r_reaching_zero_in_late_blocks():
    """Upstream crashes when r reaches 0 in a protected-variant block (e.g. ratio 0.99 on 196 patches)."""
    out, info = _run(tiny_vit(depth=6), _images(), ratio=0.97)
    assert info.tokens_per_layer == [65, 64, 63, 62, 61, 60]  # r = 1 while T >= 34, in every block here
    out, info = _run(tiny_vit(depth=6), _images(), ratio=0.99)
    assert info.tokens_per_layer == [65] * 6 and torch.isfinite(out).all()


def test_distillation_token_is_protected():
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                       num_classes=5).eval()
    out, info = _run(model, _images(), ratio=0.8)
    assert info.tokens_per_layer == [66, 54, 44, 36]  # T = 64 patch tokens (not 65), r = floor(T - 0.8 T)
    assert torch.equal(info.source[:, :2, :2], torch.eye(2).expand(2, 2, 2))
    assert torch.equal(info.source[:, 2:, :2], torch.zeros(2, info.source.shape[1] - 2, 2))
    assert torch.isfinite(out).all()


def test_prefix_tokens_with_registers():
    model = tiny_vit(reg_tokens=3)
    out, info = _run(model, _images(), ratio=0.8)
    assert torch.equal(info.size[:, :4], torch.ones(2, 4))
    assert torch.equal(info.source[:, :4, :4], torch.eye(4).expand(2, 4, 4))


def test_no_class_token_model():
    out, info = _run(tiny_vit(class_token=False, global_pool="avg"), _images(), ratio=0.9)
    assert info.tokens_per_layer[:2] == [64, 58] and torch.isfinite(out).all()


def test_options_change_the_result_and_defaults_are_explicit():
    x = _images()
    base, info = _run(tiny_vit(), x, ratio=0.8)
    same, _ = _run(tiny_vit(), x, ratio=0.8, margin=[0.75 - 0.75 * i / 4 for i in range(4)], alpha=1.0,
                   bsm_layers=2, prop_attn=False)
    assert torch.equal(base, same)
    for params in ({"margin": 0.0}, {"alpha": 0.2}, {"bsm_layers": 0}, {"bsm_layers": [0, 1, 2, 3]},
                   {"prop_attn": True}):
        other, other_info = _run(tiny_vit(), x, ratio=0.8, **params)
        assert other_info.tokens_per_layer == info.tokens_per_layer
        assert not torch.equal(other, base), params


def test_bfloat16_model():
    out, info = _run(tiny_vit().to(torch.bfloat16), _images().to(torch.bfloat16), ratio=0.8)
    assert info.tokens_per_layer == [65, 53, 43, 35] and torch.isfinite(out.float()).all()


def test_prop_attn_uses_the_size_bias():
    model = tiny_vit()
    tokenreduce.patch(model, "pitome", ratio=0.8, prop_attn=True)
    method = tokenreduce.api._adapter_of(model).method
    size = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(method.attention_bias(size), size.log()[:, None, None, :])
    tokenreduce.patch(model, "pitome", ratio=0.8)
    assert tokenreduce.api._adapter_of(model).method.attention_bias(size) is None


class TestErrors:
    @pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.01, 2, "0.9", True, None, float("nan")])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ValueError, match="ratio"):
            tokenreduce.patch(tiny_vit(), "pitome", ratio=ratio)

    @pytest.mark.parametrize("params,match", [
        ({"margin": "0.5"}, "margin"), ({"margin": []}, "margin"), ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"), ({"bsm_layers": -1}, "bsm_layers"), ({"bsm_layers": 1.5}, "bsm_layers"),
        ({"prop_attn": 1}, "prop_attn")])
    def test_bad_values(self, params, match):
        with pytest.raises(ValueError, match=match):
            tokenreduce.patch(tiny_vit(), "pitome", ratio=0.9, **params)

    @pytest.mark.parametrize("params,match", [
        ({"margin": [0.5] * 3}, "margin lists 3 values but the model has 4 blocks"),
        ({"bsm_layers": 5}, "bsm_layers=5 but the model has 4 blocks"),
        ({"bsm_layers": [0, 4]}, "out of range")])
    def test_geometry_errors_leave_the_model_untouched(self, params, match):
        model = tiny_vit()
        with pytest.raises(ValueError, match=match):
            tokenreduce.patch(model, "pitome", ratio=0.9, **params)
        assert not tokenreduce.is_patched(model)
        assert all("forward" not in blk.__dict__ for blk in model.blocks)
