"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): the anyres counts and layout against plain-loop references, and
every method the adapter runs in batched generation (KV cache, left and right padding, images of different sizes
and crop counts, a two-image prompt, prompts of different lengths) equal to each sample alone, with the token count
the layout promises; what it refuses, with the reason."""
import pytest
import torch

import tokenreduce
from tokenreduce.backbones.llava.anyres import crop_grid, crop_order, reduced_image_tokens

from ._anyres import (NEXT_PINPOINTS, PATCHES, SIDE, VIT_CLS_METHODS, VIT_METHODS, Sample, check_batch_equals_alone,
                      check_keeping_every_patch_is_unpatched, full_tokens, pad, pixels, prompt_ids, tiny_clip_dir,
                      tiny_next, tokens_per_row)

#: a 1x2-crop image, a 2x2-crop image of another aspect, and a prompt with two images (2x2 and 1x2 crops)
SAMPLES = [Sample([(50, 100)], text=(3, 4)), Sample([(90, 60)], text=(6, 2), seed=1),
           Sample([(100, 100), (60, 100)], text=(2, 3, 5), seed=2)]
#: DART keeps one count per sample: images of one size (prompts of different lengths)
SAME_SIZE = [Sample([(90, 60)], text=(3, 4)), Sample([(90, 60)], text=(7, 2), seed=1)]


@pytest.fixture(scope="module")
def model():
    return tiny_next()


# ---------------------------------------------------------------------------------------------------------------
# counts and layout
def test_counts_match_the_model(model):
    """The processor's count (anyres.full_image_tokens) is what the unpatched model returns, for every crop grid and
    aspect (unpadding on either side)."""
    for size in [(50, 100), (90, 60), (100, 100), (56, 56), (30, 112), (112, 40), (77, 91)]:
        s = Sample([size])
        with torch.no_grad():
            feats = model.model.get_image_features(**pixels(model, s)).pooler_output
        assert int(feats[0].shape[0]) == full_tokens(model, size, True), size


def _loop_order(num_crops, tokens, kept, size, num_prefix, patch_grid, grid):
    """Plain loops: grid tokens by (global row, global col); then prefix tokens crop by crop; then the rest."""
    on_grid, prefix, rest = [], [], []
    for c in range(num_crops):
        ci, cj = divmod(c, grid[1])
        for t in range(tokens):
            flat = c * tokens + t
            k = None if kept is None else int(kept[c, t])
            if k is not None and k >= num_prefix and (size is None or float(size[c, t]) == 1.0):
                r, s = divmod(k - num_prefix, patch_grid[1])
                on_grid.append(((ci * patch_grid[0] + r, cj * patch_grid[1] + s), flat))
            elif k is not None and 0 <= k < num_prefix:
                prefix.append(flat)
            else:
                rest.append(flat)
    return [f for _, f in sorted(on_grid)] + prefix + rest


@pytest.mark.parametrize("num_prefix,grid,with_size", [(1, (2, 2), True), (0, (1, 3), True), (1, (3, 1), False)])
def test_crop_order_matches_loop_reference(num_prefix, grid, with_size):
    g = torch.Generator().manual_seed(grid[1])
    n, t, pg = grid[0] * grid[1], 7, (4, 5)
    kept = torch.stack([torch.randperm(20 + num_prefix, generator=g)[:t] for _ in range(n)])
    size = (torch.randint(1, 3, (n, t), generator=g).double() if with_size else None)
    got = crop_order(n, t, kept, size, num_prefix, pg, grid).tolist()
    assert got == _loop_order(n, t, kept, size, num_prefix, pg, grid)
    assert sorted(got) == list(range(n * t))
    assert crop_order(n, t, None, None, num_prefix, pg, grid).tolist() == list(range(n * t))  # no positions


def test_visionzip_layout_is_the_official_order(model):
    """VisionZip on a 2x2-crop image: the base image as VisionZip returns it (CLS, dominant, contextual), then the
    crops' dominant patches in raster order of the whole crop grid, every crop's CLS, every crop's contextual tokens
    (dvlab-research/VisionZip's LLaVA-NeXT code), no newline; the count from the image size and budget."""
    s = Sample([(100, 100)])
    rows = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: rows.__setitem__("out", o))
    tokenreduce.patch(model, "visionzip", dominant=10, contextual=4)
    try:
        with torch.no_grad():
            packed = model.model.get_image_features(**pixels(model, s)).pooler_output[0]
        info = tokenreduce.info(model)
    finally:
        tokenreduce.unpatch(model)
        hook.remove()
    per_row = rows["out"]  # [5, 14, D]: the projected rows in VisionZip's order
    kept = info.kept[max(info.kept)]
    assert packed.shape[0] == 5 * 14 == reduced_image_tokens((100, 100), 14, NEXT_PINPOINTS, SIDE)
    want = [per_row[0, t] for t in range(14)]
    dominant = []
    for c in range(4):
        ci, cj = divmod(c, 2)
        for t in range(1, 10):  # dominant patches (CLS at 0)
            r, col = divmod(int(kept[c + 1, t]) - 1, 8)
            dominant.append(((ci * 8 + r, cj * 8 + col), per_row[c + 1, t]))
    want += [v for _, v in sorted(dominant, key=lambda e: e[0])]
    want += [per_row[c + 1, 0] for c in range(4)]
    want += [per_row[c + 1, t] for c in range(4) for t in range(10, 14)
             if float(info.size[c + 1, t]) != 1.0]  # a contextual target nobody joined is its patch: on the grid
    assert len(want) == 70
    torch.testing.assert_close(packed, torch.stack(want), atol=0, rtol=0)
    assert not any(torch.equal(tok, model.model.image_newline) for tok in packed)


