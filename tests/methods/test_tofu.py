"""ToFu (no official code, so no fixtures): a per-sample loop-level reference written from the paper's semantics
(tests/methods/_token_reference.py) on timm variants and the HF CLIP tower, the prune / MLERP ops, and the method's
contracts."""
import copy

import pytest
import torch

import tokenreduce
from tokenreduce.core import Geometry, TokenState
from tokenreduce.methods.tofu import default_merge_from
from tokenreduce.ops.matching import bipartite_soft_matching
from tokenreduce.ops.merge import merge_weighted
from tokenreduce.ops.tofu import bipartite_sources, merge_mlerp, merge_prune, representatives

from ..conftest import tiny_vit
from ._token_reference import Clip, Timm, tofu_reference


# ---------------------------------------------------------------------------------------------------------------
# the ops
def _match(t=11, p=1, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, t, 6, generator=g, dtype=torch.float64)
    x = torch.randn(2, t, 5, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, t, dtype=torch.float64)[:, None]
    size = torch.randint(1, 4, (2, t), generator=g).double()
    match = bipartite_soft_matching(keys, r, p)
    return x, size, match.assign, match.num_out


def test_sources_are_the_merged_a_tokens():
    _, _, assign, m = _match()
    src = bipartite_sources(assign, m)
    assert src.sum(1).tolist() == [4, 4] and not src[:, 1::2].any() and not src[:, 0].any()
    rep = representatives(assign, src, m)
    assert (rep >= 0).all() and torch.equal(assign.gather(1, rep), torch.arange(m).expand(2, m))


def test_prune_keeps_each_destination_bit_for_bit():
    x, _, assign, m = _match()
    src = bipartite_sources(assign, m)
    out = merge_prune(x, assign, src, m)
    for b in range(2):
        for slot in range(m):
            members = (assign[b] == slot).nonzero().flatten().tolist()
            keep = [i for i in members if not src[b, i]]
            assert len(keep) == 1 and torch.equal(out[b, slot], x[b, keep[0]])


def test_mlerp_preserves_the_largest_norm_and_the_mean_direction():
    x, size, assign, m = _match()
    src = bipartite_sources(assign, m)
    out = merge_mlerp(x, size, assign, src, m)
    mean = merge_weighted(x, size, assign, m)[0]
    for b in range(2):
        for slot in range(m):
            members = (assign[b] == slot).nonzero().flatten().tolist()
            if len(members) == 1:
                assert torch.equal(out[b, slot], x[b, members[0]])  # untouched tokens are exact
                continue
            peak = max(float(x[b, i].norm()) for i in members)
            assert abs(float(out[b, slot].norm()) - peak) < 1e-12
            cos = float(out[b, slot] @ mean[b, slot]) / float(out[b, slot].norm() * mean[b, slot].norm())
            assert abs(cos - 1) < 1e-12
            assert float(mean[b, slot].norm()) < peak  # what averaging loses and MLERP restores


def test_mlerp_of_cancelling_tokens_stays_finite():
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    assign = torch.tensor([[0, 0, 1]])
    src = torch.tensor([[True, False, False]])
    out = merge_mlerp(x, torch.ones(1, 3, dtype=torch.float64), assign, src, 2)
    assert torch.equal(out, torch.tensor([[[0.0, 0.0], [0.0, 2.0]]], dtype=torch.float64))


def test_default_split_follows_opentome():
    assert default_merge_from(12) == 7 and default_merge_from(4) == 3 and default_merge_from(24) == 13


# ---------------------------------------------------------------------------------------------------------------
# against the loop-level reference
def _images(b=2, hw=32, seed=0):
    return torch.randn(b, 3, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _compare(model, fam_cls, images, key="logits", **params):
    reference = copy.deepcopy(model)
    tokenreduce.patch(model, "tofu", trace_source=True, **params)
    with torch.no_grad():
        out = model(images)
        expected = [tofu_reference(fam_cls(reference), image, **params) for image in images]
    info = tokenreduce.info(model)
    got = out if torch.is_tensor(out) else getattr(out, key)
    torch.testing.assert_close(got, torch.cat([e[key] for e in expected]), atol=1e-10, rtol=1e-10)
    assert torch.equal(info.size, torch.cat([e["size"] for e in expected]))
    assert torch.equal(info.source, torch.cat([e["source"] for e in expected]))
    return info


@pytest.mark.parametrize("params", [
    dict(r=6),                    # blocks 0-2 prune, block 3 merges (L // 2 + 1 = 3)
    dict(r=6, merge_from=0),      # MLERP everywhere
    dict(r=6, merge_from=4),      # pruning everywhere
    dict(r=[10, 0, 8, 12], merge_from=2),
    dict(r=8, prop_attn=False, merge_from=1),
])
def test_matches_reference(params):
    info = _compare(tiny_vit().double(), Timm, _images(), **params)
    assert info.size.sum(1).tolist() == [65.0, 65.0]  # every input token is still counted


@pytest.mark.parametrize("variant", ["registers", "distilled", "no_cls_avg", "layerscale_qknorm"])
def test_matches_reference_on_timm_variants(variant):
    if variant == "distilled":
        from timm.models.deit import VisionTransformerDistilled
        torch.manual_seed(0)
        model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                           num_classes=10, qkv_bias=True).double().eval()
    else:
        kw = {"registers": dict(reg_tokens=4), "no_cls_avg": dict(class_token=False, global_pool="avg"),
              "layerscale_qknorm": dict(init_values=0.3, qk_norm=True)}[variant]
        model = tiny_vit(**kw).double()
    info = _compare(model, Timm, _images(), r=6, merge_from=2)
    p = model.num_prefix_tokens
    if p:
        assert torch.equal(info.source[:, :p, :p], torch.eye(p, dtype=info.source.dtype).expand(2, p, p))
        assert info.source[:, :p].sum(-1).eq(1).all() and info.source[:, p:, :p].eq(0).all()


