"""ATC against the official implementation's recorded outputs (../shared/fixtures/atc), scikit-learn at a single
reduction site, its two schedules, and its errors."""
import pytest
import torch

import tokenreduce
from tokenreduce.core import Geometry
from tokenreduce.methods.atc import ATC, keep_rate_clusters
from tokenreduce.ops.clustering import cosine_distance
from tokenreduce.core import TokenState

from ..conftest import build_fixture_model, fixture_cases, load_case, run_forward_fixture, tiny_vit

import sklearn.cluster as sklearn_cluster  # noqa: E402  (a dev dependency: the reference partitions)


@pytest.mark.parametrize("case", fixture_cases("atc"))
def test_forward_fixture(case):
    results = run_forward_fixture("atc", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


@pytest.mark.slow
def test_keep_rate_placement_as_upstream():
    """The paper's DeiT setting: the MLP of a location block already runs on the clustered tokens."""
    spec, tensors = load_case("atc", "vit_d12_deit_keep0.7_complete")
    model = build_fixture_model(spec["model"])
    tokenreduce.patch(model, "atc", **spec["params"])
    with torch.no_grad():
        model(tensors["input"][:1])
    assert tokenreduce.info(model).tokens_per_layer == [197] * 4 + [138] * 3 + [97] * 3 + [68] * 2
    assert [keep_rate_clusters(0.7, j, 196) for j in range(3)] == [137, 96, 67]
    assert [keep_rate_clusters(0.25, j, 196) for j in range(3)] == [49, 12, 3]
    assert [keep_rate_clusters(0.01, j, 196) for j in range(2)] == [1, 1]  # at least one cluster


def _groups(labels):
    out = {}
    for i, label in enumerate(labels.tolist()):
        out.setdefault(label, []).append(i)
    return sorted(tuple(g) for g in out.values())


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_one_site_equals_sklearn(linkage, num_prefix):
    """Prefix tokens stay first and alone; the others are partitioned exactly as scikit-learn does."""
    g = torch.Generator().manual_seed(num_prefix)
    n, r = 41, 13
    keys = torch.randn(3, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    geometry = Geometry(num_blocks=2, num_prefix=num_prefix, num_patches=n - num_prefix, dim=5, num_heads=1)
    method = ATC(geometry, r=r, keep_ratio=None, layers=None, linkage=linkage, prop_attn=True)
    state = TokenState(x=x, size=torch.ones(3, n, dtype=torch.float64), keys=keys, num_prefix=num_prefix,
                       source=torch.eye(n, dtype=torch.float64).expand(3, n, n))
    out = method.reduce(state)
    assert out.x.shape == (3, n - r, 5)
    dist = cosine_distance(keys[:, num_prefix:])
    model = sklearn_cluster.AgglomerativeClustering(n_clusters=n - num_prefix - r, metric="precomputed",
                                                    linkage=linkage)
    for b in range(3):
        rows = [tuple(row.nonzero().flatten().tolist()) for row in out.source[b]]
        assert rows[:num_prefix] == [(i,) for i in range(num_prefix)]
        expected = [tuple(i + num_prefix for i in grp)
                    for grp in _groups(torch.as_tensor(model.fit(dist[b].numpy()).labels_))]
        assert sorted(rows[num_prefix:]) == expected
        for slot, members in enumerate(rows):
            torch.testing.assert_close(out.x[b, slot], x[b, list(members)].mean(0))
            assert out.size[b, slot] == len(members)


# ---------------------------------------------------------------------------------------------------------------
def _images(b=2, hw=32):
    return torch.randn(b, 3, hw, hw)


def _run(model, x, **params):
    tokenreduce.patch(model, "atc", trace_source=True, **params)
    with torch.no_grad():
        out = model(x)
    return out, tokenreduce.info(model)


@pytest.mark.parametrize("r,expected", [
    (5, [65, 60, 55, 50]),
    ([8, -1.0], [65, 49, 39, 34]),          # ToMe's decreasing schedule: [16, 10, 5, 0]
    ([3, 0, 7], [65, 62, 62, 55]),
    (100, [65, 2, 2, 2]),                   # at most T - 1 tokens removed: one cluster is left
])
def test_r_removes_exactly_r_tokens(r, expected):
    out, info = _run(tiny_vit(), _images(), r=r)
    assert info.tokens_per_layer == expected and torch.isfinite(out).all()
    assert torch.equal(info.size.sum(1), torch.full((2,), 64.0) + 1)


def test_keep_rate_on_a_small_model():
    out, info = _run(tiny_vit(depth=6), _images(), keep_rate=0.5, locations=[1, 4])
    assert info.tokens_per_layer == [65, 65, 33, 33, 33, 17]
    out, info = _run(tiny_vit(depth=6), _images(), keep_rate=1.0, locations=[1, 4])
    assert info.tokens_per_layer == [65] * 6


def test_defaults_do_nothing_and_are_exact():
    model, x = tiny_vit(), _images()
    with torch.no_grad():
        expected = model(x)
    out, info = _run(model, x)
    assert torch.equal(out, expected) and info.tokens_per_layer == [65] * 4
    method = tokenreduce.api._adapter_of(model).method
    assert method.linkage == "average" and method.prop_attn is True


def test_distilled_model_protects_both_tokens_and_stays_finite():
    """The official code puts the distillation token into the clusters (and produces NaN); here it is kept."""
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                       num_classes=5).eval()
    out, info = _run(model, _images(), r=10, linkage="complete")
    assert info.tokens_per_layer == [66, 56, 46, 36]
    assert torch.equal(info.source[:, :2, :2], torch.eye(2).expand(2, 2, 2))
    assert torch.equal(info.source[:, 2:, :2], torch.zeros(2, info.source.shape[1] - 2, 2))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    model = tiny_vit().to(dtype)
    out, info = _run(model, _images().to(dtype), r=8, linkage="average")
    assert info.tokens_per_layer == [65, 57, 49, 41] and torch.isfinite(out.float()).all()


def test_prop_attn_off_changes_the_output():
    x = _images()
    on, _ = _run(tiny_vit(), x, r=8)
    off, _ = _run(tiny_vit(), x, r=8, prop_attn=False)
    assert not torch.allclose(on, off)


class TestErrors:
    @pytest.mark.parametrize("params,match", [
        ({"linkage": "ward"}, "linkage"),
        ({"keep_rate": 0}, "keep_rate"), ({"keep_rate": 1.5}, "keep_rate"), ({"keep_rate": -0.5}, "keep_rate"),
        ({"keep_rate": True}, "keep_rate"),
        ({"r": -1}, "r"), ({"r": 2.5}, "r"),
        ({"keep_rate": 0.5, "locations": [2, 1]}, "locations"),
        ({"keep_rate": 0.5, "locations": []}, "locations"),
        ({"keep_rate": 0.5, "locations": [-1, 2]}, "locations"),
    ])
    def test_bad_values(self, params, match):
        with pytest.raises(ValueError, match=match):
            tokenreduce.patch(tiny_vit(), "atc", **params)

    @pytest.mark.parametrize("params,match", [
        ({"r": 4, "keep_rate": 0.7}, "either r .* or keep_ratio"),
        ({"r": 4, "locations": [1]}, "layers only applies with keep_ratio"),
        ({"keep_rate": 0.7}, r"layers \[3, 6, 9\] out of range for a model with 4 blocks"),
        ({"keep_rate": 0.7, "locations": [1, 4]}, "out of range"),
        ({"r": [1] * 5}, "5 layers but the model has 4 blocks"),
    ])
    def test_geometry_errors_leave_the_model_untouched(self, params, match):
        model = tiny_vit()
        with pytest.raises(ValueError, match=match):
            tokenreduce.patch(model, "atc", **params)
        assert not tokenreduce.is_patched(model)
        assert all("forward" not in blk.__dict__ for blk in model.blocks)

    def test_keep_ratio_counts_the_patches_present(self):
        """No patch count at patch time is needed: the clusters follow the summed sizes of the tokens present."""
        geometry = Geometry(num_blocks=12, num_prefix=1, num_patches=None, dim=8, num_heads=1)
        method = ATC(geometry, r=None, keep_ratio=0.5, layers=None, linkage="average", prop_attn=True)
        x = torch.randn(1, 41, 8, dtype=torch.float64)
        state = TokenState(x=x, size=torch.ones(1, 41, dtype=torch.float64), keys=x, num_prefix=1, layer=3)
        assert method.clusters_at(state) == 20
        assert method.reduce(state).num_tokens == 21
