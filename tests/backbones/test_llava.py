"""The HF CLIP and LLaVA adapters on tiny random models: batching with left padding, KV-cache generation, prompt
shrinking, unpatch, transformers' generate arguments, and ToMe on the CLIP tower against the timm adapter."""
import copy
from functools import partial

import pytest
import torch

import tokenreduce

from ..llava_helpers import IMAGE_TOKEN, METHODS, greedy, left_pad, pixels, prompts, tiny_llava, transformers
from tokenreduce.backbones.vlm.prompt import image_runs, restore_prompt, shrink_image_runs
from tokenreduce.backbones.vlm.tower import feature_layer_index


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch():
    rows = prompts()
    ids, mask = left_pad(rows)
    return rows, ids, mask, pixels(len(rows))


@pytest.fixture
def patched(llava, request):
    method, params = request.param
    tokenreduce.patch(llava, method, **params)
    yield llava
    tokenreduce.unpatch(llava)


# ----------------------------------------------------------------------------------------------------------------
# Prompt helpers
# ----------------------------------------------------------------------------------------------------------------
def test_image_runs():
    row = torch.tensor([1, 9, 9, 5, 9, 7, 9, 9, 9])
    assert image_runs(row, 9) == [(1, 3), (4, 5), (6, 9)]
    assert image_runs(torch.tensor([1, 2]), 9) == []


