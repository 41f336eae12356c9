"""ATS against the official implementation's recorded outputs (../shared/fixtures/ats), a per-sample loop-level
float64 reference that follows upstream's forward literally (full-length sequences with zeroed slots and the
policy softmax in mask mode), per-image counts through padding, and the contracts."""
import copy

import pytest
import torch

import tokenreduce
from tokenreduce.ops.ats import inverse_transform_sampling, sampled_index, sampling_grid, smoothed_softmax

from ..conftest import build_fixture_model, fixture_cases, load_case, run_forward_fixture
from ._sample_reference import VARIANTS, clip, images, vit
from ._token_reference import Clip, Timm


@pytest.mark.parametrize("case", fixture_cases("ats"))
def test_forward_fixture(case):
    results = run_forward_fixture("ats", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


@pytest.mark.parametrize("case", fixture_cases("ats"))
def test_counts_per_image_as_recorded(case):
    """The fixtures store (not compared by the checker) how many tokens each image keeps after every ATS block;
    a batch gives every image the count it has alone, which upstream's batched drop mode does not."""
    spec, t = load_case("ats", case)
    model = build_fixture_model(spec["model"])
    tokenreduce.patch(model, "ats", **spec["params"])
    with torch.no_grad():
        logits = model(t["input"])
    info = tokenreduce.info(model)
    run = info.method_state
    counts = torch.stack([run.tokens[layer] for layer in spec["params"]["layers"]])
    assert torch.equal(counts, t["tokens_kept"].to(counts.dtype))
    assert torch.equal(info.tokens_per_sample, counts[-1])
    assert torch.equal(info.valid.sum(dim=1), counts[-1])
    if "logits_batched_upstream" in t:  # upstream's batch-dependent bug, fixed
        assert (t["logits_batched_upstream"] - logits).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# the reference: upstream's forward, one image, literally (policy m, zeroed slots in mask mode)
def policy_softmax(logits, m, eps):
    """Upstream's ``softmax_with_policy`` on ``[H, N, N]``: a masked row keeps its own diagonal, the max runs over
    every column, every column gets ``eps / N``."""
    n = len(m)
    pol = torch.tensor(m, dtype=logits.dtype)
    attn_policy = pol[None, :] + (1 - pol[None, :]) * torch.eye(n, dtype=logits.dtype)
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * attn_policy
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)


def sample(sig, grid):
    """Inverse-transform sampling of one image with lists: positions (into ``sig``) kept, ascending significance."""
    order = sorted(range(len(sig)), key=lambda i: sig[i])
    cdf, total = [], 0.0
    for i in order:
        total += sig[i]
        cdf.append(total)
    lo, hi = min(cdf), max(cdf)
    c = [(v - lo) / (hi - lo) for v in cdf]
    y0 = min(v for v in c if v != 0)
    lin = torch.linspace(0, 1, grid, dtype=torch.float64).tolist()
    ys = [y0 + (lin[k] * (grid - 1) - y0 * k) / (grid - 1) for k in range(grid)]
    picks = {min(range(len(c)), key=lambda i: (abs(y - c[i]), i)) for y in ys}
    return [order[i] for i in sorted(picks)]


def ats_reference(fam, image, layers, drop, eps, keep=None, key="logits"):
    """Returns (outputs, {ATS block: tokens kept incl. prefix})."""
    x = fam.embed(image)
    n0, p = x.shape[0], fam.num_prefix
    grid = n0 - p if keep is None else min(keep, n0 - p)
    m = [1.0] * n0
    counts = {}
    for index, layer in enumerate(fam.layers):
        n = x.shape[0]
        mask = torch.tensor(m, dtype=x.dtype)[:, None]
        h = fam.norm1(layer, x)
        q, k, v = fam.qkv(layer, h)
        if index in layers:  # q, k, v zeroed on masked slots
            q, k, v = q * mask, k * mask, v * mask
        probs = policy_softmax((q @ k.transpose(-1, -2)) * fam.scale(layer), m, eps)
        xm = x + fam.res1(layer, fam.attn_out(layer, h, probs @ v))
        if index in layers:
            heads = probs.shape[0]
            cls = [sum(float(probs[hh, 0, j]) for hh in range(heads)) for j in range(n)]
            vn = [float(v[:, j].reshape(-1).norm()) for j in range(n)]
            raw = [cls[j] * vn[j] for j in range(p, n)]
            sig = [r / sum(raw) for r in raw]
            rows = list(range(p)) + [i + p for i in sample(sig, grid)]
            counts[index] = len(rows)
            x = xm[rows]
            if not drop:
                x = torch.cat([x, x.new_zeros(n - len(rows), x.shape[1])])
            m = [1.0] * len(rows) + [0.0] * (x.shape[0] - len(rows))
            mask = torch.tensor(m, dtype=x.dtype)[:, None]
        else:
            x = xm * mask
        x = (x + fam.mlp_branch(layer, x)) * mask
    out = fam.head(x, m)  # an average-pooled head weights by size: 1 kept, 0 dropped
    return out[key], counts


