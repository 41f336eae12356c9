"""LTMP against the official implementation's recorded outputs (../shared/fixtures/ltmp: the inference model and one
training step), a per-image loop reference of the inference model written from the README, per-image counts in a
batch, every timm variant, the CLIP tower, the thresholds' training (shared trainer: export, resume, DDP), errors."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import tokenreduce
from tokenreduce.methods.ltmp import load_thresholds
from tokenreduce.ops.ltmp import masked_merge_prune
from tokenreduce.train.thresholds import ThresholdConfig, ThresholdTraining, train_thresholds

from ..conftest import REPO, build_fixture_model, fixture_cases, load_case, run_forward_fixture, tiny_vit
from ._cluster_reference import require_host_compile


@pytest.mark.parametrize("case", fixture_cases("ltmp"))
def test_forward_fixture(case):
    results = run_forward_fixture("ltmp", case)
    failed = {k: v for k, v in results.items() if not v[0]}
    assert not failed, failed


def _train_step(case):
    """One training step exactly as the case's notes describe: ``(spec, expected, actual, model)``."""
    spec, t = load_case("ltmp", case)
    model = build_fixture_model(spec["model"])
    model.requires_grad_(False)
    tokenreduce.patch(model, "ltmp", **spec["params"])
    training = ThresholdTraining(model)  # upstream's defaults: reduction target 0.75, reg 10, cls 1, smoothing 0.1
    model.train()
    logits = model(t["input"])
    loss, parts = training.loss(logits, t["target"])
    loss.backward()
    depth = len(model.blocks)
    ratio = training.flops_ratio()
    actual = {"logits": logits.detach(), "loss": loss.detach(),
              "loss_cls": torch.tensor(parts["cls"], dtype=torch.float64),
              "loss_reg": (ratio.detach() - 0.75) ** 2, "flops_ratio": ratio.detach()}
    for layer, mask in enumerate(training.masks()):
        actual[f"mask.{layer}"] = mask.detach()
    for kind in ("prune", "merge"):
        for layer in range(depth):
            actual[f"grad.{kind}.{layer}"] = training.threshold(kind, layer).grad
    return spec, t, actual, model


@pytest.mark.parametrize("case", fixture_cases("ltmp", call="ltmp_train_step"))
def test_train_step_fixture(case):
    spec, expected, actual, model = _train_step(case)
    failed = {}
    for name, tol in spec["compare"].items():
        a, e = actual[name], expected[name]
        assert a is not None, f"{name}: no gradient"
        a, e = a.double(), e.double()
        assert a.shape == e.shape, (name, a.shape, e.shape)
        err = (a - e).abs()
        if not bool((err <= tol["atol"] + tol["rtol"] * e.abs()).all()):
            failed[name] = float(err.max())
    assert not failed, failed
    assert all(p.grad is None for p in model.parameters())  # the backbone is frozen and untouched
    # the informational sizes after every block are upstream's too
    run = tokenreduce.info(model).method_state
    for layer, size in enumerate(run.sizes):
        torch.testing.assert_close(size, expected[f"size.{layer}"].to(size.dtype), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# A loop reference of the inference model, one image at a time
def _attention(block, x, size):
    """Upstream's attention with proportional attention, eager: ``(output [N, C], probs [H, N, N], keys [N, d])``."""
    attn = block.attn
    n, c = x.shape
    qkv = attn.qkv(block.norm1(x)[None]).reshape(1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    probs = ((q * attn.scale) @ k.transpose(-2, -1) + size.log()[None, None, None, :]).softmax(dim=-1)
    out = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(1, n, c)))[0]
    return out, probs[0], k[0].mean(0)


