"""The timm VisionTransformer adapter: exactness at zero reduction, reversibility, timm options, dtypes, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.backbones.timm_vit import TimmViTAdapter

from ..conftest import tiny_vit

# Each variant exercises one timm feature the adapter must keep working.
VARIANTS = {
    "plain": {},
    "layerscale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
    "attn_norm": {"scale_attn_norm": True},
    "norm_pre": {"pre_norm": True},
    "registers": {"reg_tokens": 4},
    "no_class_token_avg": {"class_token": False, "global_pool": "avg"},
    "avg_pool_with_cls": {"global_pool": "avg"},
    "dynamic_img_size": {"dynamic_img_size": True},
    "fc_norm": {"global_pool": "avg", "fc_norm": True},
}


def _images(b=2, hw=32):
    return torch.randn(b, 3, hw, hw)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_reduction_matches_unpatched(variant):
    model = tiny_vit(**VARIANTS[variant])
    x = _images()
    with torch.no_grad():
        expected = model(x)
        tokenreduce.patch(model, "tome", r=0)
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reduces_and_keeps_prefix_tokens(variant):
    model = tiny_vit(**VARIANTS[variant])
    x = _images()
    with torch.no_grad():
        ref = model.forward_features(x)
    tokenreduce.patch(model, "tome", r=4, trace_source=True)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    info = tokenreduce.info(model)
    p = model.num_prefix_tokens
    n0 = ref.shape[1]
    assert info.tokens_per_layer == [n0 - 4 * i for i in range(4)]
    assert feats.shape[1] == n0 - 16 and logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    # Prefix tokens are never merged: each stands for itself, in its place.
    assert torch.equal(info.size[:, :p], torch.ones(2, p))
    assert torch.equal(info.source[:, :p, :p], torch.eye(p).expand(2, p, p))
    # Every input token ends up in exactly one output token, and sizes count them.
    assert torch.equal(info.source.sum(1), torch.ones(2, n0))
    assert torch.equal(info.source.sum(-1), info.size)


def test_unpatch_is_bit_exact_and_state_dict_untouched():
    model = tiny_vit(init_values=0.1, reg_tokens=2)
    pristine = copy.deepcopy(model)
    x = _images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenreduce.patch(model, "tome", r=3)
    after_patch = model.state_dict()
    assert list(after_patch) == list(before)
    assert all(torch.equal(after_patch[k], before[k]) for k in before)
    with torch.no_grad():
        model(x)
    tokenreduce.unpatch(model)
    assert not tokenreduce.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), pristine(x))
    assert all("forward" not in blk.__dict__ for blk in model.blocks)
    assert not any(blk.attn.k_norm._forward_hooks for blk in model.blocks)


def test_repatch_replaces_previous_method():
    model = tiny_vit()
    x = _images()
    tokenreduce.patch(model, "tome", r=2)
    tokenreduce.patch(model, "tome", r=5)
    with torch.no_grad():
        model(x)
    assert tokenreduce.info(model).tokens_per_layer == [65, 60, 55, 50]
    assert sum(len(b.attn.k_norm._forward_hooks) for b in model.blocks) == 4


def test_patching_is_per_instance():
    a, b = tiny_vit(), tiny_vit()
    x = _images()
    with torch.no_grad():
        ref = b(x)
        tokenreduce.patch(a, "tome", r=4)
        ya, yb = a(x), b(x)
    assert torch.equal(yb, ref)  # the other instance computes exactly what it did
    assert not torch.allclose(ya, yb)  # the patched one reduced
    assert tokenreduce.info(a).tokens_per_layer[-1] < tokenreduce.info(a).tokens_per_layer[0]
    assert not tokenreduce.is_patched(b)
    assert type(a) is type(b)  # no class was rebound


def test_fresh_state_every_forward_and_batch_sizes():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=4, trace_source=True)
    with torch.no_grad():
        for batch in (1, 64, 3):
            model(_images(batch))
            info = tokenreduce.info(model)
            assert info.size.shape == (batch, 65 - 16)
            assert info.source.shape == (batch, 65 - 16, 65)


def test_batch_elements_are_independent():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=6)
    x = _images(5)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_forward_intermediates_nlc_and_nchw_refusal():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=4)
    x = _images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
    assert [t.shape[1] for t in inter] == [60, 56, 52, 48]
    assert tokenreduce.info(model).tokens_per_layer == [65, 61, 57, 53]
    with pytest.raises(ValueError, match="NLC"):
        model.forward_intermediates(x)


def test_training_backward_through_merges_with_drop_path():
    model = tiny_vit(drop_path_rate=0.1, init_values=0.1).train()
    tokenreduce.patch(model, "tome", r=4)
    loss = F.cross_entropy(model(_images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_attn_mask_passes_through_at_zero_reduction():
    model = tiny_vit()
    x = _images()
    mask = torch.zeros(2, 1, 65, 65)
    mask[..., -5:] = float("-inf")
    with torch.no_grad():
        expected = model.forward_features(x, attn_mask=mask)
        tokenreduce.patch(model, "tome", r=0)
        got = model.forward_features(x, attn_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    tokenreduce.patch(model, "tome", r=4)
    with pytest.raises(ValueError, match="mask covers"):
        model.forward_features(x, attn_mask=mask)


def test_dynamic_img_size_other_resolution():
    model = tiny_vit(dynamic_img_size=True)
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad():
        model(_images(2, hw=48))
    assert tokenreduce.info(model).tokens_per_layer[0] == 1 + 12 * 12


def test_distilled_deit_protects_both_tokens():
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3,
                                       num_classes=5).eval()
    tokenreduce.patch(model, "tome", r=8, trace_source=True)
    with torch.no_grad():
        model(_images())
    info = tokenreduce.info(model)
    assert info.tokens_per_layer == [66, 58, 50]
    assert torch.equal(info.source[:, :2, :2], torch.eye(2).expand(2, 2, 2))


def test_eager_attention_fallback_matches_fused():
    model = tiny_vit()
    x = _images()
    tokenreduce.patch(model, "tome", r=6)
    with torch.no_grad():
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        eager = model(x)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    model = tiny_vit().to(dtype)
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad():
        out = model(_images().to(dtype))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert tokenreduce.info(model).size.dtype == dtype


def test_autocast_bf16_forward():
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_images())
    assert torch.isfinite(out.float()).all()


def test_size_weighted_pool():
    """An avg-pooled head weights each token by the number of patches it stands for."""
    model = tiny_vit(class_token=False, global_pool="avg")
    x = _images()
    tokenreduce.patch(model, "tome", r=8)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.pool(feats)
    size = tokenreduce.info(model).size
    expected = (feats * size[..., None]).sum(1) / size.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected)
    tokenreduce.patch(model, "tome", r=8, size_weighted_pool=False)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.pool(feats), feats.mean(1))


def _count_attention_matmuls(model):
    # FlopCounterMode has no formula for the CPU flash-attention kernel; the eager path is two plain matmuls.
    for blk in model.blocks:
        blk.attn.fused_attn = False


def test_flops_match_flop_counter():
    """info(model).flops (MACs per image) is half of what FlopCounterMode counts on the model's layers."""
    from torch.utils.flop_counter import FlopCounterMode
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    for model in (tiny_vit(init_values=0.1),
                  VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3).eval()):
        tokenreduce.patch(model, "tome", r=[6, 3, 5])
        _count_attention_matmuls(model)
        x = _images(3)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        by_module = counter.get_flop_counts()
        # The matching's own A·Bᵀ is part of the block but not of the analytic model: count the layers only.
        layer_names = [n for n in by_module if n.count(".") == 1 and n.split(".")[1] in
                       ("patch_embed", "head", "head_dist")]
        layer_names += [n for n in by_module if n.count(".") == 3 and n.split(".")[-1] in ("attn", "mlp")]
        counted = sum(sum(by_module[n].values()) for n in layer_names)
        assert counted > 0
        assert 2 * tokenreduce.info(model).flops * x.shape[0] == counted


