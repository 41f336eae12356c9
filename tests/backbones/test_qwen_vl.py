"""Qwen2.5-VL and Qwen3-VL (tokenreduce.backbones.qwen_vl): batched generate equals each sample alone, the kept counts,
the M-RoPE reference (the unpatched language model on the reduced embedding sequence with the same position ids, two
generate steps), the merger-mapped tower attention against a loop reference, deepstack features following the kept
tokens at the tower output and inside the language model, and the refusals. Tiny random float64 models, no
downloads."""
from __future__ import annotations

from typing import Dict, List, Sequence

import pytest
import torch

import tokenreduce
from tokenreduce.backbones.qwen_vl import image_grid, merged_tokens, reduced_tokens, tower_geometry

from ..qwen_vl_helpers import (IMG, PAD, VID, alone, batch, greedy, placeholder_slots, sample, scenario, tiny_qwen,
                               visual)

KINDS = ("qwen2.5", "qwen3")

#: (method, params) at budgets that fit the tiny prompts (4 merged tokens for the smallest image)
TOWER = [
    ("fastervlm", dict(keep=3)),
    ("visionzip", dict(dominant=2, contextual=1)),
    ("vispruner", dict(keep=3, important=1)),
    ("divprune", dict(keep=3)),
    ("random", dict(keep=3)),
]
POOL = ("pool", dict(keep=2))
LLM = [
    ("dart", dict(layer=1, image_pivots=1, text_pivots=1, per_pivot=2)),
    ("fastv", dict(layer=1, keep=3)),
]


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_qwen(kind) for kind in KINDS}


def _run_batch_check(model, rows, vis, side="left", tokens=3):
    """Greedy generate of the padded batch equals each prompt alone: tokens equal, logits within 1e-9."""
    solo = [greedy(model, alone(rows, vis, i), tokens) for i in range(len(rows))]
    toks, logits = greedy(model, batch(rows, vis, side), tokens)
    for i, (t, l) in enumerate(solo):
        assert torch.equal(toks[i], t[0]), f"row {i}: {toks[i].tolist()} != {t[0].tolist()} ({side} padding)"
        torch.testing.assert_close(logits[i], l[0], rtol=0, atol=1e-9)
    return solo


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,params", TOWER + [POOL] + LLM, ids=lambda v: v if isinstance(v, str) else "")
def test_batched_generate_equals_each_alone(models, kind, method, params):
    model = models[kind]
    # pool reads a 2-D grid: images only; dart needs one visual-token count in every sample
    rows, vis = scenario(kind, with_video=method != "pool", equal=method == "dart")
    tokenreduce.patch(model, method, **params)
    try:
        _run_batch_check(model, rows, vis, "left")
        _run_batch_check(model, rows, vis, "right")
        if method in dict(TOWER) or method == "pool":
            # every image / video keeps what was asked
            greedy(model, batch(rows, vis), 1)
            info = tokenreduce.info(model)
            want = params.get("keep", params.get("dominant", 0) + params.get("contextual", 0))
            assert info.tokens_per_sample.tolist() == [want] * sum(len(v) for v in vis)
    finally:
        tokenreduce.unpatch(model)


# ---------------------------------------------------------------------------------------------------------------
# The M-RoPE reference: the unpatched language model on the reduced sequence, with the same position ids
# ---------------------------------------------------------------------------------------------------------------
def _reduced_features(model, inputs):
    """Per modality (images first, as the patched model encodes them): the reduced features and deepstack features
    of every image / video, from the patched model's own features calls."""
    inner = model.model
    out = {}
    for key, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                              ("video", "pixel_values_videos", "video_grid_thw")):
        if pixels in inputs:
            f = getattr(inner, f"get_{key}_features")(inputs[pixels], inputs[grid], return_dict=True)
            out[key] = (list(f.pooler_output), [list(level) for level in (getattr(f, "deepstack_features", None) or [])])
    return out


def _slot_values(full_ids, inputs, kept_rows, features):
    """``{(row, column): (feature, [deepstack per level])}`` of every surviving placeholder slot, computed from the
    kept indices alone: visual i owns the next ``t·h·w/4`` placeholders of its modality (row-major), and keeps the
    slots of its kept indices."""
    values, r = {}, 0
    for key, token, grid in (("image", IMG, "image_grid_thw"), ("video", VID, "video_grid_thw")):
        if key not in features:
            continue
        slots = placeholder_slots(full_ids, token)
        feats, deep = features[key]
        start = 0
        for i, g in enumerate(inputs[grid].tolist()):
            kept = [int(v) for v in kept_rows[r] if v >= 0]
            assert kept == sorted(kept) and len(kept) == feats[i].shape[0]
            for j, index in enumerate(kept):
                values[slots[start + index]] = (feats[i][j], [level[i][j] for level in deep])
            start += g[0] * g[1] * g[2] // 4
            r += 1
        assert start == len(slots)
    return values