def _ltmp_block(block, x, size, source, merge_thr, prune_thr, p):
    """README steps 1-6 for one image (prefix tokens protected as position 0 is upstream)."""
    n = x.shape[0]
    out, probs, keys = _attention(block, x, size)
    x = x + block.ls1(out)
    imp = [math.inf if t < p else float(probs[:, :, t].mean()) for t in range(n)]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    src, dst = list(range(0, n, 2)), list(range(1, n, 2))
    target = {}
    for i in src:
        if i < p:
            continue
        sims = [(float(unit[i] @ unit[j]), -j) for j in dst if j >= p]
        best, neg_j = max(sims)
        if best > merge_thr:
            target[i] = -neg_j
    y = {t: x[t] * size[t] for t in range(n)}
    s = {t: float(size[t]) for t in range(n)}
    srcs = {t: source[t].clone() for t in range(n)}
    for i, j in target.items():
        y[j] = y[j] + y[i]
        s[j] += s[i]
        imp[j] = max(imp[j], imp[i])
        srcs[j] = torch.maximum(srcs[j], srcs[i])
    order = list(range(p)) + [i for i in src if i >= p and i not in target] + [j for j in dst if j >= p]
    order = [t for t in order if imp[t] > prune_thr]
    x = torch.stack([y[t] / s[t] for t in order])
    size = torch.tensor([s[t] for t in order], dtype=x.dtype)
    source = torch.stack([srcs[t] for t in order])
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, size, source


@torch.no_grad()
def _reference(model, image, merge, prune):
    m = copy.deepcopy(model)
    p = m.num_prefix_tokens
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(image[None]))))[0]
    size = torch.ones(x.shape[0], dtype=x.dtype)
    source = torch.eye(x.shape[0], dtype=x.dtype)
    for layer, block in enumerate(m.blocks):
        x, size, source = _ltmp_block(block, x, size, source, merge[layer], prune[layer], p)
    x = m.norm(x)
    if m.global_pool == "avg":
        pooled = (x[p:] * size[p:, None]).sum(0) / size[p:].sum()
    else:
        pooled = x[0]
    logits = m.head(m.fc_norm(pooled[None]))
    if getattr(m, "head_dist", None) is not None:
        logits = (logits + m.head_dist(x[1][None])) / 2
    return logits[0], size, source


def _model(**kw):
    model = tiny_vit(**kw).double()
    with torch.no_grad():  # sharper attention than the random init: the scores spread out
        for blk in model.blocks:
            blk.attn.qkv.weight.add_(torch.randn_like(blk.attn.qkv.weight) * 0.2)
    return model


def _images(b=3, seed=0):
    return torch.randn(b, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


MERGE, PRUNE = [0.6, 0.55, 0.6, 0.5], [0.01, 0.012, 0.015, 0.01]
VARIANTS = {
    "plain": {},
    "layerscale": {"init_values": 0.1},
    "qk_norm": {"qk_norm": True},
    "registers": {"reg_tokens": 3},
    "no_class_token_avg": {"class_token": False, "global_pool": "avg"},
    "avg_pool_with_cls": {"global_pool": "avg"},
}


# blocks that merge and prune nothing in between (and last): they still reorder the tokens, as upstream
IDLE = ([1.0, 0.55, 1.0, 0.5, 1.0], [0.0, 0.012, 0.0, 0.01, 0.0])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("schedule", ["active", "idle_blocks"])
def test_batch_equals_loop_reference_per_image(variant, schedule):
    """A batch whose images keep different counts: each image equals the loop reference run on it alone (logits,
    sizes and sources in order; padding after the real tokens)."""
    depth = 4 if schedule == "active" else 5
    merge, prune = (MERGE, PRUNE) if schedule == "active" else IDLE
    model, x = _model(depth=depth, **VARIANTS[variant]), _images()
    tokenreduce.patch(model, "ltmp", merge_thresholds=merge, prune_thresholds=prune)
    with torch.no_grad():
        got = model(x)
    info = tokenreduce.info(model)
    counts = []
    for b in range(x.shape[0]):
        logits, size, source = _reference(model, x[b], merge, prune)
        k = size.shape[0]
        counts.append(k)
        torch.testing.assert_close(got[b], logits, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(info.size[b, :k], size, atol=0, rtol=0)
        assert torch.equal(info.source[b, :k], source)
        assert not bool(info.size[b, k:].any()) and not bool(info.source[b, k:].any())
    assert len(set(counts)) > 1, "the thresholds should give different counts per image"
    assert info.tokens_per_sample.tolist() == counts
    assert torch.equal(info.valid, torch.arange(info.size.shape[1])[None] < torch.tensor(counts)[:, None])


def test_distilled_deit_protects_both_tokens():
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                       num_classes=5).double().eval()
    model.set_distilled_training(False)
    x = _images(2)
    tokenreduce.patch(model, "ltmp", merge_thresholds=0.3, prune_thresholds=0.012)
    with torch.no_grad():
        got = model(x)
    info = tokenreduce.info(model)
    for b in range(2):
        logits, size, source = _reference(model, x[b], [0.3] * 4, [0.012] * 4)
        torch.testing.assert_close(got[b], logits, atol=1e-10, rtol=1e-10)
        assert torch.equal(info.source[b, :size.shape[0]], source)
    assert torch.equal(info.source[:, :2, :2], torch.eye(2, dtype=info.source.dtype).expand(2, 2, 2))
    assert info.tokens_per_layer[-1] < 66


def test_zero_reduction_is_exact():
    """The default thresholds (upstream's inference init) reduce nothing: the tokens never move."""
    model, x = _model(), _images()
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "ltmp")
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    info = tokenreduce.info(model)
    assert info.tokens_per_layer == [65] * 4 and info.valid is None
    # the final order is upstream's (the [src, dst] layout applied once per block), as the sources show: with one
    # prefix token the layout sends position t to slot t / 2 (even t) or 33 + (t - 1) / 2, i.e. slot k holds
    # position 2k mod 65, four times over
    assert info.source[0].argmax(-1).tolist() == [(16 * k) % 65 for k in range(65)]
    _, _, source = _reference(model, x[0], [1.0] * 4, [0.0] * 4)
    assert torch.equal(info.source[0], source)