def test_shrink_image_runs_equal_lengths_left_padding():
    ids = torch.tensor([[0, 1, 9, 9, 9, 9, 4], [1, 3, 9, 9, 9, 9, 5]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    labels = torch.tensor([[-100, 1, -100, -100, -100, -100, 4], [1, 3, -100, -100, -100, -100, 5]])
    out = shrink_image_runs(ids, 9, [2, 2], attention_mask=mask, labels=labels, position_ids=pos)
    assert out["input_ids"].tolist() == [[0, 1, 9, 9, 4], [1, 3, 9, 9, 5]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 1, -100, -100, 4], [1, 3, -100, -100, 5]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_shrink_image_runs_repads_and_keeps_cached_mask():
    ids = torch.tensor([[1, 9, 9, 9, 2, 9, 9, 9], [3, 3, 3, 1, 9, 9, 9, 2]])
    mask = torch.ones(2, 3 + 8, dtype=torch.long)  # 3 cached tokens before this chunk
    out = shrink_image_runs(ids, 9, [1, 2, 1], attention_mask=mask, pad_token_id=0)
    assert out["input_ids"].tolist() == [[0, 1, 9, 2, 9, 9], [3, 3, 3, 1, 9, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 1, 1], [1] * 9]


def test_shrink_image_runs_adjacent_images_and_errors():
    ids = torch.tensor([[1] + [9] * 8 + [2]])  # two adjacent 4-token images form one run
    assert shrink_image_runs(ids, 9, [2, 3])["input_ids"].tolist() == [[1, 9, 9, 9, 9, 9, 2]]
    with pytest.raises(ValueError, match="image tokens"):
        shrink_image_runs(torch.tensor([[1, 9, 9, 2]]), 9, [3])
    with pytest.raises(ValueError, match="images came back"):
        shrink_image_runs(torch.tensor([[1, 9, 9, 9, 2]]), 9, [1, 1])


def test_restore_prompt_repeats_for_beams():
    prompt = torch.tensor([[5, 9, 9, 9], [6, 9, 9, 9]])
    seq = torch.tensor([[5, 9, 7], [5, 9, 8], [6, 9, 7], [6, 9, 7]])
    assert restore_prompt(seq, prompt, 2).tolist() == [[5, 9, 9, 9, 7], [5, 9, 9, 9, 8], [6, 9, 9, 9, 7],
                                                        [6, 9, 9, 9, 7]]


def test_feature_layer_index():
    assert feature_layer_index(-2, 24) == 22 and feature_layer_index(-1, 24) == 23 and feature_layer_index(0, 24) == -1
    with pytest.raises(ValueError):
        feature_layer_index(-26, 24)


# ----------------------------------------------------------------------------------------------------------------
# Per-sample batching, KV cache, unpatch
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patched", METHODS, ids=[m for m, _ in METHODS], indirect=True)
def test_batch_with_left_padding_equals_each_sample_alone(patched, batch):
    rows, ids, mask, pv = batch
    new, logits = greedy(patched, ids, mask, pv)
    for i, row in enumerate(rows):
        alone_new, alone_logits = greedy(patched, row[None], torch.ones(1, len(row), dtype=torch.long), pv[i:i + 1])
        assert torch.equal(alone_new, new[i:i + 1])
        torch.testing.assert_close(alone_logits, logits[i:i + 1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("patched", METHODS[:2], ids=[m for m, _ in METHODS[:2]], indirect=True)
def test_generate_with_cache_equals_without(patched, batch):
    _, ids, mask, pv = batch
    new, logits = greedy(patched, ids, mask, pv)
    new_nc, logits_nc = greedy(patched, ids, mask, pv, use_cache=False)
    assert torch.equal(new, new_nc)
    torch.testing.assert_close(logits, logits_nc, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
def test_unpatch_restores_outputs_and_state_dict_untouched(method, params, batch):
    model = tiny_llava()
    _, ids, mask, pv = batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    tokenreduce.patch(model, method, **params)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        reduced = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert reduced.shape[1] < ref.shape[1]
    tokenreduce.unpatch(model)
    assert not any(k in model.__dict__ for k in ("forward", "generate"))
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert torch.equal(again, ref)


# ----------------------------------------------------------------------------------------------------------------
# Vision-side methods: the LLM gets the shrunk run
# ----------------------------------------------------------------------------------------------------------------
def test_tome_on_clip_tower_shrinks_the_image_run(llava, batch):
    rows, ids, mask, pv = batch
    tokenreduce.patch(llava, "tome", r=8)
    try:
        with torch.no_grad():
            feats = llava.get_image_features(pixel_values=pv).pooler_output
            out = llava(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=True)
        info = tokenreduce.info(llava)
        # 65 tokens, 8 merged in each of the 2 layers feeding layer -2, CLS dropped by the "default" strategy
        assert [f.shape[0] for f in feats] == [48, 48, 48]
        assert info.tokens_per_layer == [65, 57, 49]
        assert out.logits.shape[1] == ids.shape[1] - 16
        assert out.past_key_values.get_seq_length() == ids.shape[1] - 16
        new, _ = greedy(llava, ids, mask, pv, max_new_tokens=2)
        assert new.shape == (3, 2)
    finally:
        tokenreduce.unpatch(llava)


def test_prompt_with_reduced_run_is_used_as_is(llava, batch):
    """A prompt that already holds one image token per feature (the fixtures' layout) is not changed."""
    rows, _, _, pv = batch
    tokenreduce.patch(llava, "visionzip", dominant=10, contextual=4)
    try:
        starts = [int((r == IMAGE_TOKEN).nonzero()[0]) for r in rows]
        short = [torch.cat([r[:b], torch.full((14,), IMAGE_TOKEN), r[b:][r[b:] != IMAGE_TOKEN]])
                 for r, b in zip(rows, starts)]
        ids, mask = left_pad(short)
        full_ids, full_mask = left_pad(rows)
        with torch.no_grad():
            a = llava(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
            full = llava(input_ids=full_ids, attention_mask=full_mask, pixel_values=pv).logits
        new, logits = greedy(llava, ids, mask, pv, max_new_tokens=2)
        new_full, logits_full = greedy(llava, full_ids, full_mask, pv, max_new_tokens=2)
        assert a.shape[1] == ids.shape[1]
        # the full prompt is shrunk to exactly this one: the same logits and the same answer
        torch.testing.assert_close(a, full, atol=1e-12, rtol=1e-12)
        assert torch.equal(new, new_full)
        torch.testing.assert_close(logits, logits_full, atol=1e-12, rtol=1e-12)
    finally:
        tokenreduce.unpatch(llava)


@pytest.mark.parametrize("patched", METHODS, ids=[m for m, _ in METHODS], indirect=True)
def test_generate_arguments_keep_working(patched, batch):
    _, ids, mask, pv = batch
    with torch.no_grad():
        beams = patched.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=3,
                                 num_beams=2, num_return_sequences=2, do_sample=False)
        torch.manual_seed(0)
        sampled = patched.generate(ids, attention_mask=mask, pixel_values=pv, max_new_tokens=3, do_sample=True,
                                   top_k=5, repetition_penalty=1.3)
        out = patched(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=ids.masked_fill(
            ids == IMAGE_TOKEN, -100))
    assert beams.shape == (6, ids.shape[1] + 3)
    assert torch.equal(beams[::2, :ids.shape[1]], ids)  # the caller's prompt stays in front of the answer
    assert sampled.shape == (3, ids.shape[1] + 3) and torch.equal(sampled[:, :ids.shape[1]], ids)
    assert torch.isfinite(out.loss)


def test_visionzip_patch_errors():
    model = tiny_llava(vision_layers=2, lm_layers=2)
    with pytest.raises(ValueError, match="contextual=60 exceeds"):
        tokenreduce.patch(model, "visionzip", dominant=10, contextual=60)
    with pytest.raises(ValueError, match="must be >= 1"):
        tokenreduce.patch(model, "visionzip", dominant=0, contextual=4)
    with pytest.raises(ValueError, match="dominant=70"):
        tokenreduce.patch(model, "visionzip", dominant=70, contextual=0)
    assert not tokenreduce.is_patched(model)
    tokenreduce.patch(model, "visionzip", dominant=10, contextual=4)
    with pytest.raises(ValueError, match="patched for vision_feature_layer"):
        model.get_image_features(pixel_values=pixels(1), vision_feature_layer=-1)


# ----------------------------------------------------------------------------------------------------------------
# DART: KV cache, eager, warm cache
# ----------------------------------------------------------------------------------------------------------------
def _freeze_selection(model):
    """Make DART reuse, for every later forward, the image tokens it kept in the first one (so generation without a
    cache, which re-prunes at every step, sees the same kept set as generation with one)."""
    method = tokenreduce.method_of(model)
    select, memo = method.select, {}

    def frozen(state):
        image = state.image_mask
        if "img" not in memo:
            kept = select(state)
            memo["img"] = [k[image[b, k]] for b, k in enumerate(kept)]
        keep = ~image
        for b, idx in enumerate(memo["img"]):
            keep[b, idx] = True
        return torch.stack([k.nonzero()[:, 0] for k in keep])

    method.select = frozen


def test_dart_generate_with_cache_equals_without_for_the_same_kept_tokens(batch):
    model = tiny_llava()
    _, ids, mask, pv = batch
    tokenreduce.patch(model, "dart", layer=1, image_pivots=2, text_pivots=2, per_pivot=4)
    _freeze_selection(model)
    new, logits = greedy(model, ids, mask, pv)
    new_nc, logits_nc = greedy(model, ids, mask, pv, use_cache=False)
    assert torch.equal(new, new_nc)
    torch.testing.assert_close(logits, logits_nc, atol=1e-6, rtol=1e-6)


def test_dart_eager_equals_sdpa(batch):
    _, ids, mask, pv = batch
    runs = []
    for attn in ("sdpa", "eager"):
        model = tiny_llava(attn)
        tokenreduce.patch(model, "dart", layer=1, image_pivots=2, text_pivots=2, per_pivot=4)
        runs.append(greedy(model, ids, mask, pv))
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-6, rtol=1e-6)


def test_dart_cache_layout_and_warm_cache_prefill(llava, batch):
    _, ids, mask, pv = batch
    tokenreduce.patch(llava, "dart", layer=1, image_pivots=2, text_pivots=2, per_pivot=4)
    try:
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            out = llava(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=pos, use_cache=True)
            cache = out.past_key_values
            kept = tokenreduce.info(llava).kept[1]
            s, s_kept = ids.shape[1], ids.shape[1] - 64 + 18
            assert kept.shape == (3, s_kept) and out.logits.shape[1] == s_kept
            assert [l.keys.shape[2] for l in cache.layers] == [s, s_kept, s_kept]
            # a second prefill of text on the warm cache prunes nothing and equals feeding it token by token
            step_cache = copy.deepcopy(cache)
            chunk = torch.randint(3, 60, (3, 5), generator=torch.Generator().manual_seed(3))
            mask2 = torch.cat([mask, torch.ones(3, 5, dtype=torch.long)], 1)
            pos2 = pos[:, -1:] + 1 + torch.arange(5)
            at_once = llava(input_ids=chunk, attention_mask=mask2, position_ids=pos2, past_key_values=cache,
                            use_cache=True).logits
            assert [l.keys.shape[2] for l in cache.layers] == [s + 5, s_kept + 5, s_kept + 5]
            steps = [llava(input_ids=chunk[:, t:t + 1], attention_mask=mask2[:, :s + t + 1],
                           position_ids=pos2[:, t:t + 1], past_key_values=step_cache, use_cache=True).logits
                     for t in range(5)]
        torch.testing.assert_close(torch.cat(steps, 1), at_once, atol=1e-10, rtol=1e-10)
    finally:
        tokenreduce.unpatch(llava)


def test_dart_labels_follow_the_kept_tokens(llava, batch):
    _, ids, mask, pv = batch
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100).masked_fill(mask == 0, -100)
    tokenreduce.patch(llava, "dart", layer=1, image_pivots=2, text_pivots=2, per_pivot=4)
    try:
        with torch.no_grad():
            out = llava(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels)
        kept = tokenreduce.info(llava).kept[1]
        expected = llava.loss_function(logits=out.logits, labels=labels.gather(1, kept), vocab_size=64)
        torch.testing.assert_close(out.loss, expected)
    finally:
        tokenreduce.unpatch(llava)


@pytest.mark.parametrize("text_model", ["llama", "qwen2", "qwen3"])
def test_dart_keys_and_batching_on_language_models(text_model, batch):
    """DART's pivot keys are exactly the post-RoPE keys layer K-1 caches (Qwen2: biased k_proj; Qwen3: k_norm
    before RoPE), and selection is per sample."""
    rows, ids, mask, pv = batch
    model = tiny_llava(text_model=text_model, vision_layers=2)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=pos, use_cache=True)
    tokenreduce.patch(model, "dart", layer=2, image_pivots=2, text_pivots=2, per_pivot=4)
    method, seen = tokenreduce.method_of(model), {}
    select = method.select
    method.select = lambda state: seen.setdefault("keys", state.keys_per_head) is not None and select(state)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=pos, use_cache=True)
    torch.testing.assert_close(seen["keys"], ref.past_key_values.layers[1].keys, atol=1e-12, rtol=1e-12)
    method.select = select
    new, logits = greedy(model, ids, mask, pv, max_new_tokens=2)
    alone_new, alone_logits = greedy(model, rows[0][None], torch.ones(1, len(rows[0]), dtype=torch.long), pv[:1],
                                     max_new_tokens=2)
    assert torch.equal(alone_new, new[:1])
    torch.testing.assert_close(alone_logits, logits[:1], atol=1e-6, rtol=1e-6)


def test_dart_errors():
    model = tiny_llava(vision_layers=2, lm_layers=2)
    with pytest.raises(ValueError, match="must be below the language model's 2 layers"):
        tokenreduce.patch(model, "dart", layer=2)
    with pytest.raises(ValueError, match="every image token would be dropped"):
        tokenreduce.patch(model, "dart", layer=1, image_pivots=0, text_pivots=0, per_pivot=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        tokenreduce.patch(model, "dart", layer=0)
    with pytest.raises(ValueError, match="not both"):
        tokenreduce.patch(model, "dart", per_pivot=4, budget=64)
    tokenreduce.patch(model, "dart", layer=1, image_pivots=4, text_pivots=4, per_pivot=16)
    ids, mask = left_pad(prompts(lengths=((3, 5),)))
    with pytest.raises(ValueError, match="only 64"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels(1))


# ----------------------------------------------------------------------------------------------------------------
# The CLIP host on its own: ToMe on HF CLIP == ToMe on timm with the same weights
# ----------------------------------------------------------------------------------------------------------------
def _clip_and_timm():
    from timm.models.vision_transformer import VisionTransformer
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, image_size=32, patch_size=4, hidden_act="quick_gelu")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(cfg).double().eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0,
                            qkv_bias=True, pre_norm=True, num_classes=0, global_pool="token",
                            act_layer="quick_gelu", norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)).double().eval()
    emb, sd = clip.embeddings, {}
    sd["cls_token"] = emb.class_embedding.view(1, 1, -1)
    sd["pos_embed"] = emb.position_embedding.weight[None]
    sd["patch_embed.proj.weight"] = emb.patch_embedding.weight
    for n in ("weight", "bias"):
        sd[f"norm_pre.{n}"] = getattr(clip.pre_layrnorm, n)
        sd[f"norm.{n}"] = getattr(clip.post_layernorm, n)
    for i, layer in enumerate(clip.encoder.layers):
        a = layer.self_attn
        for n in ("weight", "bias"):
            sd[f"blocks.{i}.norm1.{n}"] = getattr(layer.layer_norm1, n)
            sd[f"blocks.{i}.norm2.{n}"] = getattr(layer.layer_norm2, n)
            sd[f"blocks.{i}.attn.qkv.{n}"] = torch.cat([getattr(a.q_proj, n), getattr(a.k_proj, n),
                                                        getattr(a.v_proj, n)])
            sd[f"blocks.{i}.attn.proj.{n}"] = getattr(a.out_proj, n)
            sd[f"blocks.{i}.mlp.fc1.{n}"] = getattr(layer.mlp.fc1, n)
            sd[f"blocks.{i}.mlp.fc2.{n}"] = getattr(layer.mlp.fc2, n)
    vit.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return clip, vit


