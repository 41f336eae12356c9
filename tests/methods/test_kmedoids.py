"""K-Medoids (TokenReduction) against the official implementation's recorded outputs (../shared/fixtures/kmedoids),
a per-sample loop reference written from the README's semantics, every timm variant, the CLIP tower, compile,
and its errors."""
import copy

import pytest
import torch

import tokenreduce
from tokenreduce.ops.kmedoids import kmedoids

from ..conftest import build_fixture_model, fixture_cases, load_case, run_forward_fixture, tiny_vit
from ._cluster_reference import (clip_reference, kmedoids_one, kmedoids_step, require_host_compile, stage_counts,
                                 timm_reference)

VARIANTS = {
    "plain": {},
    "layerscale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
    "registers": {"reg_tokens": 3},
    "no_class_token_avg": {"class_token": False, "global_pool": "avg"},
    "avg_pool_with_cls": {"global_pool": "avg"},
    "norm_pre_fc_norm": {"pre_norm": True, "global_pool": "avg", "fc_norm": True},
}


def _images(b=2, hw=32, seed=0):
    return torch.randn(b, 3, hw, hw, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _model(**kw):
    model = tiny_vit(**kw).double()
    with torch.no_grad():  # sharper attention than the random init, so the weights differ clearly
        for blk in model.blocks:
            blk.attn.qkv.weight.add_(torch.randn_like(blk.attn.qkv.weight) * 0.2)
    return model


@pytest.mark.parametrize("case", fixture_cases("kmedoids"))
def test_forward_fixture(case):
    results = run_forward_fixture("kmedoids", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


@pytest.mark.parametrize("case", fixture_cases("kmedoids"))
def test_fixture_medoids_and_counts(case):
    """The medoids chosen at every stage are upstream's (stored, not compared by the checker), in its order."""
    spec, t = load_case("kmedoids", case)
    model = build_fixture_model(spec["model"])
    tokenreduce.patch(model, "kmedoids", **spec["params"])
    with torch.no_grad():
        model(t["input"])
    info = tokenreduce.info(model)
    for stage, layer in enumerate(spec["params"]["layers"]):
        centres = info.kept[layer - 1][:, 1:] - 1  # kept is recorded at the site after block layer-1
        assert torch.equal(centres, t[f"centres_{stage}"].long()), stage
    counts = stage_counts(196, spec["params"]["layers"], spec["params"]["keep_ratio"])
    expected = [197] * 3 + [1 + counts[3]] * 3 + [1 + counts[6]] * 3 + [1 + counts[9]] * 3
    assert info.tokens_per_layer == expected
    # every medoid stands for its cluster: the sizes add up to the 196 patches
    assert torch.equal(info.size[:, 1:].sum(1), torch.full((2,), 196.0, dtype=info.size.dtype))


def test_op_equals_loop_on_fixture_tokens():
    """The vectorised op against the loop reference on 196 real tokens of the fixture model (block 3's input)."""
    spec, t = load_case("kmedoids", "vit_d12_keep0.5")
    model = build_fixture_model(spec["model"])
    captured = {}
    from ._cluster_reference import timm_attention

    def capture(block, inputs, output):
        captured["x"], captured["attn"] = output, timm_attention(block, inputs[0])
    model.blocks[2].register_forward_hook(capture)
    with torch.no_grad():
        model(t["input"][:1])
    x, attn = captured["x"][:, 1:], captured["attn"]
    weight = attn.sum(1).sum(1)[:, 1:]
    out = kmedoids(x, weight, 98, 3)
    medoids, assign = kmedoids_one(x[0], weight[0].tolist(), 98, 3)
    assert out.centers[0].tolist() == medoids
    assert out.assign[0].tolist() == assign
    assert out.centers[0].tolist() == t["centres_0"][0].long().tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_equals_loop_reference(variant):
    """Patched model == unpatched blocks with the loop-level K-medoids between them (float64)."""
    model, x = _model(**VARIANTS[variant]), _images()
    layers, ratio = [1, 2, 3], 0.6
    p = model.num_prefix_tokens
    expected = timm_reference(model, x, stage_counts(64, layers, ratio), kmedoids_step(3))
    tokenreduce.patch(model, "kmedoids", keep_ratio=ratio, layers=layers, trace_source=True)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    info = tokenreduce.info(model)
    assert info.tokens_per_layer == [64 + p, 38 + p, 23 + p, 13 + p]
    assert torch.equal(info.source.sum(-1), info.size)
    assert torch.equal(info.source[:, :p, :p], torch.eye(p, dtype=info.source.dtype).expand(2, p, p))


def test_distilled_deit_keeps_both_tokens():
    """Upstream drops the distillation token (and crashes); here CLS and DIST stay first and are never clustered."""
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                       num_classes=5).double().eval()
    x = _images()
    model.set_distilled_training(False)
    expected = timm_reference_distilled(model, x)
    tokenreduce.patch(model, "kmedoids", keep=[20, 10], layers=[1, 3], trace_source=True)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    info = tokenreduce.info(model)
    assert info.tokens_per_layer == [66, 22, 22, 12]
    assert torch.equal(info.source[:, :2, :2], torch.eye(2, dtype=info.source.dtype).expand(2, 2, 2))


@torch.no_grad()
def timm_reference_distilled(model, x):
    """Distilled DeiT: the head averages the CLS and DIST heads (timm's eval forward)."""
    m = copy.deepcopy(model)
    step = kmedoids_step(3)

    def run(images):
        y = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        size = torch.ones(y.shape[:2], dtype=y.dtype)
        attn = None
        from ._cluster_reference import timm_attention
        for i, block in enumerate(m.blocks):
            if i in {1: 20, 3: 10}:
                y, size = step(y, size, attn, {1: 20, 3: 10}[i], 2)
            attn = timm_attention(block, y)
            y = block(y)
        return m.norm(y)
    feats = run(x)
    return (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2


def test_zero_reduction_is_exact():
    model, x = _model(), _images()
    with torch.no_grad():
        expected = model(x)
    for params in ({"keep_ratio": 1.0}, {"keep": 64, "layers": [1, 3]}, {}):
        with pytest.warns(UserWarning, match="reduces nothing") if not params else _no_warning():
            tokenreduce.patch(model, "kmedoids", **params)
        with torch.no_grad():
            assert torch.equal(model(x), expected), params
        assert tokenreduce.info(model).tokens_per_layer == [65] * 4


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_batch_equals_each_sample_alone():
    model, x = _model(), _images(4, seed=3)
    tokenreduce.patch(model, "kmedoids", keep_ratio=0.5, layers=[1, 2])
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, atol=1e-12, rtol=1e-12)


def test_dynamic_image_size_compounds_from_the_actual_patches():
    model = _model(dynamic_img_size=True)
    tokenreduce.patch(model, "kmedoids", keep_ratio=0.5, layers=[1, 2])
    with torch.no_grad():
        model(_images(1, hw=48))  # 144 patches
    assert tokenreduce.info(model).tokens_per_layer == [145, 73, 37, 37]


def test_state_dict_unchanged_and_unpatch_exact():
    model, x = _model(), _images()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "kmedoids", keep_ratio=0.5)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tokenreduce.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_torch_compile_fullgraph():
    require_host_compile(_model)
    model, x = _model(), _images()
    tokenreduce.patch(model, "kmedoids", keep_ratio=0.5, layers=[1, 2])
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-12)
    assert tokenreduce.info(model).tokens_per_layer == [65, 33, 17, 17]