def test_training_path_without_reduction_is_the_model():
    """Thresholds that never fire make the masked path the plain model up to upstream's 1e-5 softmax epsilon."""
    model, x = _model(), _images(2)
    model.train()
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "ltmp", merge_thresholds=1.0, prune_thresholds=0.0)
    ThresholdTraining(model)
    out = model(x)
    torch.testing.assert_close(out.detach(), expected, atol=1e-4, rtol=1e-4)
    assert all(bool((m == 1).all()) for m in tokenreduce.info(model).method_state.masks)


def test_masked_step_equals_loop():
    """The training block step's forward values against a per-image loop written from the case notes."""
    g = torch.Generator().manual_seed(1)
    b, n, c, d = 2, 11, 6, 4
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n), generator=g).double()
    mask = (torch.rand(b, n, generator=g) > 0.3).double()
    mask[:, 0] = 1
    imp = torch.rand(b, n, generator=g, dtype=torch.float64) / n
    imp[:, 0] = math.inf
    keys = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    mt, pt = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)
    out = masked_merge_prune(x, size, mask, imp, keys, mt, pt, 0.5, 1)
    for i in range(b):
        unit = keys[i] / keys[i].norm(dim=-1, keepdim=True) * mask[i, :, None]
        src, dst = list(range(0, n, 2)), list(range(1, n, 2))
        y = {t: x[i, t] * size[i, t] for t in range(n)}
        s = {t: float(size[i, t]) for t in range(n)}
        im = {t: float(imp[i, t]) for t in range(n)}
        m = {t: float(mask[i, t]) for t in range(n)}
        for a in src:
            best, j = max((float(unit[a] @ unit[q]) if a else -math.inf, -q) for q in dst)
            merged = 1.0 if best > 0.1 else 0.0
            if m[a]:
                m[a] = 1.0 - merged
            if merged:
                y[-j] = y[-j] + y[a]
                s[-j] += s[a]
                im[-j] = max(im[-j], im[a] if a else 0.0)
        order = src + dst
        m = [(1.0 if im[t] > 0.05 else 0.0) if m[t] else 0.0 for t in order]
        torch.testing.assert_close(out.x[i], torch.stack([y[t] / s[t] for t in order]), atol=1e-14, rtol=0)
        assert out.size[i].tolist() == [s[t] for t in order]
        assert out.mask[i].tolist() == m