def _clip_tokens(clip, x):
    return clip.post_layernorm(clip(pixel_values=x).last_hidden_state)


def test_tome_on_hf_clip_matches_tome_on_timm():
    clip, vit = _clip_and_timm()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_clip_tokens(clip, x), vit.forward_features(x), atol=1e-10, rtol=1e-10)
        for model in (clip, vit):
            tokenreduce.patch(model, "tome", r=6, trace_source=True)
        got, want = _clip_tokens(clip, x), vit.forward_features(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    ci, ti = tokenreduce.info(clip), tokenreduce.info(vit)
    assert ci.tokens_per_layer == ti.tokens_per_layer == [65, 59, 53, 47]
    assert torch.equal(ci.size, ti.size) and torch.equal(ci.source, ti.source)


def test_hf_clip_zero_reduction_and_unpatch_are_exact():
    clip, _ = _clip_and_timm()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = clip(pixel_values=x, output_hidden_states=True)
        tokenreduce.patch(clip, "tome", r=0)
        same = clip(pixel_values=x, output_hidden_states=True)
        tokenreduce.patch(clip, "tome", r=4)
        merged = clip(pixel_values=x, output_hidden_states=True)
        tokenreduce.unpatch(clip)
        again = clip(pixel_values=x).pooler_output
    assert torch.equal(same.pooler_output, ref.pooler_output)
    assert [h.shape[1] for h in merged.hidden_states] == [65, 61, 57, 53, 49]
    assert torch.equal(again, ref.pooler_output)


def test_clip_with_projection_and_pitome_on_llava(batch):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=4, projection_dim=16)
    model = transformers.CLIPVisionModelWithProjection(cfg).double().eval()
    tokenreduce.patch(model, "tome", r=4)
    with torch.no_grad():
        assert model(pixel_values=torch.randn(1, 3, 32, 32, dtype=torch.float64)).image_embeds.shape == (1, 16)
    assert tokenreduce.info(model).tokens_per_layer == [65, 61]
    llava = tiny_llava(vision_layers=3, lm_layers=2)
    rows, ids, mask, pv = batch
    tokenreduce.patch(llava, "pitome", ratio=0.8)
    new, logits = greedy(llava, ids, mask, pv, max_new_tokens=2)
    alone_new, alone_logits = greedy(llava, rows[1][None], torch.ones(1, len(rows[1]), dtype=torch.long), pv[1:2],
                                     max_new_tokens=2)
    assert tokenreduce.info(llava).tokens_per_layer[-1] < 65
    assert torch.equal(alone_new, new[1:2])
    torch.testing.assert_close(alone_logits, logits[1:2], atol=1e-6, rtol=1e-6)


