"""DPC-KNN (TokenReduction, after TCFormer). No upstream fixtures exist: the op is checked against a per-sample
loop reference written from TCFormer's / TokenReduction's semantics (also the form SparseVLM's recycling uses:
k = c, ties in density, a valid mask), the method against unpatched blocks with that reference between them, on
every timm variant and the CLIP tower."""
import copy

import pytest
import torch

import tokenreduce
from tokenreduce.ops.dpc_knn import cluster_mean, denser, dpc_knn, knn_density, scaled_distances

from ..conftest import tiny_vit
from ._cluster_reference import (cluster_means_one, clip_reference, dpc_knn_one, dpc_knn_step, require_host_compile,
                                 stage_counts, timm_reference)

VARIANTS = {
    "plain": {},
    "layerscale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
    "registers": {"reg_tokens": 3},
    "no_class_token_avg": {"class_token": False, "global_pool": "avg"},
    "avg_pool_with_cls": {"global_pool": "avg"},
}


def _images(b=2, hw=32, seed=0):
    return torch.randn(b, 3, hw, hw, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _model(**kw):
    return tiny_vit(**kw).double()


def _points(b, n, c, seed=0):
    return torch.randn(b, n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The op
@pytest.mark.parametrize("n,k,neighbours", [(64, 20, 5), (30, 7, 3), (12, 4, 4), (9, 1, 1), (40, 40, 5),
                                            (6, 3, 10)])
def test_op_equals_loop(n, k, neighbours):
    x = _points(3, n, 16, seed=n)
    out = dpc_knn(x, k, neighbours)
    for b in range(3):
        centres, assign = dpc_knn_one(x[b], k, neighbours)
        assert out.centers[b].tolist() == centres
        assert out.assign[b].tolist() == assign
        torch.testing.assert_close(cluster_mean(x, out.assign, k)[b], cluster_means_one(x[b], assign, k),
                                   atol=1e-12, rtol=1e-12)


def test_exact_density_ties_resolve_by_index():
    """With k = 2 two mutual nearest neighbours have bit-identical densities (SparseVLM's c = 2 case): the lower
    index counts as denser, deterministically, and the result equals the loop reference."""
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.3], [9.0, 0.0], [9.2, 0.1]], dtype=torch.float64)
    density = knn_density(scaled_distances(x[None]), 2)[0]
    assert density[0] == density[1] and density[2] == density[3]
    order = denser(density[None])[0]
    assert bool(order[1, 0]) and not bool(order[0, 1])  # 0 is denser than 1, not the other way round
    # a strict total order: exactly one point has no denser point
    assert int((~order.any(dim=1)).sum()) == 1
    out = dpc_knn(x[None], 2, 2)
    centres, assign = dpc_knn_one(x, 2, 2)
    assert out.centers[0].tolist() == centres and out.assign[0].tolist() == assign


def test_one_cluster_takes_everything():
    """c = 1 (SparseVLM's smallest recycle): all densities equal, every point joins the one cluster."""
    x = _points(2, 7, 5)
    out = dpc_knn(x, 1, 1)
    assert torch.equal(out.assign, torch.zeros(2, 7, dtype=torch.long))
    torch.testing.assert_close(cluster_mean(x, out.assign, 1)[:, 0], x.sum(1) / (7 + 1e-6), atol=1e-14, rtol=0)


def test_valid_mask_ignores_padding():
    """A padded sample clusters its real points as that sample alone would (invalid points: weight 0)."""
    real = _points(1, 20, 8, seed=4)
    padded = torch.cat([real, 100 * _points(1, 5, 8, seed=5)], dim=1)
    valid = torch.tensor([[True] * 20 + [False] * 5])
    out = dpc_knn(padded, 6, 5, valid=valid)
    alone = dpc_knn(real, 6, 5)
    assert torch.equal(out.centers, alone.centers)
    assert torch.equal(out.assign[:, :20], alone.assign)
    assert torch.equal(out.assign[:, 20:], torch.zeros(1, 5, dtype=torch.long))
    centres, assign = dpc_knn_one(padded[0], 6, 5, valid=valid[0].tolist())
    assert out.centers[0].tolist() == centres and out.assign[0].tolist() == assign
    merged = cluster_mean(padded, out.assign, 6, weight=valid.double())
    torch.testing.assert_close(merged, cluster_mean(real, alone.assign, 6), atol=1e-14, rtol=0)


def test_op_errors():
    x = _points(1, 5, 3)
    with pytest.raises(ValueError, match="num_clusters must be an int in \\[1, 5\\]"):
        dpc_knn(x, 6)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        dpc_knn(x, 2, 0)


