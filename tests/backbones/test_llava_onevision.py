"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower without CLS, anyres-max images,
multi-image prompts (one row per image), videos (frames as the processor gives them), Qwen2. Counts against the
unpatched model, VisionZip's and FasterVLM's CLS-less rule against a plain reference, and every method the adapter
runs in batched generation (KV cache, left and right padding, images of different sizes, image + video prompts)
equal to each sample alone with the promised counts; what it refuses, with the reason."""
import pytest
import torch

import tokenreduce
from tokenreduce.backbones.llava.anyres import reduced_image_tokens, reduced_video_tokens

from ._anyres import (OV_IMAGE, OV_PINPOINTS, OV_VIDEO, PATCHES, SIDE, VIT_CLS_METHODS, VIT_METHODS, Sample,
                      check_batch_equals_alone, check_keeping_every_patch_is_unpatched, full_tokens, full_video_tokens,
                      pixels, tiny_clip_dir, tiny_onevision, tokens_per_row)

#: one image with 1x2 crops; one with 3x3 crops interpolated down (anyres_max_4); a two-image prompt (one row per
#: image); a video; an image and a video in one prompt
SAMPLES = [Sample([(50, 100)], text=(3, 4)), Sample([(150, 160)], text=(6, 2), seed=1),
           Sample([(90, 60), (60, 100)], text=(2, 3, 5), seed=2), Sample([], frames=[3], text=(4, 3), seed=3),
           Sample([(100, 100)], frames=[3], text=(2, 2, 3), seed=4)]
IMAGES_ONLY = SAMPLES[:3]


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


# ---------------------------------------------------------------------------------------------------------------
# counts
def test_counts_match_the_model(model):
    """The processor's counts (anyres.full_image_tokens, the video rule) are what the unpatched model returns: crop
    grids, unpadding, anyres-max interpolation, multi-image rows, videos."""
    for size in [(50, 100), (150, 160), (100, 100), (56, 56), (30, 160), (160, 40), (120, 90)]:
        with torch.no_grad():
            feats = model.model.get_image_features(**pixels(model, Sample([size]))).pooler_output
        assert int(feats[0].shape[0]) == full_tokens(model, size, True), size
    two = Sample([(150, 160), (50, 100)])
    part = pixels(model, two)
    with torch.no_grad():
        feats = model.model.get_image_features(**part).pooler_output
        video = model.model.get_video_features(pixel_values_videos=torch.randn(2, 3, 3, SIDE, SIDE,
                                                                               dtype=torch.float64)).pooler_output
    assert [int(f.shape[0]) for f in feats] == [PATCHES + 1] * 2 == [full_tokens(model, s, False) for s in two.sizes]
    assert video.shape[1] == full_video_tokens(3) == 3 * 16 + 1


def test_reduced_counts_are_pure_functions_of_size_and_budget():
    assert reduced_image_tokens((150, 160), 16, OV_PINPOINTS, SIDE) == 16 * 10      # 3x3 crops + base
    assert reduced_image_tokens((150, 160), 16, OV_PINPOINTS, SIDE, crops=False) == 17  # multi-image: + newline
    assert reduced_video_tokens(8, 64) == 8 * 64 + 1
    # the real OneVision pinpoints (384 multiples up to 2304): a 768x768 image is 2x2 crops + base
    real = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    assert reduced_image_tokens((768, 768), 64, real, 384) == 320


# ---------------------------------------------------------------------------------------------------------------
# no CLS: received attention
def _received_attention(model, part):
    """Plain reference: the feature layer's attention probabilities from its own q / k (hooks on the projections),
    averaged over heads and query rows -> [rows, N]."""
    layer = model.model.vision_tower.encoder.layers[-1]
    taps = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: taps.__setitem__("q", o)),
             layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: taps.__setitem__("k", o))]
    with torch.no_grad():
        model.model.get_image_features(**part)
    for h in hooks:
        h.remove()
    heads = layer.self_attn.num_heads
    rows = []
    for r in range(taps["q"].shape[0]):
        q = taps["q"][r].view(PATCHES, heads, -1).transpose(0, 1)
        k = taps["k"][r].view(PATCHES, heads, -1).transpose(0, 1)
        p = torch.softmax(q @ k.transpose(-1, -2) * layer.self_attn.scale, dim=-1)  # [H, N, N]
        rows.append(torch.stack([p[h, i] for h in range(heads) for i in range(PATCHES)]).mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("method,params,k", [("visionzip", dict(dominant=10, contextual=0), 10),
                                             ("fastervlm", dict(keep=16), 16)])
def test_cls_less_methods_rank_by_received_attention(model, method, params, k):
    part = pixels(model, Sample([(50, 100)]))
    want = _received_attention(model, part)
    tokenreduce.patch(model, method, **params)
    try:
        with torch.no_grad():
            model.model.get_image_features(**part)
        info = tokenreduce.info(model)
    finally:
        tokenreduce.unpatch(model)
    kept = info.kept[max(info.kept)][:, :k]
    for r in range(want.shape[0]):
        top = sorted(sorted(range(PATCHES), key=lambda i: -float(want[r, i]))[:k])
        assert kept[r].tolist() == top, r


@pytest.mark.parametrize("method,params", VIT_CLS_METHODS + [("ats", {}), ("diffrate", {})],
                         ids=[m for m, _ in VIT_CLS_METHODS] + ["ats", "diffrate"])
def test_cls_attention_methods_are_refused(model, method, params):
    with pytest.raises(ValueError, match="(no CLS token|no class token|attention_probs)"):
        tokenreduce.patch(model, method, **params)
    assert not tokenreduce.is_patched(model)


# ---------------------------------------------------------------------------------------------------------------
# batched generation equals each sample alone
VISION = [
    ("visionzip", dict(dominant=10, contextual=4), 14),
    ("fastervlm", dict(keep=16), 16),
    ("vispruner", dict(keep=16), 16),
    ("divprune", dict(keep=12), 12),
    ("pool", dict(keep=16), 16),
    ("random", dict(keep=12), 12),
    ("tome", dict(r=8), PATCHES - 3 * 8),  # every tower layer feeds the features; no CLS; video frames grow to 40
    ("pitome", dict(ratio=0.8), None),
]


@pytest.mark.parametrize("method,params,per_row", VISION, ids=[v[0] for v in VISION])
def test_vision_methods_batched_equal_alone(model, method, params, per_row):
    if per_row is None:  # a merge schedule: count what the tower leaves on one row
        tokenreduce.patch(model, method, **params)
        with torch.no_grad():
            feats = model.model.get_image_features(**pixels(model, Sample([(50, 100)]))).pooler_output[0]
        tokenreduce.unpatch(model)
        per_row = feats.shape[0] // 3
        assert feats.shape[0] == 3 * per_row and per_row < PATCHES
    check_batch_equals_alone(model, method, params, SAMPLES, per_row=per_row)


def _visual(row):
    return int(((row == OV_IMAGE) | (row == OV_VIDEO)).sum())


def test_fastv_batched_equals_alone(model):
    keep = 24  # per run of visual tokens: each image and each video
    check_batch_equals_alone(model, "fastv", dict(layer=1, keep=keep), SAMPLES,
                             llm_count=lambda s, row: len(row) - _visual(row) + keep * (len(s.sizes) + len(s.frames)))


def test_dart_batched_equals_alone(model):
    same = [Sample([], frames=[3], text=(4, 3)), Sample([], frames=[3], text=(2, 6), seed=1)]
    check_batch_equals_alone(model, "dart", dict(layer=1, image_pivots=2, text_pivots=2, per_pivot=6), same,
                             llm_count=lambda s, row: len(row) - _visual(row) + 2 + 4 * 6)


def test_pdrop_and_sparsevlm_batched_equal_alone():
    m = tiny_onevision(lm_layers=4)
    check_batch_equals_alone(m, "pdrop", dict(layers=[1, 2, 3], keep_ratio=[0.5, 0.3, 0.125]), SAMPLES)
    check_batch_equals_alone(m, "sparsevlm", dict(layers=[0, 1, 3], counts=[30, 12, 5]), SAMPLES)


def test_cdpruner_with_a_width_matched_clip(model, tmp_path):
    """CDPruner runs on any tower whose width its CLIPModel's vision side matches (the official code pairs it with
    CLIP towers only; the real OneVision's 1152-wide SigLIP has no such CLIP, and patch refuses the mismatch)."""
    check_batch_equals_alone(model, "cdpruner", dict(keep=10, text_encoder=tiny_clip_dir(tmp_path)), IMAGES_ONLY,
                             per_row=10, instructions=[[0, 5, 9, 1], [0, 12, 1], [0, 7, 7, 30, 1]])