def test_reduced_count_is_a_pure_function_of_size_and_budget():
    assert crop_grid((50, 100), NEXT_PINPOINTS, SIDE) == (1, 2) and crop_grid((90, 60), NEXT_PINPOINTS, SIDE) == (2, 2)
    assert reduced_image_tokens((50, 100), 64, NEXT_PINPOINTS, SIDE) == 192
    assert reduced_image_tokens((90, 60), 64, NEXT_PINPOINTS, SIDE) == 320
    # the real LLaVA-NeXT pinpoints: a 672x672 image is 5 rows, so 64 per row is the papers' 320
    real = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert reduced_image_tokens((672, 672), 64, real, 336) == 320
    assert reduced_image_tokens((1000, 300), 128, real, 336) == 512  # 3x1 crops + base
    assert reduced_image_tokens((300, 300), 32, real, 336, crops=False) == 33  # one row: + its newline


# ---------------------------------------------------------------------------------------------------------------
# batched generation equals each sample alone
VISION = [
    ("visionzip", dict(dominant=10, contextual=4), 14),
    ("fastervlm", dict(keep=16), 16),
    ("vispruner", dict(keep=16), 16),
    ("divprune", dict(keep=12), 12),
    ("pool", dict(keep=16), 16),
    ("random", dict(keep=12), 12),
    ("tome", dict(r=8), PATCHES + 1 - 2 * 8 - 1),    # 2 tower layers to the feature layer, CLS dropped after
    ("pitome", dict(ratio=0.8), None),
]


@pytest.mark.parametrize("method,params,per_row", VISION, ids=[v[0] for v in VISION])
def test_vision_methods_batched_equal_alone(model, method, params, per_row):
    if per_row is None:  # a merge schedule: count what the tower leaves on one crop
        tokenreduce.patch(model, method, **params)
        with torch.no_grad():
            feats = model.model.get_image_features(**pixels(model, Sample([(100, 100)]))).pooler_output[0]
        tokenreduce.unpatch(model)
        assert feats.shape[0] % 5 == 0
        per_row = feats.shape[0] // 5
        assert per_row < PATCHES
    check_batch_equals_alone(model, method, params, SAMPLES, per_row=per_row)


def _fastv_count(keep):
    def count(sample, row):
        visual = int((row == 63).sum())
        return len(row) - visual + keep * len(sample.sizes)
    return count


@pytest.mark.parametrize("text_model", ["llama", "qwen2"])
def test_fastv_batched_equals_alone(text_model):
    check_batch_equals_alone(tiny_next(text_model=text_model), "fastv", dict(layer=1, keep=40), SAMPLES,
                             llm_count=_fastv_count(40))


def test_dart_batched_equals_alone(model):
    # 2 image pivots + 4 pivots x 8 tokens: every sample keeps 34 of its visual tokens (base, crops and newlines)
    check_batch_equals_alone(model, "dart", dict(layer=1, image_pivots=2, text_pivots=2, per_pivot=8), SAME_SIZE,
                             llm_count=lambda s, row: len(row) - int((row == 63).sum()) + 34)


def test_dart_refuses_samples_of_different_visual_counts(model):
    tokenreduce.patch(model, "dart", layer=1, image_pivots=2, text_pivots=2, per_pivot=8)
    try:
        rows = [prompt_ids(model, s) for s in SAMPLES[:2]]
        ids, mask = pad(rows, "left")
        from ._anyres import batch_pixels
        visual = batch_pixels([pixels(model, s) for s in SAMPLES[:2]])
        with pytest.raises(ValueError, match="same number of image tokens"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **visual)
    finally:
        tokenreduce.unpatch(model)