def test_flops_unpatched_equivalent_at_r0():
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_vit()
    tokenreduce.patch(model, "tome", r=0)
    _count_attention_matmuls(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(_images(1))
    assert 2 * tokenreduce.info(model).flops == counter.get_total_flops()


def test_torch_compile_fullgraph():
    model = tiny_vit()
    x = _images()
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(x)
    torch.testing.assert_close(got, eager)
    assert tokenreduce.info(model).tokens_per_layer == [65, 61, 57, 53]


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    model = tiny_vit()
    x = _images()
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)


class TestErrors:
    def test_unknown_method(self):
        with pytest.raises(ValueError, match="registered methods: .*tome"):
            tokenreduce.patch(tiny_vit(), "tomee", r=4)

    def test_unknown_parameter(self):
        with pytest.raises(TypeError, match="unknown parameter.*'rr'.*accepts: r"):
            tokenreduce.patch(tiny_vit(), "tome", rr=4)

    @pytest.mark.parametrize("r", [-1, 2.5, "8", [1, -2], [4, 4, 4, 4, 4], True])
    def test_invalid_r(self, r):
        with pytest.raises(ValueError):
            tokenreduce.patch(tiny_vit(), "tome", r=r)

    def test_invalid_bool(self):
        with pytest.raises(ValueError, match="prop_attn"):
            tokenreduce.patch(tiny_vit(), "tome", r=4, prop_attn="yes")

    def test_unsupported_model(self):
        with pytest.raises(ValueError, match="does not support .*Linear.*Supported"):
            tokenreduce.patch(torch.nn.Linear(3, 3), "tome", r=4)

    def test_unsupported_block(self):
        import timm
        model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, class_token=True,
                                  block_fn=timm.models.vision_transformer.ResPostBlock)
        with pytest.raises(ValueError, match="ResPostBlock"):
            tokenreduce.patch(model, "tome", r=4)

    def test_unsupported_family(self):
        import timm
        model = timm.create_model("resnet18", pretrained=False)
        with pytest.raises(ValueError, match="does not support"):
            tokenreduce.patch(model, "tome", r=4)

    def test_failed_patch_leaves_model_untouched(self):
        model = tiny_vit()
        with pytest.raises(ValueError):
            tokenreduce.patch(model, "tome", r=[1] * 9)
        assert not tokenreduce.is_patched(model)
        assert all("forward" not in blk.__dict__ for blk in model.blocks)

    def test_info_and_unpatch_on_unpatched_model(self):
        with pytest.raises(ValueError, match="not patched"):
            tokenreduce.info(tiny_vit())
        with pytest.raises(ValueError, match="not patched"):
            tokenreduce.unpatch(tiny_vit())

    def test_info_before_forward(self):
        model = tokenreduce.patch(tiny_vit(), "tome", r=2)
        with pytest.raises(RuntimeError, match="forward"):
            tokenreduce.info(model)