# ---------------------------------------------------------------------------------------------------------------
# The method
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_equals_loop_reference(variant):
    model, x = _model(**VARIANTS[variant]), _images()
    layers, ratio = [1, 2, 3], 0.6
    p = model.num_prefix_tokens
    expected = timm_reference(model, x, stage_counts(64, layers, ratio), dpc_knn_step(5))
    tokenreduce.patch(model, "dpc_knn", keep_ratio=ratio, layers=layers, trace_source=True)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    info = tokenreduce.info(model)
    assert info.tokens_per_layer == [64 + p, 38 + p, 23 + p, 13 + p]
    assert torch.equal(info.source.sum(-1), info.size)
    assert torch.equal(info.size[:, p:].sum(1), torch.full((2,), 64.0, dtype=info.size.dtype))


def test_paper_schedule_on_a_12_block_model():
    model = tiny_vit(depth=12, img_size=56, patch_size=4)  # 196 patches, as a 224 px ViT-B/16
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.7)
    with torch.no_grad():
        model(torch.randn(1, 3, 56, 56))
    assert tokenreduce.info(model).tokens_per_layer == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3


def test_distilled_deit_keeps_both_tokens():
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                       num_classes=5).double().eval()
    tokenreduce.patch(model, "dpc_knn", keep=[16, 8], layers=[1, 2], trace_source=True)
    with torch.no_grad():
        out = model(_images())
    info = tokenreduce.info(model)
    assert info.tokens_per_layer == [66, 18, 10, 10] and torch.isfinite(out).all()
    assert torch.equal(info.source[:, :2, :2], torch.eye(2, dtype=info.source.dtype).expand(2, 2, 2))
    assert torch.equal(info.source[:, 2:, :2], torch.zeros(2, 8, 2, dtype=info.source.dtype))


def test_zero_reduction_is_exact():
    model, x = _model(), _images()
    with torch.no_grad():
        expected = model(x)
    for params in ({"keep_ratio": 1.0}, {"keep": 64, "layers": [1, 3]}):
        tokenreduce.patch(model, "dpc_knn", **params)
        with torch.no_grad():
            assert torch.equal(model(x), expected), params


def test_batch_equals_each_sample_alone():
    model, x = _model(), _images(4, seed=3)
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.5, layers=[1, 2], k=3)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, atol=1e-12, rtol=1e-12)


def test_prop_attn_uses_the_cluster_sizes():
    model, x = _model(), _images()
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.5, layers=[1, 2])
    with torch.no_grad():
        plain = model(x)
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.5, layers=[1, 2], prop_attn=True)
    with torch.no_grad():
        weighted = model(x)
    assert not torch.allclose(plain, weighted)


def test_state_dict_unchanged_and_unpatch_exact():
    model, x = _model(), _images()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == before.keys()
    tokenreduce.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_torch_compile_fullgraph():
    require_host_compile(_model)
    model, x = _model(), _images()
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.5, layers=[1, 2])
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-12)


def test_half_precision_is_finite():
    model = tiny_vit().to(torch.bfloat16)
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.5, layers=[1, 2])
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert torch.isfinite(out.float()).all()


def test_clip_tower_equals_loop_reference():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, image_size=32, patch_size=4)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).double().eval()
    x = _images()
    expected = clip_reference(model, x, stage_counts(64, [1, 3], 0.5), dpc_knn_step(5))
    tokenreduce.patch(model, "dpc_knn", keep_ratio=0.5, layers=[1, 3])
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert tokenreduce.info(model).tokens_per_layer == [65, 33, 33, 17]


class TestErrors:
    @pytest.mark.parametrize("params,error,match", [
        ({"keep_ratio": 0.5, "layers": [0]}, ValueError, "layers \\[0\\] out of range"),
        ({"keep_ratio": 0.5, "k": 0}, ValueError, "k"),
        ({"keep_ratio": 0.5, "keep": 3}, ValueError, "either keep_ratio"),
        ({"k_neighbors": 5, "k": 4}, TypeError, "name the same parameter"),
    ])
    def test_bad_params_leave_the_model_untouched(self, params, error, match):
        model = tiny_vit()
        with pytest.raises(error, match=match):
            tokenreduce.patch(model, "dpc_knn", **params)
        assert not tokenreduce.is_patched(model)

    def test_upstream_names_are_aliases(self):
        model = _model()
        tokenreduce.patch(model, "dpc_knn", keep_rate=0.5, reduction_loc=[2], k_neighbors=7)
        method = tokenreduce.api.method_of(model)
        assert (method.keep_ratio, sorted(method.stages), method.k) == (0.5, [2], 7)

    def test_compounded_count_below_one_is_clamped(self):
        with pytest.warns(UserWarning, match="clamped to 1"):
            tokenreduce.patch(_model(), "dpc_knn", keep_ratio=0.05, layers=[1, 2])  # int(64 * 0.05**2) = 0