#: The ViT methods that run inside LLaVA-1.5's CLIP tower (the README's table), at settings that act on a 3-layer tower
TOWER_VIT_METHODS = [
    ("pitome", dict(keep_ratio=0.8)), ("atc", dict(r=4)), ("tofu", dict(r=4)), ("zero_tprune", dict(keep_ratio=0.7, layers=[1])),
    ("kmedoids", dict(keep_ratio=0.7, layers=[1])), ("dpc_knn", dict(keep_ratio=0.7, layers=[1])),
    ("l2norm", dict(keep_ratio=0.7, layers=[1])), ("evit", dict(keep_ratio=0.7, layers=[1])), ("ppt", dict(r=4)),
    ("topk_attn", dict(keep_ratio=0.7, layers=[1])),
]


@pytest.mark.parametrize("patched", TOWER_VIT_METHODS, ids=[m for m, _ in TOWER_VIT_METHODS], indirect=True)
def test_vit_methods_in_the_clip_tower_batched_equal_alone(patched, batch):
    """Each sample of a left-padded batch of different-length prompts gets what it gets alone, and the language
    model sees the tower's reduced count of image tokens."""
    rows, ids, mask, pv = batch
    new, logits = greedy(patched, ids, mask, pv)
    with torch.no_grad():
        feats = patched.model.get_image_features(pixel_values=pv[:1], vision_feature_layer=-2,
                                                 vision_feature_select_strategy="default").pooler_output
    reduced = feats[0].shape[0]
    assert reduced < 64, reduced
    for i, row in enumerate(rows):
        alone_new, alone_logits = greedy(patched, row[None], torch.ones(1, len(row), dtype=torch.long), pv[i:i + 1])
        assert torch.equal(alone_new, new[i:i + 1])
        torch.testing.assert_close(alone_logits, logits[i:i + 1], atol=1e-6, rtol=1e-6)