def test_video_frames_keep_their_budget_without_the_pooling(model):
    """A reduced frame skips the model's 2x2 pooling: ``keep`` tokens per frame plus the video's newline, which stays
    the model's own ``image_newline``."""
    videos = torch.randn(1, 3, 3, SIDE, SIDE, dtype=torch.float64)
    tokenreduce.patch(model, "fastervlm", keep=10)
    try:
        with torch.no_grad():
            out = model.model.get_video_features(pixel_values_videos=videos).pooler_output
    finally:
        tokenreduce.unpatch(model)
    assert out.shape[1] == reduced_video_tokens(3, 10) == 31
    assert torch.equal(out[0, -1], model.model.image_newline)


# ---------------------------------------------------------------------------------------------------------------
# no-op budgets, refusals
@pytest.mark.parametrize("method", ["pool", "random"])
def test_keeping_every_patch_is_the_unpatched_model(model, method):
    check_keeping_every_patch_is_unpatched(model, method, SAMPLES)


@pytest.mark.parametrize("method,params,match", [
    ("ats", {}, "class token"),  # samples by CLS attention (and keeps per-sample counts)
    ("mctf", {}, "block_in"),
    ("cdpruner", dict(keep=10), "text_encoder"),
    ("visionzip", dict(dominant=60, contextual=10), "exceeds"),
])
def test_refusals_say_why(model, method, params, match):
    with pytest.raises(ValueError, match=match):
        tokenreduce.patch(model, method, **params)
    assert not tokenreduce.is_patched(model)


def test_the_llava_onevision_budget_suite_patches_a_model_of_its_geometry():
    """Every config of configs/vlm/llava_onevision fits LLaVA-OneVision's 729-patch CLS-less rows."""
    from tokenreduce.configs import CONFIG_DIR
    from ._anyres import shaped_like_7b
    m = shaped_like_7b("onevision")
    files = sorted((CONFIG_DIR / "vlm" / "llava_onevision").glob("*.yaml"))
    assert {f.stem.split("_")[0] for f in files} == {"visionzip", "fastervlm", "vispruner", "divprune", "pool",
                                                    "random", "fastv", "dart"}
    for f in files:
        tokenreduce.check(m, config=str(f))


@pytest.mark.parametrize("method,params", VIT_METHODS, ids=[m for m, _ in VIT_METHODS])
def test_vit_methods_in_the_tower_batched_equal_alone(model, method, params):
    """The ViT methods that need no CLS token run in the SigLIP tower's layers, per tower row."""
    check_batch_equals_alone(model, method, params, [SAMPLES[0], SAMPLES[2]],
                             per_row=tokens_per_row(model, method, params))