def test_pdrop_and_sparsevlm_batched_equal_alone():
    m = tiny_next(lm_layers=4)
    check_batch_equals_alone(m, "pdrop", dict(layers=[1, 2, 3], keep_ratio=[0.5, 0.3, 0.125]), SAMPLES)
    check_batch_equals_alone(m, "sparsevlm", dict(layers=[0, 1, 3], counts=[60, 24, 10]), SAMPLES)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


def test_cdpruner_per_image_instructions_reach_every_crop(model, clip_dir):
    """CDPruner's instruction of each image conditions all its tower rows (rows_per_image from image_sizes)."""
    instructions = [[0, 5, 9, 1], [0, 12, 1], [0, 7, 7, 30, 1]]
    check_batch_equals_alone(model, "cdpruner", dict(keep=10, text_encoder=clip_dir), SAMPLES, per_row=10,
                             instructions=instructions)


# ---------------------------------------------------------------------------------------------------------------
# no-op budgets, refusals
@pytest.mark.parametrize("method", ["pool", "random"])
def test_keeping_every_patch_is_the_unpatched_model(model, method):
    check_keeping_every_patch_is_unpatched(model, method, SAMPLES)


@pytest.mark.parametrize("method,params,match", [
    ("ats", {}, "valid"),                       # per-sample counts inside the tower
    ("mctf", {}, "block_in"),                   # a one-step-ahead merge: no such site in the tower
    ("diffrate", {}, "attention_probs"),        # replaces the tower's softmax
    ("cdpruner", dict(keep=10), "text_encoder"),
    ("visionzip", dict(dominant=600, contextual=1), "exceeds"),
])
def test_refusals_say_why(model, method, params, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.patch(model, method, **params)
    assert not tokenreduce.is_patched(model)


def test_feature_layer_list_is_refused_for_vision_methods():
    m = tiny_next()
    m.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        tokenreduce.patch(m, "visionzip", dominant=10, contextual=4)


def test_an_elongated_image_whose_reduced_count_exceeds_the_processors_grows_its_run(model):
    """A very wide image: the processor counts the unpadded grid (few rows), the reduced layout keeps rows x keep
    tokens; the prompt's run lengthens to match and batching still equals each sample alone."""
    wide = Sample([(14, 112)], text=(2, 3), seed=4)
    assert reduced_image_tokens((14, 112), 40, NEXT_PINPOINTS, SIDE) > full_tokens(model, (14, 112), True)
    check_batch_equals_alone(model, "fastervlm", dict(keep=40), [wide, SAMPLES[1]], per_row=40)


def test_shrink_image_runs_can_grow_a_run():
    from tokenreduce.backbones.vlm.prompt import shrink_image_runs
    ids = torch.tensor([[0, 1, 9, 9, 4], [1, 3, 9, 9, 5]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 1, -100, -100, 4], [1, 3, -100, -100, 5]])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = shrink_image_runs(ids, 9, [4, 1], attention_mask=mask, labels=labels, position_ids=pos, grow=True)
    assert out["input_ids"].tolist() == [[0, 1, 9, 9, 9, 9, 4], [0, 0, 0, 1, 3, 9, 5]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 1, -100, -100, -100, -100, 4], [-100, -100, -100, 1, 3, -100, 5]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="image tokens in the prompt"):
        shrink_image_runs(ids, 9, [4, 1])


def test_the_llava_next_budget_suite_patches_a_model_of_its_geometry():
    """Every config of configs/vlm/llava_next (but CDPruner's, whose text encoder is a download) fits LLaVA-NeXT's
    576-patch rows and 3+-layer language model."""
    from tokenreduce.configs import CONFIG_DIR
    from ._anyres import shaped_like_7b
    m = shaped_like_7b("next")
    files = sorted((CONFIG_DIR / "vlm" / "llava_next").glob("*.yaml"))
    assert len(files) >= 20
    for f in files:
        if not f.name.startswith("cdpruner"):
            tokenreduce.check(m, config=str(f))


@pytest.mark.parametrize("method,params", VIT_METHODS + VIT_CLS_METHODS,
                         ids=[m for m, _ in VIT_METHODS + VIT_CLS_METHODS])
def test_vit_methods_in_the_tower_batched_equal_alone(model, method, params):
    """The ViT methods run in the CLIP tower's layers per tower row, as on LLaVA-1.5 (merged tokens go after the
    crops' grid tokens)."""
    check_batch_equals_alone(model, method, params, SAMPLES[:2], per_row=tokens_per_row(model, method, params))