# ---------------------------------------------------------------------------------------------------------------
def test_thresholds_live_outside_the_state_dict_and_unpatch_is_exact():
    model, x = _model(), _images(2)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    tokenreduce.patch(model, "ltmp", merge_thresholds=MERGE, prune_thresholds=PRUNE)
    training = ThresholdTraining(model)
    assert model.state_dict().keys() == before.keys()
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in training.parameters()) and len(training.parameters()) == 8
    tokenreduce.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_clip_tower_inference_and_refused_training():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, image_size=32, patch_size=4)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).double().eval()
    with pytest.raises(ValueError, match="attention_probs.*trainable=False"):
        tokenreduce.patch(model, "ltmp", merge_thresholds=0.5)
    assert not tokenreduce.is_patched(model)
    x = _images(2)
    tokenreduce.patch(model, "ltmp", merge_thresholds=0.5, prune_thresholds=0.012, trainable=False)
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    info = tokenreduce.info(model)
    ref = copy.deepcopy(model)
    tokenreduce.unpatch(ref)
    for b in range(2):
        with torch.no_grad():
            expected = _clip_reference(ref, x[b], 0.5, 0.012)
        k = expected.shape[0]
        torch.testing.assert_close(got[b, :k], expected, atol=1e-10, rtol=1e-10)
        assert int(info.tokens_per_sample[b]) == k if info.tokens_per_sample is not None else got.shape[1] == k
    assert info.tokens_per_layer[-1] < 65


def _clip_reference(model, image, merge_thr, prune_thr):
    x = model.pre_layrnorm(model.embeddings(image[None]))[0]
    size = torch.ones(x.shape[0], dtype=x.dtype)
    for layer in model.encoder.layers:
        sa, n = layer.self_attn, x.shape[0]
        h = layer.layer_norm1(x)
        split = lambda t: t.view(n, sa.num_heads, -1).transpose(0, 1)  # noqa: E731
        q, k, v = split(sa.q_proj(h)), split(sa.k_proj(h)), split(sa.v_proj(h))
        probs = ((q * sa.scale) @ k.transpose(-2, -1) + size.log()[None, None, :]).softmax(-1)
        x = x + sa.out_proj((probs @ v).transpose(0, 1).reshape(n, -1))
        imp = [math.inf if t < 1 else float(probs[:, :, t].mean()) for t in range(n)]
        unit = k.mean(0) / k.mean(0).norm(dim=-1, keepdim=True)
        src, dst = list(range(0, n, 2)), list(range(1, n, 2))
        target = {}
        for i in src[1:]:
            best, neg_j = max((float(unit[i] @ unit[j]), -j) for j in dst)
            if best > merge_thr:
                target[i] = -neg_j
        y = {t: x[t] * size[t] for t in range(n)}
        s = {t: float(size[t]) for t in range(n)}
        for i, j in target.items():
            y[j], s[j], imp[j] = y[j] + y[i], s[j] + s[i], max(imp[j], imp[i])
        order = [0] + [i for i in src[1:] if i not in target] + dst
        order = [t for t in order if imp[t] > prune_thr]
        x = torch.stack([y[t] / s[t] for t in order])
        size = torch.tensor([s[t] for t in order], dtype=x.dtype)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


def test_dynamic_counts_refuse_fullgraph_compile():
    """The token count after every block depends on the data, so LTMP's inference cannot be one static graph
    (docs/methods/ltmp.md says so): fullgraph compilation raises; a plain compile runs the reductions eagerly
    between compiled pieces and equals eager."""
    require_host_compile(_model)  # the claim is about LTMP, not the host
    model, x = _model(), _images(2)
    tokenreduce.patch(model, "ltmp", merge_thresholds=MERGE, prune_thresholds=PRUNE)
    with torch.no_grad():
        eager = model(x)
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(model, fullgraph=True, backend="eager")(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-12)


def test_half_precision_inference_is_finite():
    model = tiny_vit().to(torch.bfloat16)
    tokenreduce.patch(model, "ltmp", merge_thresholds=0.5, prune_thresholds=0.012)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert torch.isfinite(out.float()).all()


def test_fixed_thresholds_in_train_mode_fine_tune_the_backbone():
    """trainable=False: model.train() runs the inference path (tokens removed) with gradients into the model."""
    model = tiny_vit().train()
    tokenreduce.patch(model, "ltmp", merge_thresholds=0.5, prune_thresholds=0.012, trainable=False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert tokenreduce.info(model).tokens_per_layer[-1] < 65
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in tokenreduce.api.method_of(model).thresholds.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Training with the shared trainer
TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10}