def _reference_logits(model, inputs, values, renumber=False):
    """Two greedy steps of the unpatched language model on the reduced embedding sequence (left-padded), position
    ids = the full prompt's M-RoPE positions of the surviving tokens (or, as a negative control, renumbered)."""
    inner, ids, mask = model.model, inputs["input_ids"], inputs["attention_mask"]
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs.get("image_grid_thw"),
                                        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
    embed = inner.get_input_embeddings()
    rows = []
    for b in range(ids.shape[0]):
        cols = [c for c in range(ids.shape[1]) if mask[b, c] and (ids[b, c] not in (IMG, VID) or (b, c) in values)]
        e = torch.stack([values[(b, c)][0] if (b, c) in values else embed(ids[b, c]) for c in cols])
        vis = torch.tensor([(b, c) in values for c in cols])
        deep = [[values[(b, c)][1][lv] for c in cols if (b, c) in values] for lv in range(len(next(iter(
            values.values()))[1]))]
        pos = positions[:, b, cols]
        if renumber:
            pos = torch.arange(len(cols)).expand(3, -1)
        rows.append((e, vis, deep, pos))
    width = max(len(r[1]) for r in rows)
    n = len(rows)
    E = torch.zeros(n, width, embed.weight.shape[1], dtype=torch.float64)
    M = torch.zeros(n, width, dtype=torch.long)
    P = torch.zeros(3, n, width, dtype=torch.long)
    V = torch.zeros(n, width, dtype=torch.bool)
    for b, (e, vis, deep, pos) in enumerate(rows):
        E[b, width - len(vis):], M[b, width - len(vis):], V[b, width - len(vis):] = e, 1, vis
        P[:, b, width - len(vis):] = pos
    levels = len(rows[0][2])
    deepstack = [torch.cat([torch.stack(r[2][lv]) for r in rows]) for lv in range(levels)] if levels else None
    lm, head = inner.language_model, model.lm_head
    extra = dict(visual_pos_masks=V, deepstack_visual_embeds=deepstack) if levels else {}
    with torch.no_grad():
        first = lm(inputs_embeds=E, attention_mask=M, position_ids=P, use_cache=True, **extra)
        logits1 = head(first.last_hidden_state[:, -1])
        token = logits1.argmax(-1)
        second = lm(inputs_embeds=embed(token)[:, None], attention_mask=torch.cat([M, torch.ones(n, 1).long()], 1),
                    position_ids=P[..., -1:] + 1, cache=first.cache, use_cache=True)
        logits2 = head(second.last_hidden_state[:, -1])
    return torch.stack([logits1, logits2], 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,params", TOWER + [POOL], ids=lambda v: v if isinstance(v, str) else "")
def test_mrope_reference_two_generate_steps(models, kind, method, params):
    """Patched generate (images of different grids, several per prompt, a video, left padding) equals the unpatched
    language model on the reduced embedding sequence with the same (t, h, w) position ids, for both steps; with
    renumbered positions it does not (the check can fail)."""
    model = models[kind]
    rows, vis = scenario(kind, with_video=method != "pool")
    inputs = batch(rows, vis)
    tokenreduce.patch(model, method, **params)
    try:
        _, logits = greedy(model, inputs, 2)
        kept = tokenreduce.info(model).kept[len(model.model.visual.blocks) - 1]
        features = _reduced_features(model, inputs)  # deterministic: the same tokens as in generate
    finally:
        tokenreduce.unpatch(model)
    values = _slot_values(inputs["input_ids"], inputs, kept, features)
    if method not in ("visionzip", "pool"):  # pure selections: each kept token is the unpatched token itself
        full = _reduced_features(model, inputs)
        again = _slot_values(inputs["input_ids"], inputs, [torch.arange(v.merged) for vs in vis for v in vs
                                                           if v.kind == "image"] +
                             [torch.arange(v.merged) for vs in vis for v in vs if v.kind == "video"], full)
        for slot, (f, deep) in values.items():
            torch.testing.assert_close(f, again[slot][0], rtol=0, atol=0)
            for d, d_full in zip(deep, again[slot][1]):  # Qwen3-VL's deepstack features follow the kept tokens
                torch.testing.assert_close(d, d_full, rtol=0, atol=0)
    # generate reports float32 logits of the float64 model: equal up to that rounding
    reference = _reference_logits(model, inputs, values).float()
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-6)
    assert (logits - _reference_logits(model, inputs, values, renumber=True).float()).abs().max() > 1e-4
