"""Tiny random LLaVA-NeXT and LLaVA-OneVision models (built in the test, float64, no downloads), prompts with the
processor's placeholder counts, batching, and the checks the two backbones' tests share: batched ``generate`` (KV
cache, left and right padding, different image sizes and prompt lengths) equals each sample alone, and every visual
input leaves the token count the layout promises."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import transformers  # noqa: F401  (a dev dependency: missing, these tests must fail, not vanish)

import tokenreduce
from tokenreduce.backbones.llava.anyres import full_image_tokens, reduced_image_tokens, reduced_video_tokens

from ..llava_helpers import PAD, pad  # noqa: F401  (pad: re-exported for the anyres tests)

VOCAB = 64
NEXT_IMAGE = 63
OV_IMAGE, OV_VIDEO = 62, 63
SIDE, PATCH = 56, 7  # 8 x 8 = 64 patches per tower row
PATCHES = (SIDE // PATCH) ** 2
#: LLaVA-NeXT's anyres grids in miniature (1x2, 2x1, 2x2 crops) and OneVision's (up to 3x3)
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56], [112, 168], [168, 112],
                [168, 168]]


def _noisy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Extra weight noise: attention far from uniform, so selections are far from ties."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model.double().eval()


def _text(text_model: str, lm_layers: int) -> dict:
    return dict(model_type=text_model, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                num_hidden_layers=lm_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)


def tiny_next(attn: str = "sdpa", seed: int = 0, vision_layers: int = 3, lm_layers: int = 3,
              text_model: str = "llama") -> torch.nn.Module:
    """A random LlavaNextForConditionalGeneration shaped like LLaVA-NeXT in miniature: CLIP tower (56 px, patch 7:
    64 patches per crop, features from layer -2, CLS dropped), crops up to 2x2, a GQA Llama."""
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=SIDE, patch_size=PATCH,
                  hidden_act="quick_gelu")
    cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=_text(text_model, lm_layers),
                                       image_token_index=NEXT_IMAGE, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return _noisy(transformers.LlavaNextForConditionalGeneration(cfg), seed)


def tiny_onevision(attn: str = "sdpa", seed: int = 0, vision_layers: int = 3, lm_layers: int = 3,
                   text_model: str = "qwen2", max_crops: int = 4) -> torch.nn.Module:
    """A random LlavaOnevisionForConditionalGeneration shaped like LLaVA-OneVision in miniature: SigLIP tower without
    a head (56 px, patch 7: 64 patches, no CLS, features of the last layer, all kept), crops up to 3x3 interpolated
    down to about ``max_crops`` (``anyres_max_<max_crops>``), videos pooled 2x2, a GQA Qwen2."""
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=SIDE, patch_size=PATCH,
                  vision_use_head=False)
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=_text(text_model, lm_layers),
                                            image_token_index=OV_IMAGE, video_token_index=OV_VIDEO,
                                            image_grid_pinpoints=OV_PINPOINTS,
                                            vision_aspect_ratio=f"anyres_max_{max_crops}")
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return _noisy(transformers.LlavaOnevisionForConditionalGeneration(cfg), seed)


def tiny_clip_dir(path) -> str:
    """A tiny random CLIPModel of the tiny towers' width (32) saved to ``path``, with a CLIP tokenizer of single
    letters: CDPruner's ``text_encoder``."""
    import string
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=SIDE, patch_size=PATCH),
        projection_dim=16)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(cfg)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    clip.save_pretrained(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One prompt: its images (``(height, width)`` each; pixels drawn per image) and videos (frames each), with
    text of given lengths around them."""

    sizes: List[Tuple[int, int]]
    frames: List[int] = field(default_factory=list)
    text: Tuple[int, ...] = (3, 4)  # text tokens before the first input, between inputs, after the last
    seed: int = 0


def image_rows(model, size: Tuple[int, int], crops: bool) -> int:
    from tokenreduce.backbones.llava.anyres import tower_rows
    return tower_rows(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size, crops)


def full_tokens(model, size: Tuple[int, int], crops: bool) -> int:
    """Placeholder tokens the processor writes for one image (CLS dropped where the strategy says so)."""
    cfg = model.config
    per_row = PATCHES
    aspect = getattr(cfg, "vision_aspect_ratio", None)
    max_crops = int(aspect.replace("anyres_max_", "")) if aspect else None
    return full_image_tokens(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size, (SIDE // PATCH,) * 2,
                             per_row, crops, max_crops)


def full_video_tokens(frames: int) -> int:
    side = -(-(SIDE // PATCH) // 2)
    return frames * side * side + 1


def is_onevision(model) -> bool:
    return type(model).__name__ == "LlavaOnevisionForConditionalGeneration"


def _crops(model, sample: Sample) -> bool:
    """OneVision crops an image only when it is the only image of its prompt."""
    return not is_onevision(model) or len(sample.sizes) == 1


def prompt_ids(model, sample: Sample, counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """BOS + text, then each image's (then each video's) placeholder run with text between, then text. ``counts``:
    placeholder tokens per input (default: the processor's full counts)."""
    image_id = int(model.config.image_token_id)
    video_id = int(getattr(model.config, "video_token_id", -1))
    crops = _crops(model, sample)
    if counts is None:
        counts = [full_tokens(model, s, crops) for s in sample.sizes] + [full_video_tokens(f) for f in sample.frames]
    tokens = [image_id] * len(sample.sizes) + [video_id] * len(sample.frames)
    g = torch.Generator().manual_seed(1000 + sample.seed)
    pieces = []
    before, between = sample.text[0], sample.text[1] if len(sample.text) > 2 else 2
    after = sample.text[-1]
    for i, (tok, n) in enumerate(zip(tokens, counts)):
        m = before if i == 0 else between
        t = torch.randint(3, min(image_id, video_id if video_id > 0 else VOCAB) - 1, (m,), generator=g)
        if i == 0:
            t[0] = 1
        pieces += [t, torch.full((n,), tok)]
    pieces.append(torch.randint(3, 60, (after,), generator=g))
    return torch.cat(pieces)


def pixels(model, sample: Sample) -> Dict[str, Any]:
    """The visual arguments of one sample alone: ``pixel_values [I, rows, 3, H, W]``, ``image_sizes [I, 2]``,
    ``pixel_values_videos [V, F, 3, H, W]``, ``batch_num_images`` for OneVision."""
    g = torch.Generator().manual_seed(2000 + sample.seed)
    out: Dict[str, Any] = {}
    crops = _crops(model, sample)
    if sample.sizes:
        rows = [image_rows(model, s, crops) for s in sample.sizes]
        px = torch.randn(len(rows), max(rows), 3, SIDE, SIDE, generator=g, dtype=torch.float64)
        out["pixel_values"] = px
        out["image_sizes"] = torch.tensor(sample.sizes)
        if is_onevision(model):
            out["batch_num_images"] = [len(sample.sizes)]
    if sample.frames:
        out["pixel_values_videos"] = torch.randn(len(sample.frames), sample.frames[0], 3, SIDE, SIDE, generator=g,
                                                 dtype=torch.float64)
    return out


def batch_pixels(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The visual arguments of a batch from each sample's (images batch-major, rows padded to the longest)."""
    out: Dict[str, Any] = {}
    images = [p for p in parts if "pixel_values" in p]
    if images:
        rows = max(p["pixel_values"].shape[1] for p in images)
        px = [torch.cat([p["pixel_values"], p["pixel_values"].new_zeros(p["pixel_values"].shape[0],
                                                                        rows - p["pixel_values"].shape[1],
                                                                        *p["pixel_values"].shape[2:])], dim=1)
              for p in images]
        out["pixel_values"] = torch.cat(px)
        out["image_sizes"] = torch.cat([p["image_sizes"] for p in images])
        if "batch_num_images" in images[0]:
            out["batch_num_images"] = [n for p in parts for n in p.get("batch_num_images", [0])]
    videos = [p["pixel_values_videos"] for p in parts if "pixel_values_videos" in p]
    if videos:
        out["pixel_values_videos"] = torch.cat(videos)
    return out


def greedy(model, ids, mask, visual: Dict[str, Any], max_new_tokens: int = 4):
    """``(new tokens [B, T], logits [B, T, V])`` of greedy generation with a KV cache."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, **visual)
    return out.sequences[:, ids.shape[1]:], torch.stack(list(out.logits), 1)


# ---------------------------------------------------------------------------------------------------------------
# the shared checks
# ---------------------------------------------------------------------------------------------------------------
def reduced_counts(model, sample: Sample, per_row: int) -> List[int]:
    """Visual tokens each input of ``sample`` gets when every tower row leaves ``per_row`` tokens."""
    cfg = model.config
    crops = _crops(model, sample)
    return ([reduced_image_tokens(s, per_row, cfg.image_grid_pinpoints, cfg.vision_config.image_size, crops)
             for s in sample.sizes] + [reduced_video_tokens(f, per_row) for f in sample.frames])


def _context(model, instructions):
    return tokenreduce.instructions(model, instructions) if instructions else contextlib.nullcontext()


def check_batch_equals_alone(model, method: str, params: Dict[str, Any], samples: Sequence[Sample],
                             per_row: Optional[int] = None,
                             llm_count: Optional[Callable[[Sample, torch.Tensor], int]] = None,
                             instructions: Optional[List[Any]] = None, atol: float = 1e-6) -> None:
    """Batched greedy generation (KV cache; left and right padding; the samples' different image sizes and prompt
    lengths) gives every sample exactly what it gets alone.

    Counts: with ``per_row`` (a vision-side method), each input's features, the prefill cache and ``info`` hold
    :func:`reduced_counts`; with ``llm_count(sample, prompt) -> tokens`` (an in-LLM method), the cache of the last
    layer holds that many tokens after the prefill of the sample alone.
    ``instructions``: one per sample (repeated for each of its images; CDPruner).
    """
    tokenreduce.patch(model, method, **params)
    try:
        rows = [prompt_ids(model, s) for s in samples]
        parts = [pixels(model, s) for s in samples]
        per_sample_instr = None
        if instructions is not None:
            # one per image, in the order of pixel_values (the samples here have no videos)
            per_sample_instr = [[instructions[i]] * len(s.sizes) for i, s in enumerate(samples)]
        alone = []
        for s, row, part, instr in zip(samples, rows, parts, per_sample_instr or [None] * len(samples)):
            one = torch.ones(1, len(row), dtype=torch.long)
            with _context(model, instr), torch.no_grad():
                out = model(input_ids=row[None], attention_mask=one, use_cache=True, **part)
                cache = out.past_key_values
                n_visual = int(((row == model.config.image_token_id) |
                                (row == getattr(model.config, "video_token_id", -1))).sum())
                if per_row is not None:
                    want = sum(reduced_counts(model, s, per_row))
                    assert cache.get_seq_length() == len(row) - n_visual + want, (method, s)
                    if s.sizes:
                        feats = model.model.get_image_features(
                            **{k: v for k, v in part.items() if k != "pixel_values_videos"}).pooler_output
                        got = [int(f.shape[0]) for f in feats]
                        assert got == reduced_counts(model, s, per_row)[:len(s.sizes)], (method, s, got)
                if llm_count is not None:
                    last = cache.layers[-1].keys.shape[-2]
                    assert last == llm_count(s, row), (method, s, last, llm_count(s, row))
                alone.append(greedy(model, row[None], one, part))
        visual = batch_pixels(parts)
        flat_instr = [x for per in per_sample_instr for x in per] if per_sample_instr else None
        for side in ("left", "right"):
            ids, mask = pad(rows, side)
            with _context(model, flat_instr):
                new, logits = greedy(model, ids, mask, visual)
            for i in range(len(rows)):
                assert torch.equal(new[i], alone[i][0][0]), (method, side, i, new[i], alone[i][0][0])
                torch.testing.assert_close(logits[i], alone[i][1][0], atol=atol, rtol=atol)
    finally:
        tokenreduce.unpatch(model)


def shaped_like_7b(kind: str, lm_layers: int = 3) -> torch.nn.Module:
    """A tiny-width model with the real token geometry (LLaVA-NeXT: 336 px / 14 = 576 patches + CLS per row;
    LLaVA-OneVision: 384 px / 14 = 729 patches per row, no CLS) and the real pinpoints, for checking the budget
    suites patch (no weights are read, nothing runs)."""
    text = _text("llama" if kind == "next" else "qwen2", lm_layers)
    if kind == "next":
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, image_size=336, patch_size=14, hidden_act="quick_gelu")
        cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=NEXT_IMAGE,
                                           vision_feature_layer=-2, vision_feature_select_strategy="default")
        return transformers.LlavaNextForConditionalGeneration(cfg).eval()
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=384, patch_size=14, vision_use_head=False)
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=OV_IMAGE,
                                            video_token_index=OV_VIDEO)
    return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()


#: The ViT methods that also run inside a VLM's tower (as on LLaVA-1.5), at settings that act on a 2-3 layer tower
VIT_METHODS = [
    ("atc", dict(r=4)), ("dpc_knn", dict(keep_ratio=0.7, layers=[1])), ("kmedoids", dict(keep_ratio=0.7, layers=[1])),
    ("l2norm", dict(keep_ratio=0.7, layers=[1])), ("tofu", dict(r=4)), ("zero_tprune", dict(keep_ratio=0.7, layers=[1])),
]
#: the ones that rank by the CLS token's attention (refused on a SigLIP tower)
VIT_CLS_METHODS = [("ppt", dict(r=4)), ("topk_attn", dict(keep_ratio=0.7, layers=[1])),
                   ("evit", dict(keep_ratio=0.7, layers=[1]))]


def tokens_per_row(model, method: str, params: Dict[str, Any], size: Tuple[int, int] = (50, 100)) -> int:
    """What a method inside the tower leaves per tower row, measured on one image (every row gets the same)."""
    sample = Sample([size])
    tokenreduce.patch(model, method, **params)
    try:
        with torch.no_grad():
            feats = model.model.get_image_features(**pixels(model, sample)).pooler_output[0]
    finally:
        tokenreduce.unpatch(model)
    rows = image_rows(model, size, True)
    assert feats.shape[0] % rows == 0
    per_row = feats.shape[0] // rows
    assert per_row < PATCHES, (method, per_row)
    return per_row


def check_keeping_every_patch_is_unpatched(model, method: str, samples: Sequence[Sample]) -> None:
    """``method`` keeping every patch of every tower row, in order, gives the unpatched model's logits: the model's
    own packing (unpadding, newlines) applies unchanged."""
    ids, mask = pad([prompt_ids(model, s) for s in samples], "left")
    visual = batch_pixels([pixels(model, s) for s in samples])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **visual).logits
        tokenreduce.patch(model, method, keep=PATCHES)
        try:
            got = model(input_ids=ids, attention_mask=mask, **visual).logits
        finally:
            tokenreduce.unpatch(model)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