def _cfg(tmp_path, name, **kw):
    base = dict(model="vit_tiny_patch16_224", model_kwargs=TINY, synthetic=True, synthetic_size=16, batch_size=4,
                workers=0, progress=False, output=str(tmp_path / name), lr_prune=1e-3, lr_merge=0.5,
                reduction_target=0.5)
    base.update(kw)
    return ThresholdConfig(**base)


def test_training_moves_clamps_exports_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    first = train_thresholds(_cfg(tmp_path, "r", max_steps=2))
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["method"] == "ltmp" and first["steps"] == 2
    resumed = train_thresholds(_cfg(tmp_path, "r", max_steps=4, resume=True))
    straight = train_thresholds(_cfg(tmp_path, "s", max_steps=4))
    assert resumed["steps"] == 4
    assert resumed["per_rank"][0]["digest"] == straight["per_rank"][0]["digest"]
    merge = straight["merge_thresholds"]
    assert merge != [0.9] * 4 and all(0.0 <= v <= 1.0 for v in merge + straight["prune_thresholds"])
    assert 0.0 < straight["last_flops_ratio"] <= 1.0
    values = load_thresholds(tmp_path / "s" / "thresholds.yaml")
    assert values == {"prune": straight["prune_thresholds"], "merge": merge}
    model = tiny_vit()
    tokenreduce.patch(model, "ltmp", thresholds=str(tmp_path / "s" / "thresholds.yaml"))
    assert tokenreduce.api.method_of(model).threshold_values() == values
    history = json.loads((tmp_path / "s" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4] and {"loss", "cls", "reg", "flops_ratio"} <= set(history[0])


def test_two_process_gloo_training(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tokenreduce.train.thresholds", "--model", "vit_tiny_patch16_224", "--model-kwargs",
           json.dumps(TINY), "--synthetic", "--synthetic-size", "32", "--batch-size", "4", "--max-steps", "3",
           "--lr", "1e-3", "0.5", "--workers", "0", "--no-progress", "--output", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["ranks_agree"]
    ranks = summary["per_rank"]
    assert ranks[0]["merge"] == ranks[1]["merge"] and ranks[0]["merge"] != [0.9] * 4
    assert load_thresholds(out / "thresholds.yaml")["merge"] == ranks[0]["merge"]


class TestErrors:
    @pytest.mark.parametrize("params,error,match", [
        ({"merge_thresholds": [0.5, 0.5]}, ValueError, "2 entries but the model has 4 blocks"),
        ({"prune_thresholds": "x"}, ValueError, "a number .* or a list"),
        ({"tau": 0}, ValueError, "tau"),
        ({"thresholds": "/nonexistent.yaml"}, ValueError, "not found"),
        ({"trainable": 1}, ValueError, "True or False"),
        ({"keep": 3}, TypeError, "unknown parameter"),
    ])
    def test_bad_params_leave_the_model_untouched(self, params, error, match):
        model = tiny_vit()
        with pytest.raises(error, match=match):
            tokenreduce.patch(model, "ltmp", **params)
        assert not tokenreduce.is_patched(model)

    def test_yaml_and_lists_are_exclusive(self, tmp_path):
        path = tmp_path / "t.yaml"
        path.write_text("prune_thresholds: [0, 0, 0, 0]\nmerge_thresholds: [1, 1, 1, 1]\n")
        with pytest.raises(ValueError, match="either thresholds="):
            tokenreduce.patch(tiny_vit(), "ltmp", thresholds=str(path), merge_thresholds=0.5)

    def test_training_handle_errors(self):
        model = tiny_vit()
        tokenreduce.patch(model, "ltmp", trainable=False)
        with pytest.raises(ValueError, match="trainable=False"):
            ThresholdTraining(model)
        tokenreduce.patch(model, "tome", r=2)
        with pytest.raises(ValueError, match="not 'ltmp'"):
            ThresholdTraining(model)
        tokenreduce.patch(model, "ltmp")
        training = ThresholdTraining(model)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))  # an eval forward: no masks to train on
        with pytest.raises(RuntimeError, match="train\\(\\)"):
            training.flops_ratio()