def _tiny_clip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, image_size=32, patch_size=4)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).double().eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    return model


def test_clip_tower_equals_loop_reference():
    model, x = _tiny_clip(), _images()
    expected = clip_reference(model, x, stage_counts(64, [1, 3], 0.5), kmedoids_step(2))
    tokenreduce.patch(model, "kmedoids", keep_ratio=0.5, layers=[1, 3], iterations=2)
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert tokenreduce.info(model).tokens_per_layer == [65, 33, 33, 17]


class TestErrors:
    @pytest.mark.parametrize("params,error,match", [
        ({"keep_ratio": 0.5, "layers": [0, 2]}, ValueError, "layers \\[0\\] out of range"),
        ({"keep_ratio": 0.5, "layers": [1, 4]}, ValueError, "must lie in 1..3"),
        ({"keep_ratio": 0.5, "keep": 10}, ValueError, "either keep_ratio"),
        ({"keep": [10, 5], "layers": [1, 2, 3]}, ValueError, "2 counts but there are 3 layers"),
        ({"layers": [1, 2]}, ValueError, "nothing says how many"),
        ({"keep_ratio": 1.5}, ValueError, "keep_ratio"),
        ({"keep": 0}, ValueError, "keep"),
        ({"keep_ratio": 0.5, "iterations": -1}, ValueError, "iterations"),
        ({"keep_ratio": 0.5, "layers": [2, 1]}, ValueError, "strictly increasing"),
        ({"equal_weight": True}, TypeError, "unknown parameter"),
    ])
    def test_bad_params_leave_the_model_untouched(self, params, error, match):
        model = tiny_vit()
        with pytest.raises(error, match=match):
            tokenreduce.patch(model, "kmedoids", **params)
        assert not tokenreduce.is_patched(model)

    def test_upstream_names_are_aliases(self):
        model = _model()
        tokenreduce.patch(model, "kmedoids", keep_rate=0.5, reduction_loc=[1, 2], cluster_iters=1)
        method = tokenreduce.api.method_of(model)
        assert (method.keep_ratio, sorted(method.stages), method.iterations) == (0.5, [1, 2], 1)

    def test_too_many_clusters_warns_and_clamps(self):
        model = _model()
        with pytest.warns(UserWarning, match="clamped to 30"):
            tokenreduce.patch(model, "kmedoids", keep=[30, 40], layers=[1, 2])
        with torch.no_grad():
            model(_images())
        assert tokenreduce.info(model).tokens_per_layer == [65, 31, 31, 31]
