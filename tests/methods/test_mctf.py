"""MCTF against the official implementation's recorded outputs (../shared/fixtures/mctf), a per-sample loop-level
reference (tests/methods/_token_reference.py) on timm variants and the HF CLIP tower, and the method's contracts."""
import copy

import pytest
import torch

import tokenreduce
from tokenreduce.methods.mctf import MCTF
from tokenreduce.core import Geometry, Site, TokenState
from tokenreduce.ops.mctf import (bidirectional_assign, criteria_scores, mctf_r, merge_attention,
                                  merged_attention_output, split_positions)

from ..conftest import build_fixture_model, fixture_cases, load_case, run_forward_fixture, tiny_vit
from ._token_reference import Clip, Timm, mctf_reference


@pytest.mark.parametrize("case", fixture_cases("mctf"))
def test_forward_fixture(case):
    results = run_forward_fixture("mctf", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vit_d12_r16", "vit_d12_fast_r0.35", "vit_d12_r20_clamp"])
def test_reference_reproduces_fixture(case):
    """The loop-level reference is itself checked against upstream, so the tests below compare against upstream's
    semantics where no fixture exists (other prefixes, LayerScale, CLIP)."""
    spec, t = load_case("mctf", case)
    model = build_fixture_model(spec["model"])
    params = {k: v for k, v in spec["params"].items() if k != "trace_source"}
    with torch.no_grad():
        outs = [mctf_reference(Timm(model), image, **params) for image in t["input"]]
    torch.testing.assert_close(torch.cat([o["logits"] for o in outs]), t["logits"], atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.cat([o["size"] for o in outs]), t["size"].double())
    assert torch.equal(torch.cat([o["source"] for o in outs]), t["source"].double())


# ---------------------------------------------------------------------------------------------------------------
# the ops
def test_r_follows_upstreams_clamps():
    # The README's worked counts: fraction 0.35 gives 68, 44, 29 on 197, 129, 85 tokens (CLS excluded).
    assert [mctf_r(0.35, t, 1) for t in (197, 129, 85)] == [68, 44, 29]
    # r = 20 in every block: ... 37 -> 18 (half), 19 -> 9 (T - r < 10 gives r = T - 10), 10 -> 0.
    assert [mctf_r(20, t, 1) for t in (197, 37, 19, 10)] == [20, 18, 9, 0]
    assert mctf_r(0.35, 10, 1) == 0 and mctf_r(16, 7, 1) == 0  # fewer than 10 tokens: nothing (upstream crashes)
    assert mctf_r(16, 201, 5) == 16 and mctf_r(0.5, 201, 5) == 98  # registers are not counted


def test_split_positions_exclude_prefix():
    a, b = split_positions(9, 1)
    assert a.tolist() == [2, 4, 6, 8] and b.tolist() == [1, 3, 5, 7]
    a, b = split_positions(9, 2)
    assert a.tolist() == [2, 4, 6, 8] and b.tolist() == [3, 5, 7]
    a, b = split_positions(6, 0)
    assert a.tolist() == [0, 2, 4] and b.tolist() == [1, 3, 5]


def test_merged_attention_keeps_rows_stochastic():
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64).softmax(-1)
    x = torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
    received, size = attn.mean(dim=(1, 2)), torch.ones(2, 9, dtype=torch.float64)
    a_pos, b_pos = split_positions(9, 1)
    assign, m = bidirectional_assign(criteria_scores(x, received, size, a_pos, b_pos, 1, 20, 40), 3, a_pos, b_pos, 9, 1)
    assert m == 6 and assign[:, 0].eq(0).all()
    merged = merge_attention(attn, assign, m, received)
    torch.testing.assert_close(merged.sum(-1), torch.ones(2, 3, m, dtype=torch.float64))
    merged_max = merge_attention(attn, assign, m, None)
    assert (merged_max.sum(-1) >= merged.sum(-1) - 1e-12).all()  # a row-wise maximum dominates any weighted mean


def test_factored_output_is_the_merged_map_times_v():
    """``attn @ v[assign]`` then pooled rows is the merged map times the merged values, without building the map."""
    g = torch.Generator().manual_seed(2)
    attn = torch.randn(2, 3, 11, 11, generator=g, dtype=torch.float64).softmax(-1)
    x = torch.randn(2, 11, 8, generator=g, dtype=torch.float64)
    received, size = attn.mean(dim=(1, 2)), torch.rand(2, 11, generator=g, dtype=torch.float64) + 1
    a_pos, b_pos = split_positions(11, 1)
    scores = criteria_scores(x, received, size, a_pos, b_pos, 1, 20, 40)
    assign, m = bidirectional_assign(scores, 4, a_pos, b_pos, 11, 1)
    weight = received * size
    v = torch.randn(2, 3, m, 5, generator=g, dtype=torch.float64)
    expected = merge_attention(attn, assign, m, weight) @ v
    torch.testing.assert_close(merged_attention_output(attn, assign, weight, v), expected, atol=1e-14, rtol=1e-14)