def _clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                           image_size=32, patch_size=4)
    return CLIPVisionModel(cfg).double().eval()


@pytest.mark.parametrize("key", ["pooler_output", "last_hidden_state"])
def test_clip_tower_matches_reference(key):
    info = _compare(_clip(), Clip, _images(), key=key, r=6, merge_from=2)
    assert info.tokens_per_layer == [65, 59, 53, 47]


# ---------------------------------------------------------------------------------------------------------------
# contracts
def test_zero_reduction_is_the_unpatched_model():
    model, x = tiny_vit(), _images().float()
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="reduces nothing"):
        tokenreduce.patch(model, "tofu", r=0)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_batch_equals_each_sample_alone():
    model, x = tiny_vit().double(), _images(b=3)
    tokenreduce.patch(model, "tofu", r=8, merge_from=2, trace_source=True)
    with torch.no_grad():
        batch = model(x)
        info = tokenreduce.info(model)
        for i in range(3):
            alone = model(x[i:i + 1])
            torch.testing.assert_close(alone, batch[i:i + 1], atol=1e-12, rtol=1e-12)
            assert torch.equal(tokenreduce.info(model).size, info.size[i:i + 1])
            assert torch.equal(tokenreduce.info(model).source, info.source[i:i + 1])


def test_unpatch_is_exact_and_state_dict_untouched():
    model, x = tiny_vit(), _images().float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "tofu", r=8)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.state_dict().keys() == before.keys()
    tokenreduce.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_prune_and_merge_blocks_differ_from_tome():
    """ToFu is ToMe's matching with another way of combining a group: same token counts, other values."""
    model, x = tiny_vit().double(), _images()
    tokenreduce.patch(model, "tome", r=6)
    with torch.no_grad():
        tome = model(x)
    counts = tokenreduce.info(model).tokens_per_layer
    tokenreduce.patch(model, "tofu", r=6)
    with torch.no_grad():
        tofu = model(x)
    assert tokenreduce.info(model).tokens_per_layer == counts
    assert not torch.allclose(tofu, tome)


@pytest.mark.parametrize("params, message", [
    (dict(r=-1), "r must be"),
    (dict(merge_from=-1), ">= 0"),
    (dict(merge_from=1.5), "must be an int"),
    (dict(prop_attn=1), "True or False"),
])
def test_invalid_parameters_are_refused(params, message):
    model = tiny_vit()
    with pytest.raises(ValueError, match=message):
        tokenreduce.patch(model, "tofu", **params)
    assert not tokenreduce.is_patched(model)


def test_training_backward():
    model = tiny_vit().train()
    tokenreduce.patch(model, "tofu", r=8, merge_from=2)
    model(_images().float()).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks[0].attn.qkv.parameters())


@pytest.mark.parametrize("prune", [True, False])
def test_reduce_compiles_fullgraph(prune):
    method = tokenreduce.build_method("tofu", Geometry(num_blocks=4, num_prefix=1, num_patches=64, dim=48,
                                                       num_heads=3), r=6, merge_from=4 if prune else 0)
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 65, 48, generator=g), torch.randn(2, 65, 16, generator=g)

    def run(x, keys):
        out = method.reduce(TokenState(x=x, size=torch.ones(2, 65), num_prefix=1, layer=1, keys=keys))
        return out.x, out.size

    eager = run(x, keys)
    compiled = torch.compile(run, fullgraph=True, backend="eager")(x, keys)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    assert eager[0].shape == (2, 59, 48)


def test_torch_compile_fullgraph_model():
    """The whole patched model compiles without a graph break."""
    x = _images().float()
    model = tiny_vit()
    tokenreduce.patch(model, "tofu", r=6)
    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, eager)
