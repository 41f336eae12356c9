"""EViT against the official implementation's recorded outputs (../shared/fixtures/evit), a per-sample loop-level
float64 reference (tests/methods/_sample_reference.py) on timm variants and the HF CLIP tower, and the contracts."""
import copy
import math

import pytest
import torch

import tokenreduce
from tokenreduce.api import method_of
from tokenreduce.ops.evit import evit_keep_count, topk_by_score
from tokenreduce.ops.pruning import keep_count

from ..conftest import fixture_cases, run_forward_fixture
from ._sample_reference import VARIANTS, Tokens, clip, forward, images, source_matrix, take, vit
from ._token_reference import Clip, Timm


@pytest.mark.parametrize("case", fixture_cases("evit"))
def test_forward_fixture(case):
    results = run_forward_fixture("evit", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


# ---------------------------------------------------------------------------------------------------------------
# the reference: EViT's step written out with lists
def evit_step(specs, fuse, p):
    def step(layer, t: Tokens, a):
        n = t.x.shape[0]
        present = n - p
        spec = specs[layer]
        k = math.ceil(spec * present) if isinstance(spec, float) else spec  # upstream's plain float product
        if k == present:
            return t
        heads = a.probs.shape[0]
        score = [sum(float(a.probs[h, 0, j]) for h in range(heads)) / heads for j in range(n)]
        ranked = sorted(range(p, n), key=lambda j: -score[j])
        kept, rest = ranked[:k], sorted(ranked[k:])
        out = take(t, list(range(p)) + kept)
        out.extra.setdefault("kept", {})[layer] = list(range(p)) + kept + ([-1] if fuse else [])
        if not fuse:
            return out
        fused = torch.zeros_like(t.x[0])
        for j in rest:
            fused = fused + score[j] * t.x[j]
        members = sorted(i for j in rest for i in t.members[j])
        return Tokens(torch.cat([out.x, fused[None]]), out.size + [sum(t.size[j] for j in rest)],
                      out.members + [members], out.extra)
    return step


def run_both(model, fam_cls, x, specs, fuse, key="logits"):
    reference = copy.deepcopy(model)
    layers = sorted(specs)
    tokenreduce.patch(model, "evit", layers=layers, keep=[specs[l] for l in layers], fuse=fuse)
    with torch.no_grad():
        out = model(x)
        expected = [forward(fam_cls(reference), image, specs, evit_step(specs, fuse, fam_cls(reference).num_prefix))
                    for image in x]
    got = out if torch.is_tensor(out) else getattr(out, key)
    torch.testing.assert_close(got, torch.cat([e[0][key] for e in expected]), atol=1e-10, rtol=1e-10)
    info = tokenreduce.info(model)
    for layer in layers:
        assert info.kept[layer].tolist() == [t.extra["kept"][layer] for _, t in expected]
    n0 = fam_cls(reference).embed(x[0]).shape[0]
    assert torch.equal(info.source, torch.stack([source_matrix(t.members, n0) for _, t in expected]))
    assert torch.equal(info.size, torch.tensor([t.size for _, t in expected], dtype=info.size.dtype))
    return info


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_reference_on_timm_variants(variant, fuse):
    kwargs = dict(VARIANTS[variant])
    model = vit(kwargs.pop("distilled", False), **kwargs)
    x = images(size=28 if variant == "dynamic_img_size" else 24)
    info = run_both(model, Timm, x, {0: 0.7, 1: 12, 2: 0.5}, fuse)
    p = model.num_prefix_tokens
    assert (info.kept[0][:, :p] == torch.arange(p)).all()  # prefix first, unchanged
    if fuse:
        assert (info.kept[0][:, -1] == -1).all() and (info.size[:, -1] > 1).all()


@pytest.mark.parametrize("fuse", [True, False])
def test_matches_reference_on_clip_tower(fuse):
    x = images(2, size=32)
    info = run_both(clip(), Clip, x, {1: 0.6, 2: 0.5}, fuse, key="pooler_output")
    assert info.tokens_per_layer == ([65, 65, 41, 22] if fuse else [65, 65, 40, 21])


# ---------------------------------------------------------------------------------------------------------------
# counts and schedule
def test_keep_count_is_upstreams_float_ceil():
    assert 0.55 * 100 > 55  # 55.00000000000001 in floating point: upstream keeps 56
    assert evit_keep_count(100, 0.55) == 56 and keep_count(100, 0.55) == 55
    assert [evit_keep_count(n, 0.7) for n in (196, 139, 99)] == [138, 98, 70]  # README's counts
    assert evit_keep_count(36, 12) == 12
    with pytest.raises(ValueError):
        evit_keep_count(10, 11)


def test_topk_by_score_keeps_prefix_then_descending():
    scores = torch.tensor([[9.0, 9.0, 0.1, 0.5, 0.3, 0.7]])
    assert topk_by_score(scores, 2, 3).tolist() == [[0, 1, 5, 3, 4]]


def test_defaults_are_the_papers_setting():
    model = vit(depth=12)
    x = images(2)
    tokenreduce.patch(model, "evit")
    with torch.no_grad():
        model(x)
    info = tokenreduce.info(model)
    # blocks 3, 6, 9 keep ceil(0.7 n) and add the fused token: 36 -> 26 + 1, 27 -> 19 + 1, 20 -> 14 + 1
    assert info.tokens_per_layer == [37] * 4 + [28] * 3 + [21] * 3 + [16] * 2
    assert method_of(model).planned_tokens()[3] == (37, 28)
    aliased = vit(depth=12)
    tokenreduce.patch(aliased, "evit", base_keep_rate=0.7, drop_loc=[3, 6, 9], fuse_token=True)
    with torch.no_grad():
        assert torch.equal(aliased(x), model(x))


def test_target_flops_meets_the_budget_with_the_fused_token():
    model = vit(depth=12)
    x = images(1)
    tokenreduce.patch(model, "evit", target_flops=0.6)
    with torch.no_grad():
        model(x)
    macs = tokenreduce.info(model).macs
    full = method_of(model).geometry.cost.macs([(37, 37)] * 12)
    assert macs <= 0.6 * full
    ratio = method_of(model).steps[3]
    looser = vit(depth=12)
    tokenreduce.patch(looser, "evit", keep_ratio=min(1.0, ratio + 0.06))
    with torch.no_grad():
        looser(x)
    assert tokenreduce.info(looser).macs > 0.6 * full


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        tokenreduce.patch(vit(), "evit", layers=[4], keep_ratio=0.5)
    with pytest.raises(ValueError, match="only 36"):
        tokenreduce.patch(vit(), "evit", layers=[0], keep=40)
    with pytest.raises(ValueError, match="only one of"):
        tokenreduce.patch(vit(), "evit", keep=10, keep_ratio=0.5)
    with pytest.raises(ValueError, match="no class token"):
        tokenreduce.patch(vit(class_token=False, global_pool="avg"), "evit")


# ---------------------------------------------------------------------------------------------------------------
# contracts
def test_zero_reduction_is_the_unpatched_model():
    model, x = vit(), images()
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match="reduces nothing"):
            tokenreduce.patch(model, "evit", keep_ratio=1.0)
        assert torch.equal(model(x), before)


def test_batch_equals_each_sample_alone():
    model, x = vit(reg_tokens=2), images(4)
    tokenreduce.patch(model, "evit", layers=[0, 2], keep_ratio=0.6)
    with torch.no_grad():
        batch = model(x)
        source = tokenreduce.info(model).source
        for s in range(x.shape[0]):
            torch.testing.assert_close(model(x[s:s + 1]), batch[s:s + 1], atol=1e-13, rtol=1e-13)
            assert torch.equal(tokenreduce.info(model).source[0], source[s])


def test_state_dict_and_unpatch_are_exact():
    model, x = vit(init_values=0.5), images()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        tokenreduce.patch(model, "evit", keep_ratio=0.5)
        assert set(model.state_dict()) == set(keys)
        assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
        assert not torch.equal(model(x), before)
        tokenreduce.unpatch(model)
        assert torch.equal(model(x), before)


def test_torch_compile_fullgraph():
    model, x = vit(), images()
    tokenreduce.patch(model, "evit", keep_ratio=0.5, layers=[0, 1, 2])
    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, eager)
    assert tokenreduce.info(model).tokens_per_layer == [37, 20, 12, 8]