def test_criteria_drop_at_zero_temperature():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 7, 4, generator=g, dtype=torch.float64)
    received = torch.rand(1, 7, generator=g, dtype=torch.float64) + 0.1
    size = torch.tensor([[1.0, 2, 1, 3, 1, 1, 4]], dtype=torch.float64)
    a_pos, b_pos = split_positions(7, 1)
    assert torch.equal(criteria_scores(x, received, size, a_pos, b_pos, 0, 0, 0), torch.ones(1, 3, 3, dtype=torch.float64))
    only_size = criteria_scores(x, received, size, a_pos, b_pos, 0, 0, 1)
    z = (1 / size) / (1 / size).max()
    torch.testing.assert_close(only_size, z[:, a_pos, None] * z[:, None, b_pos])


# ---------------------------------------------------------------------------------------------------------------
# against the loop-level reference
def _images(b=2, hw=32, seed=0):
    return torch.randn(b, 3, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _timm(**kw):
    model = tiny_vit(**kw).double()
    with torch.no_grad():  # sharper attention than the init's, so the criteria separate the tokens
        for blk in model.blocks:
            blk.attn.qkv.weight.add_(torch.randn_like(blk.attn.qkv.weight) * 0.1)
    return model


def _compare(model, fam_cls, images, key="logits", **params):
    reference = copy.deepcopy(model)
    tokenreduce.patch(model, "mctf", trace_source=True, **params)
    with torch.no_grad():
        out = model(images)
        expected = [mctf_reference(fam_cls(reference), image, **params) for image in images]
    info = tokenreduce.info(model)
    got = out if torch.is_tensor(out) else getattr(out, key)
    torch.testing.assert_close(got, torch.cat([e[key] for e in expected]), atol=1e-10, rtol=1e-10)
    assert torch.equal(info.size, torch.cat([e["size"] for e in expected]))
    assert torch.equal(info.source, torch.cat([e["source"] for e in expected]))
    return info


@pytest.mark.parametrize("pooling", ["attn", "size", "mean", "max"])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_matches_reference_modes_and_poolings(mode, pooling):
    info = _compare(_timm(), Timm, _images(), r=6, one_step_ahead=mode, pooling=pooling)
    assert info.size.shape[1] == 65 - 3 * 6


@pytest.mark.parametrize("params", [
    dict(bidirectional=False, one_step_ahead=1),
    dict(bidirectional=False, one_step_ahead=0, pooling="size"),
    dict(prop_attn=False, one_step_ahead=2),
    dict(tau_sim=0, tau_info=5, tau_size=0),
    dict(tau_sim=2, tau_info=0, tau_size=10),
    dict(r=0.3, layers=[0, 2]),
    dict(r=13, layers=[0, 1, 2, 3]),  # 65 -> 52 -> 39 -> 26 -> 14: the half-of-the-tokens clamp in the last block
    dict(r=1, one_step_ahead=1),      # bidirectional with r1 = 0: only the B -> A stage merges
])
def test_matches_reference_options(params):
    _compare(_timm(), Timm, _images(), **{"r": 6, **params})


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("variant", ["registers", "distilled", "no_cls_avg", "layerscale_qknorm"])
def test_matches_reference_on_timm_variants(variant, mode):
    if variant == "distilled":
        from timm.models.deit import VisionTransformerDistilled
        torch.manual_seed(0)
        model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                           num_classes=10, qkv_bias=True).double().eval()
    else:
        kw = {"registers": dict(reg_tokens=4), "no_cls_avg": dict(class_token=False, global_pool="avg"),
              "layerscale_qknorm": dict(init_values=0.3, qk_norm=True)}[variant]
        model = _timm(**kw)
    info = _compare(model, Timm, _images(), r=6, one_step_ahead=mode)
    p = model.num_prefix_tokens
    if p:  # prefix tokens stay first and alone
        assert torch.equal(info.source[:, :p, :p], torch.eye(p, dtype=info.source.dtype).expand(2, p, p))
        assert info.source[:, :p].sum(-1).eq(1).all() and info.source[:, p:, :p].eq(0).all()