def run_both(model, fam_cls, x, layers, drop, eps, keep=None, key="logits", atol=1e-10):
    reference = copy.deepcopy(model)
    tokenreduce.patch(model, "ats", layers=layers, drop_tokens=drop, softmax_eps=eps, keep=keep)
    with torch.no_grad():
        out = model(x)
        expected = [ats_reference(fam_cls(reference), image, layers, drop, eps, keep, key) for image in x]
    got = out if torch.is_tensor(out) else getattr(out, key)
    torch.testing.assert_close(got, torch.cat([e[0] for e in expected]), atol=atol, rtol=atol)
    info = tokenreduce.info(model)
    for layer in layers:
        assert info.method_state.tokens[layer].tolist() == [e[1][layer] for e in expected]
    assert info.tokens_per_sample.tolist() == [e[1][layers[-1]] for e in expected]
    return info


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_reference_on_timm_variants(variant, drop, eps):
    kwargs = dict(VARIANTS[variant])
    model = vit(kwargs.pop("distilled", False), **kwargs)
    x = images(size=28 if variant == "dynamic_img_size" else 24)
    info = run_both(model, Timm, x, [1, 2, 3], drop, eps)  # ATS to the last block, as upstream's DeiT-S config
    counts = info.tokens_per_sample
    assert any(len(set(c.tolist())) > 1 for c in info.method_state.tokens.values())  # counts differ per image
    full = Timm(model).embed(x[0]).shape[0]
    assert info.valid.shape[1] == (int(counts.max()) if drop else full)  # drop: the longest image; else full
    assert torch.equal(info.valid.sum(dim=1), counts)
    assert torch.equal(info.size, info.valid.to(info.size.dtype))  # padding has size 0
    assert (info.kept[3][~info.valid] == -1).all()


@pytest.mark.parametrize("drop, eps", [(True, 0.0), (True, 1e-6), (False, 0.0)])
def test_matches_reference_with_ordinary_blocks_between(drop, eps):
    run_both(vit(), Timm, images(), [0, 2], drop, eps)


def zero_bias_vit():
    model = vit()
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm1.bias.zero_()
            blk.attn.qkv.bias.zero_()
    return model


def test_full_length_mode_with_eps_between_ats_blocks():
    """Documented (docs/methods/ats.md): upstream's zeroed slots attend, in a non-ATS block after an ATS block, with
    the keys/values of LayerNorm(0); tokenreduce treats them as in ATS blocks (logit 0, value 0). Identical when
    norm1's bias and the qkv bias are zero (every shared fixture model); otherwise off by O(eps) only."""
    run_both(zero_bias_vit(), Timm, images(), [0, 2], False, 1e-6)
    with pytest.raises(AssertionError):
        run_both(vit(), Timm, images(), [0, 2], False, 1e-6, atol=1e-13)
    run_both(vit(), Timm, images(), [0, 2], False, 1e-6, atol=1e-6)


@pytest.mark.parametrize("drop", [True, False])
def test_keep_caps_the_grid(drop):
    info = run_both(vit(), Timm, images(), [1, 2, 3], drop, 0.0, keep=10)
    assert (info.tokens_per_sample <= 11).all()


@pytest.mark.parametrize("drop", [True, False])
def test_matches_reference_on_clip_tower(drop):
    run_both(clip(), Clip, images(3, size=32), [1, 2, 3], drop, 0.0, key="pooler_output")