def test_adapter_declares_capabilities():
    from tokenreduce.core import Site
    assert set(TimmViTAdapter.provides) == {Site.BLOCK_IN, Site.BLOCK_MID, Site.BLOCK_OUT}
    for needs in TimmViTAdapter.provides.values():
        assert {"keys", "cls_attn", "attn", "values_per_head", "attention_probs", "valid"} <= needs
    assert "image_mask" not in TimmViTAdapter.provides[Site.BLOCK_MID]


def test_pretrained_path_with_local_checkpoint(tmp_path, monkeypatch):
    """`pretrained=True` as users call it, served from a local file (no download)."""
    import timm
    from safetensors.torch import save_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=7)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=64, num_classes=7,
                              pretrained_cfg_overlay={"file": str(path), "custom_load": False}).eval()
    x = _images(2, hw=64)
    with torch.no_grad():
        # The head differs from the checkpoint's 1000 classes, so timm re-initialises it: compare the features.
        torch.testing.assert_close(model.forward_features(x), source.eval().forward_features(x))
        tokenreduce.patch(model, "tome", r=3)
        assert model(x).shape == (2, 7)
    assert tokenreduce.info(model).tokens_per_layer[:3] == [17, 14, 11]


def test_projection_plan_computes_only_the_columns_read():
    """timm's fused qkv keeps one contiguous range of columns; separate q/k/v linears are skipped whole; a read set
    that is not one range computes the linear whole."""
    from tokenreduce.backbones.layer_host import projection_plan
    from tokenreduce.backbones.timm_vit import TimmBlockFamily
    model = tiny_vit()
    proj = TimmBlockFamily().projections(model.blocks[0])
    qkv, c = model.blocks[0].attn.qkv, model.blocks[0].attn.qkv.in_features
    assert projection_plan(proj, frozenset("qk")) == (((qkv, slice(0, 2 * c)),), c * c)
    assert projection_plan(proj, frozenset("v")) == (((qkv, slice(2 * c, 3 * c)),), 2 * c * c)
    assert projection_plan(proj, frozenset("qv")) == ((), 0)
    assert projection_plan(proj, frozenset("qkv")) == ((), 0)
    linears = {n: torch.nn.Linear(8, 8) for n in "qkv"}
    separate = {n: (m, slice(None)) for n, m in linears.items()}
    assert projection_plan(separate, frozenset("v")) == (((linears["q"], None), (linears["k"], None)), 128)


@pytest.mark.parametrize("cols", [slice(0, 16), slice(16, 24), slice(8, 16)])
def test_skipped_columns_cost_no_fill_and_no_copy_in_inference(cols):
    """In inference a planned linear writes only its kept columns into a buffer no larger than those columns (plus
    padding), and the full-width result still splits into q / k / v heads as a view; with autograd the skipped
    columns are zeros. The kept columns equal the whole linear's either way."""
    from tokenreduce.backbones.layer_host import SkipProjections
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(8, 24), torch.randn(2, 5, 8)
    full = linear(x)
    with torch.no_grad(), SkipProjections(((linear, cols),)):
        out = linear(x)
    assert out.shape == full.shape
    torch.testing.assert_close(out[..., cols], full[..., cols], rtol=0, atol=1e-6)
    kept = cols.stop - cols.start
    assert out.untyped_storage().nbytes() == 4 * (2 * 5 * kept + 24 - kept)
    heads = out.reshape(2, 5, 3, 2, 4)  # timm's reshape into heads stays a view of that buffer
    assert heads.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    assert torch.isfinite(out).all()
    with SkipProjections(((linear, cols),)):
        graded = linear(x)
    torch.testing.assert_close(graded[..., cols], full[..., cols], rtol=0, atol=1e-6)
    rest = torch.ones(24, dtype=torch.bool)
    rest[cols] = False
    assert (graded[..., rest] == 0).all() and graded.requires_grad


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_probs_in_inference_equals_the_functional_softmax(autocast):
    """The in-place shortcuts of inference (scaled, masked and softmaxed over the logits' own memory) give the
    functional result, dtype included: under autocast, softmax chooses its output dtype and a float32 mask
    promotes, so no in-place op is taken there."""
    from tokenreduce.backbones.layer_host import attention_probs
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4)
    bias = torch.randn(2, 1, 1, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = ((q * 0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        got = attention_probs(q, k, 0.5, bias)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)