def _clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                           image_size=32, patch_size=4)
    model = CLIPVisionModel(cfg).double().eval()
    with torch.no_grad():
        for layer in getattr(model, "vision_model", model).encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.add_(torch.randn_like(proj.weight) * 0.1)
    return model


@pytest.mark.parametrize("mode", [0, 2])
def test_clip_tower_matches_reference(mode):
    model = _clip()
    info = _compare(model, Clip, _images(), key="pooler_output", r=6, one_step_ahead=mode)
    assert info.tokens_per_layer == ([65, 65, 59, 53] if mode == 0 else [65, 59, 53, 47])
    tokenreduce.unpatch(model)
    model2 = copy.deepcopy(model)
    _compare(model2, Clip, _images(), key="last_hidden_state", r=6, one_step_ahead=mode, pooling="max")


def test_clip_refuses_reused_attention_with_the_reason():
    model = _clip()
    with pytest.raises(ValueError, match=r"reads \['attention_probs'\].*use one_step_ahead=2 .* or 0"):
        tokenreduce.patch(model, "mctf", r=6)  # the default one_step_ahead=1
    assert not tokenreduce.is_patched(model)


# ---------------------------------------------------------------------------------------------------------------
# contracts
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_zero_reduction_is_the_unpatched_model(mode):
    model, x = tiny_vit(), _images().float()
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="reduces nothing"):
        tokenreduce.patch(model, "mctf", r=0, one_step_ahead=mode)
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, expected)
    assert tokenreduce.info(model).tokens_per_layer == [65] * 4


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_batch_equals_each_sample_alone(mode):
    model, x = _timm(), _images(b=3)
    tokenreduce.patch(model, "mctf", r=8, one_step_ahead=mode, trace_source=True)
    with torch.no_grad():
        batch = model(x)
        size, source = tokenreduce.info(model).size, tokenreduce.info(model).source
        for i in range(3):
            alone = model(x[i:i + 1])
            torch.testing.assert_close(alone, batch[i:i + 1], atol=1e-12, rtol=1e-12)
            assert torch.equal(tokenreduce.info(model).size, size[i:i + 1])
            assert torch.equal(tokenreduce.info(model).source, source[i:i + 1])


def test_unpatch_is_exact_and_state_dict_untouched():
    model, x = tiny_vit(), _images().float()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "mctf", r=8)
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    with torch.no_grad():
        assert not torch.equal(model(x), expected)
    tokenreduce.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_site_follows_one_step_ahead():
    assert MCTF.site_for({"one_step_ahead": 0}) == Site.BLOCK_OUT
    assert MCTF.site_for({"one_step_ahead": 1}) == MCTF.site_for({"one_step_ahead": 2}) == Site.BLOCK_IN
    model = tiny_vit()
    tokenreduce.patch(model, "mctf", r=4, one_step_ahead=0)
    assert tokenreduce.api.method_of(model).site == Site.BLOCK_OUT
    with torch.no_grad():
        model(_images().float())
    assert tokenreduce.info(model).tokens_per_layer == [65, 65, 61, 57]  # merges after blocks 1, 2, 3


def test_upstream_names_are_aliases():
    model, x = _timm(), _images()
    tokenreduce.patch(model, "mctf", r=6, layers=[1, 3], pooling="size", bidirectional=False)
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "mctf", r_eval=6, activate_layer=[1, 3], pooling_type=0, bidirection=False)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("params, message", [
    (dict(r=1.5), "fraction 0 < r < 1"),
    (dict(r=-1), "int >= 0"),
    (dict(one_step_ahead=3), "one_step_ahead must be 0"),
    (dict(one_step_ahead=True), "one_step_ahead must be 0"),
    (dict(pooling="median"), "pooling must be"),
    (dict(tau_info=-1), ">= 0"),
    (dict(layers=[2, 1]), "strictly increasing"),
    (dict(layers=[4]), "out of range"),
])
def test_invalid_parameters_are_refused(params, message):
    model = tiny_vit()
    with pytest.raises(ValueError, match=message):
        tokenreduce.patch(model, "mctf", **params)
    assert not tokenreduce.is_patched(model)