def test_clip_tower_refuses_the_smoothed_softmax():
    with pytest.raises(ValueError, match="softmax_eps=0"):
        tokenreduce.patch(clip(), "ats", softmax_eps=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# ops
def test_sampling_by_hand():
    sig = torch.tensor([[0.2, 0.1, 0.4, 0.3]], dtype=torch.float64)
    order, picked = inverse_transform_sampling(sig, None, 4)
    # cdf 0.1 0.3 0.6 1.0 -> c 0, 2/9, 5/9, 1; grid 2/9 .. 1 picks positions 1, 2, 2, 3: the lowest is never kept
    assert order.tolist() == [[1, 0, 3, 2]] and picked.tolist() == [[False, True, True, True]]
    _, floored = inverse_transform_sampling(sig, None, 4, torch.tensor([True]))
    assert floored.tolist() == [[True, True, True, True]]  # c = cdf: grid 0.1, 0.4, 0.7, 1 picks every token
    index, valid = sampled_index(order, picked, 3)
    assert index.tolist() == [[0, 3, 2]] and valid.all()
    # padding is ignored: the same sample with two padding slots (any values) gives the same picks
    padded = torch.tensor([[0.2, 9.0, 0.1, 0.4, 0.3, 0.0]], dtype=torch.float64)
    valid = torch.tensor([[True, False, True, True, True, False]])
    order2, picked2 = inverse_transform_sampling(padded, valid, 4)
    kept = sorted(order2[0, picked2[0]].tolist())
    assert kept == [0, 3, 4]


def test_grid_and_smoothed_softmax():
    ys = sampling_grid(torch.tensor([0.25], dtype=torch.float64), 4)
    torch.testing.assert_close(ys, torch.tensor([[0.25, 0.5, 0.75, 1.0]], dtype=torch.float64))
    logits = torch.randn(2, 1, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    absent = smoothed_softmax(logits.masked_fill(~valid[:, None, None], float("-inf")), valid, 1e-3, "absent")
    alone = smoothed_softmax(logits[1:, :, :, :3], None, 1e-3)
    torch.testing.assert_close(absent[1, :, :, :3], alone[0])
    assert absent[1, :, :, 3:].eq(0).all()
    torch.testing.assert_close(absent.sum(-1), torch.ones(2, 1, 3, dtype=torch.float64))
    zero = smoothed_softmax(logits, valid, 1e-3, "zero")
    pol = valid[1].to(torch.float64)
    s = logits[1].masked_fill(~valid[1], 0.0)
    e = (s - s.amax(-1, keepdim=True)).exp() * pol
    torch.testing.assert_close(zero[1], ((e + 1e-3 / 5) / (e.sum(-1, keepdim=True) + 1e-3)) * pol)


# ---------------------------------------------------------------------------------------------------------------
# parameters and contracts
def test_parameters_and_refusals():
    with pytest.raises(ValueError, match="no class token"):
        tokenreduce.patch(vit(class_token=False, global_pool="avg"), "ats")
    with pytest.raises(ValueError, match="out of range"):
        tokenreduce.patch(vit(), "ats", layers=[4])
    with pytest.raises(ValueError, match="keep"):
        tokenreduce.patch(vit(), "ats", keep=0)
    model, x = vit(depth=12), images(2)
    tokenreduce.patch(model, "ats", ats_blocks=list(range(3, 12)), num_tokens=197, drop_tokens=True)
    with torch.no_grad():
        aliased = model(x)
        tokenreduce.patch(model, "ats")  # defaults: blocks 3..11, no cap, drop_tokens
        assert torch.equal(model(x), aliased)
    assert sorted(tokenreduce.info(model).method_state.tokens) == list(range(3, 12))


def test_zero_reduction_is_the_unpatched_model():
    model, x = vit(), images()
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match="reduces nothing"):
            tokenreduce.patch(model, "ats", layers=[])
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("drop, eps", [(True, 0.0), (True, 1e-6), (False, 0.0), (False, 1e-6)])
def test_batch_equals_each_sample_alone(drop, eps):
    model, x = vit(reg_tokens=2, global_pool="avg"), images(5)
    tokenreduce.patch(model, "ats", layers=[0, 1, 2, 3], drop_tokens=drop, softmax_eps=eps, trace_source=True)
    with torch.no_grad():
        batch = model(x)
        info = tokenreduce.info(model)
        assert len(set(info.tokens_per_sample.tolist())) > 1
        for s in range(x.shape[0]):
            torch.testing.assert_close(model(x[s:s + 1]), batch[s:s + 1], atol=1e-13, rtol=1e-13)
            alone = tokenreduce.info(model)
            n = int(alone.tokens_per_sample[0])
            assert int(info.tokens_per_sample[s]) == n
            assert torch.equal(alone.source[0, :n], info.source[s, :n])
            assert info.source[s, n:].eq(0).all() and info.size[s, n:].eq(0).all()


def test_state_dict_and_unpatch_are_exact():
    model, x = vit(init_values=0.5), images()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        tokenreduce.patch(model, "ats", layers=[1, 2, 3], softmax_eps=1e-6)
        assert set(model.state_dict()) == set(keys)
        assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
        assert not torch.equal(model(x), before)
        tokenreduce.unpatch(model)
        assert torch.equal(model(x), before)


def test_torch_compile_drop_mode_needs_graph_breaks():
    """In drop mode the batch's length after an ATS block is its longest image's count, a data-dependent shape,
    so fullgraph=True cannot trace it (docs/methods/ats.md); with graph breaks it compiles and matches eager."""
    model, x = vit(), images(3)
    tokenreduce.patch(model, "ats", layers=[1, 2, 3])
    with torch.no_grad():
        eager = model(x)
        with pytest.raises(Exception, match="(?i)disable|data.dependent|unsupported|graph break"):
            torch.compile(model, fullgraph=True, backend="eager")(x)
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(x)
    torch.testing.assert_close(got, eager)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_torch_compile_fullgraph_full_length_mode(eps):
    """The full-length mode keeps every shape static: it compiles with fullgraph=True."""
    model, x = vit(), images(3)
    tokenreduce.patch(model, "ats", layers=[1, 2, 3], drop_tokens=False, softmax_eps=eps)
    with torch.no_grad():
        eager = model(x)
        counts = tokenreduce.info(model).tokens_per_sample
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, eager)
    assert torch.equal(tokenreduce.info(model).tokens_per_sample, counts)
