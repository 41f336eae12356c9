"""PPT against the official implementation's recorded outputs (../shared/fixtures/ppt), a per-sample loop-level
float64 reference (tests/methods/_sample_reference.py) on timm variants and the HF CLIP tower, and the contracts."""
import copy
import math

import pytest
import torch

import tokenreduce
from tokenreduce.ops.ppt import per_sample, pooling_policy, singleton_index

from ..conftest import build_fixture_model, fixture_cases, load_case, run_forward_fixture
from ._sample_reference import (VARIANTS, Tokens, clip, cls_row, forward, images, log_sizes, source_matrix, take,
                                value_norms, vit)
from ._token_reference import Clip, Timm


@pytest.mark.filterwarnings("ignore:ppt. r=50 in block 9:UserWarning")  # the README setting clamps in block 9
@pytest.mark.parametrize("case", fixture_cases("ppt"))
def test_forward_fixture(case):
    results = run_forward_fixture("ppt", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


@pytest.mark.parametrize("case", fixture_cases("ppt"))
def test_policy_per_image_as_recorded(case):
    """The fixtures also store (not compared by the checker) upstream's S_op and policy per PP block and image."""
    spec, t = load_case("ppt", case)
    model = build_fixture_model(spec["model"])
    with pytest.warns(UserWarning, match="clamped"):
        tokenreduce.patch(model, "ppt", **spec["params"])
    with torch.no_grad():
        model(t["input"])
    run = tokenreduce.info(model).method_state
    layers = sorted(run.pooled)
    assert layers == spec["params"]["layers"]
    pooled = torch.stack([run.pooled[layer] for layer in layers])
    assert torch.equal(pooled, t["policy"] == 0)
    torch.testing.assert_close(torch.stack([run.s_op[layer] for layer in layers]), t["s_op"].double(),
                               atol=1e-15, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# the reference: one PP block written out with lists
def bipartite_pool(t: Tokens, a, r: int, p: int) -> Tokens:
    """ToMe's bipartite soft matching on the head-mean keys, loops only (prefix tokens protected and first)."""
    n = t.x.shape[0]
    keys = [[float(v) for v in a.k[:, i].mean(dim=0)] for i in range(n)]
    norm = [math.sqrt(sum(v * v for v in row)) for row in keys]
    cos = lambda i, j: sum(x * y for x, y in zip(keys[i], keys[j])) / (norm[i] * norm[j])  # noqa: E731
    side_a = [i for i in range(0, n, 2) if i >= p]
    side_b = [j for j in range(1, n, 2) if j >= p]
    best = {}
    for i in side_a:
        scores = [cos(i, j) for j in side_b]
        top = max(range(len(side_b)), key=lambda m: (scores[m], -m))  # first index on ties
        best[i] = (scores[top], side_b[top])
    merged = sorted(side_a, key=lambda i: -best[i][0])[:r]
    kept_a = [i for i in side_a if i not in merged]
    groups = {j: [j] for j in side_b}
    for i in merged:
        groups[best[i][1]].append(i)
    rows = [[i] for i in range(p)] + [[i] for i in kept_a] + [groups[j] for j in side_b]
    xs, sizes, members = [], [], []
    for g in rows:
        total = sum(t.size[i] for i in g)
        xs.append(sum((t.size[i] * t.x[i] for i in g), torch.zeros_like(t.x[0])) / total)
        sizes.append(total)
        members.append(sorted(m for i in g for m in t.members[i]))
    return Tokens(torch.stack(xs), sizes, members, t.extra)


def ppt_step(r_at, threshold, p):
    def step(layer, t: Tokens, a):
        n = t.x.shape[0]
        r = min(r_at[layer], (n - p) // 2)
        if r <= 0:
            return t
        cls, vn = cls_row(a), value_norms(a)
        raw = [cls[j] * vn[j] for j in range(p, n)]
        sig = [v / sum(raw) for v in raw]
        mean = sum(sig) / len(sig)
        var = sum((s - mean) ** 2 for s in sig) / (len(sig) - 1)
        pool = var < threshold
        t.extra.setdefault("pooled", {})[layer] = pool
        if pool:
            return bipartite_pool(t, a, r, p)
        order = sorted(range(p, n), key=lambda j: -sig[j - p])
        return take(t, list(range(p)) + order[:n - p - r])
    return step


def run_both(model, fam_cls, x, r_at, threshold, prop_attn=True, key="logits"):
    reference = copy.deepcopy(model)
    layers = sorted(r_at)
    tokenreduce.patch(model, "ppt", layers=layers, r=[r_at[l] for l in layers], threshold=threshold,
                      prop_attn=prop_attn, trace_source=True)
    fam = fam_cls(reference)
    bias = (lambda layer, t: log_sizes(t.size)) if prop_attn else (lambda layer, t: None)
    with torch.no_grad():
        out = model(x)
        expected = [forward(fam, image, r_at, ppt_step(r_at, threshold, fam.num_prefix), key_bias=bias)
                    for image in x]
    got = out if torch.is_tensor(out) else getattr(out, key)
    torch.testing.assert_close(got, torch.cat([e[0][key] for e in expected]), atol=1e-10, rtol=1e-10)
    info = tokenreduce.info(model)
    n0 = fam.embed(x[0]).shape[0]
    assert torch.equal(info.size, torch.tensor([t.size for _, t in expected], dtype=info.size.dtype))
    assert torch.equal(info.source, torch.stack([source_matrix(t.members, n0) for _, t in expected]))
    for layer in layers:
        assert info.method_state.pooled[layer].tolist() == [t.extra["pooled"][layer] for _, t in expected]
    return info


def mixed_threshold(model, x, layers, r):
    """A threshold between the images' variances at the first PP block, so the batch mixes the two policies."""
    probe = copy.deepcopy(model)
    tokenreduce.patch(probe, "ppt", layers=layers, r=r, threshold=1.0)
    with torch.no_grad():
        probe(x)
    s_op = tokenreduce.info(probe).method_state.s_op[layers[0]].sort().values
    return float((s_op[0] + s_op[1]) / 2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_reference_on_timm_variants_with_mixed_policies(variant):
    kwargs = dict(VARIANTS[variant])
    model = vit(kwargs.pop("distilled", False), **kwargs)
    x = images(size=28 if variant == "dynamic_img_size" else 24)
    r_at = {0: 6, 1: 5, 3: 4}
    info = run_both(model, Timm, x, r_at, mixed_threshold(model, x, [0, 1, 3], [6, 5, 4]))
    pooled = info.method_state.pooled[0]
    assert pooled.any() and not pooled.all()  # the batch really mixes pooling and pruning
    p = model.num_prefix_tokens
    assert torch.equal(info.source[:, :p, :p], torch.eye(p, dtype=info.source.dtype).expand(3, p, p))


@pytest.mark.filterwarnings("ignore:ppt. r=20 in block 2:UserWarning")
@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_matches_reference_pool_only_and_prune_only(threshold, prop_attn):
    info = run_both(vit(reg_tokens=1), Timm, images(), {0: 8, 1: 8, 2: 20}, threshold, prop_attn=prop_attn)
    # 38 tokens: 8, 8, then the half-of-the-non-prefix clamp (22 - 2) // 2 = 10
    assert info.tokens_per_layer == [38, 30, 22, 12]


def test_matches_reference_on_clip_tower():
    model, x = clip(), images(3, size=32)
    threshold = mixed_threshold(model, x, [1, 2], [10, 10])
    run_both(model, Clip, x, {1: 10, 2: 10}, threshold, key="pooler_output")


# ---------------------------------------------------------------------------------------------------------------
# ops
def test_ops():
    sig = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    assert pooling_policy(sig, 0.01).tolist() == [True, False]  # variances 0 and 0.09
    assert pooling_policy(sig, 0.0).tolist() == [False, False]  # threshold 0: always prune
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert per_sample(torch.tensor([True, False]), a, b).tolist() == [[0, 0, 0], [1, 1, 1]]
    assert singleton_index(torch.tensor([[0, 1, 1, 2, 3, 3]]), 4).tolist() == [[0, -1, 3, -1]]


# ---------------------------------------------------------------------------------------------------------------
# parameters and contracts
def test_parameters_and_refusals():
    with pytest.raises(ValueError, match="one r per PP block"):
        tokenreduce.patch(vit(), "ppt", layers=[0, 1], r=[4])
    with pytest.raises(ValueError, match="out of range"):
        tokenreduce.patch(vit(), "ppt", layers=[4], r=4)
    with pytest.raises(ValueError, match="no class token"):
        tokenreduce.patch(vit(class_token=False, global_pool="avg"), "ppt", r=4)
    with pytest.warns(UserWarning, match="clamped"):
        tokenreduce.patch(vit(), "ppt", layers=[0], r=30)
    model, x = vit(depth=12), images(2)
    tokenreduce.patch(model, "ppt", r_tokens=4, pp_loc_list=[3, 6, 9], op_threshold=7e-5)
    with torch.no_grad():
        aliased = model(x)
        tokenreduce.patch(model, "ppt", r=4)  # defaults: blocks 3, 6, 9 and threshold 7e-5
        assert torch.equal(model(x), aliased)
    assert tokenreduce.info(model).tokens_per_layer == [37] * 4 + [33] * 3 + [29] * 3 + [25] * 2


def test_zero_reduction_is_the_unpatched_model():
    model, x = vit(), images()
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match="reduces nothing"):
            tokenreduce.patch(model, "ppt", r=0)
        assert torch.equal(model(x), before)


def test_batch_equals_each_sample_alone():
    model, x = vit(distilled=True), images(4)
    threshold = mixed_threshold(model, x, [0, 2], [8, 6])
    tokenreduce.patch(model, "ppt", layers=[0, 2], r=[8, 6], threshold=threshold, trace_source=True)
    with torch.no_grad():
        batch = model(x)
        info = tokenreduce.info(model)
        for s in range(x.shape[0]):
            torch.testing.assert_close(model(x[s:s + 1]), batch[s:s + 1], atol=1e-13, rtol=1e-13)
            alone = tokenreduce.info(model)
            assert torch.equal(alone.source[0], info.source[s]) and torch.equal(alone.size[0], info.size[s])


def test_state_dict_and_unpatch_are_exact():
    model, x = vit(init_values=0.5), images()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        tokenreduce.patch(model, "ppt", r=6, layers=[0, 2])
        assert set(model.state_dict()) == set(keys)
        assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
        assert not torch.equal(model(x), before)
        tokenreduce.unpatch(model)
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("threshold", ["mixed", 1.0, 0.0])
def test_torch_compile_fullgraph(threshold):
    model, x = vit(), images(4)
    if threshold == "mixed":
        threshold = mixed_threshold(model, x, [0, 1, 2], [6, 6, 6])
    tokenreduce.patch(model, "ppt", r=6, layers=[0, 1, 2], threshold=threshold)
    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, eager)
    assert tokenreduce.info(model).tokens_per_layer == [37, 31, 25, 19]