def test_eager_attention_path_matches_fused_and_counts_its_logits():
    """A block whose attention computes its own logits (timm's non-fused path) gets the merged map as its softmax:
    the same outputs as the fused path, which runs no ``q·kᵀ`` on the merged tokens and counts ``P·V`` over the
    unmerged keys instead (``CostModel``: ``attn_quadratic / 2 · N²`` in place of ``attn_quadratic · M²``)."""
    fused, x = _timm(), _images()
    eager = copy.deepcopy(fused)
    for blk in eager.blocks:
        blk.attn.fused_attn = False
    for model in (fused, eager):
        tokenreduce.patch(model, "mctf", r=6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), atol=1e-12, rtol=1e-12)
    info_fused, info_eager = tokenreduce.info(fused), tokenreduce.info(eager)
    assert info_fused.tokens_per_layer == info_eager.tokens_per_layer
    cost = tokenreduce.api._adapter_of(fused).host.cost(0.0)
    rec = tokenreduce.api._adapter_of(fused).record
    extra = sum(cost.attn_quadratic[l.layer] * (l.tokens_in ** 2 - 0.5 * l.tokens_preview ** 2)
                for l in rec.layers if l.tokens_preview)
    assert extra > 0 and all(l.pv_tokens == l.tokens_preview for l in rec.layers)
    assert info_eager.macs - info_fused.macs == pytest.approx(extra, abs=1)


def test_training_backward_flows_through_merged_attention():
    model = tiny_vit().train()
    tokenreduce.patch(model, "mctf", r=8)
    model(_images().float()).sum().backward()
    grads = [p.grad for p in model.blocks[2].attn.qkv.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_reduce_compiles_fullgraph(mode):
    """The method's whole tensor work (criteria, matching, pooling, merged attention) traces without a graph break:
    every shape is static per configuration."""
    method = tokenreduce.build_method("mctf", Geometry(num_blocks=4, num_prefix=1, num_patches=64, dim=48,
                                                       num_heads=3), r=6, one_step_ahead=mode)
    g = torch.Generator().manual_seed(0)
    x, attn = torch.randn(2, 65, 48, generator=g), torch.randn(2, 3, 65, 65, generator=g).softmax(-1)

    def run(x, attn):
        out = method.reduce(TokenState(x=x, size=torch.ones(2, 65), num_prefix=1, layer=1, attn=attn))
        return out.x, out.size, out.carry.probs.dense() if mode == 1 else out.size

    eager = run(x, attn)
    compiled = torch.compile(run, fullgraph=True, backend="eager")(x, attn)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    assert eager[0].shape == (2, 59, 48)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_torch_compile_fullgraph_model(mode):
    """The whole patched model compiles without a graph break in every mode (BLOCK_IN's preview included)."""
    x = _images().float()
    model = tiny_vit()
    tokenreduce.patch(model, "mctf", r=6, one_step_ahead=mode)
    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, eager)


@pytest.mark.slow
def test_torch_compile_inductor_reused_attention():
    """Mode 1 (the merged attention map replacing the block's softmax) through inductor, not only Dynamo."""
    model, x = tiny_vit(), _images().float()
    tokenreduce.patch(model, "mctf", r=6, one_step_ahead=1)
    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)


def test_projections_nobody_reads_are_not_computed():
    """The look-ahead pass computes only q and k (not v) on the block's input; a block given the merged map computes
    only v (not q, k) on the merged tokens: the qkv linear's MACs, counted by FlopCounterMode, are exactly those,
    and ``info().macs`` leaves the skipped columns out."""
    from torch.utils.flop_counter import FlopCounterMode
    model, x = _timm(), _images()
    tokenreduce.patch(model, "mctf", r=6)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    counts = {name.split("VisionTransformer.")[-1]: sum(v.values()) for name, v in counter.get_flop_counts().items()}
    rec = tokenreduce.api._adapter_of(model).record
    width = model.blocks[0].attn.qkv.in_features  # q, k and v are each this wide here
    acted = 0
    for layer in rec.layers:
        got = counts[f"blocks.{layer.layer}.attn.qkv"] / (2 * x.shape[0])
        if layer.tokens_preview:
            acted += 1
            assert got == width * width * (2 * layer.tokens_preview + layer.tokens_in)
            assert layer.linear_skipped == width * width * (layer.tokens_preview + 2 * layer.tokens_in)
        else:
            assert got == 3 * width * width * layer.tokens_in and layer.linear_skipped == 0
    assert acted == 3
    cost = tokenreduce.api._adapter_of(model).host.cost(0.0)
    full = cost.macs([(l.tokens_in, l.tokens_mid, l.tokens_preview, l.pv_tokens) for l in rec.layers])
    assert full - cost.macs(rec.cost_blocks()) == sum(l.linear_skipped for l in rec.layers)
