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
import transformers
from tokenreduce.backbones.qwen_vl import image_grid, merged_tokens, reduced_tokens, tower_geometry

from ..qwen_vl_helpers import (IMG, PAD, VID, alone, batch, cache_kwarg, cache_of, greedy, placeholder_slots, sample,
                               scenario, tiny_qwen, visual)

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
            deep = getattr(f, "deepstack_features", None) or []
            out[key] = (list(f.pooler_output), [list(level) for level in deep])
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
                    position_ids=P[..., -1:] + 1, use_cache=True, **{cache_kwarg(lm): cache_of(first)})
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


# ---------------------------------------------------------------------------------------------------------------
# The feature layer's attention through the merger, against a loop reference
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _received_and_keys(model, pixels, grid):
    """Per image: the attention each merged token receives at the last block (the official VisionZip Qwen2.5-VL
    score: head mean, summed over the query rows of its segment, mean over the token's 4 patches) and its keys (mean
    over heads and patches), in raster order — from the block's own modules, one segment at a time, with the window
    order and segments recomputed from the grid."""
    from transformers.vision_utils import get_vision_window_index
    visual = model.model.visual
    block = visual.blocks[-1]
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0], pe=k["position_embeddings"]),
                                           with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(pixels, grid)
    hook.remove()
    attn = block.attn
    n = seen["h"].shape[0]
    q, k, _ = attn.qkv(block.norm1(seen["h"])).reshape(n, 3, attn.num_heads, -1).unbind(1)
    rot = __import__(type(attn).__module__, fromlist=["x"]).apply_rotary_pos_emb_vision
    q, k = rot(q, k, *seen["pe"])
    sizes = [t * h * w for t, h, w in grid.tolist()]
    last = len(visual.blocks) - 1
    if hasattr(visual, "fullatt_block_indexes"):
        window_index, cu_window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                          visual.patch_size)
        reverse = torch.argsort(window_index)
        full = last in visual.fullatt_block_indexes
    else:
        reverse, full = None, True
    if full:  # one segment per frame, in window order the frames stay contiguous
        bounds = [0]
        for t, h, w in grid.tolist():
            bounds += [bounds[-1] + (f + 1) * h * w for f in range(t)]
    else:
        bounds = sorted(set(int(v) for v in cu_window.tolist()))
    received = torch.zeros(n, dtype=torch.float64)
    for s, e in zip(bounds[:-1], bounds[1:]):
        for hd in range(attn.num_heads):
            p = ((q[s:e, hd] @ k[s:e, hd].T) * attn.scaling).softmax(-1)
            received[s:e] += p.sum(0) / attn.num_heads
    merged = received.view(-1, 4).mean(-1)
    keys = k.mean(1).view(-1, 4, k.shape[-1]).mean(1)
    if reverse is not None:
        merged, keys = merged[reverse], keys[reverse]
    counts = [s // 4 for s in sizes]
    return list(torch.split(merged, counts)), list(torch.split(keys, counts))


def _visionzip_loop(x, score, keys, dominant, contextual):
    """VisionZip without CLS as a loop: top-``dominant`` by received attention; uniform targets among the rest; each
    other token joins its most key-similar target; target + mean of its assignees. Returns (kept, tokens) in the
    order of the kept indices."""
    m = x.shape[0]
    dom = sorted(sorted(range(m), key=lambda i: (-float(score[i]), i))[:dominant])
    rest = [i for i in range(m) if i not in dom]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    groups = {t: [] for t in targets}
    for j in range(len(rest)):
        if j in targets:
            continue
        sims = [float(unit[rest[j]] @ unit[rest[t]]) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda a: (sims[a], -a))]].append(rest[j])
    tokens = {i: x[i] for i in dom}
    for t, members in groups.items():
        mean = torch.stack([x[i] for i in members]).mean(0) if members else torch.zeros_like(x[0])
        tokens[rest[t]] = x[rest[t]] + mean
    kept = sorted(tokens)
    return kept, torch.stack([tokens[i] for i in kept])


@pytest.mark.parametrize("kind,fullatt", [("qwen2.5", (1, 3)), ("qwen2.5", (1,)), ("qwen3", ())],
                         ids=["qwen2.5-last-full", "qwen2.5-last-windowed", "qwen3"])
def test_merged_attention_selection_matches_loop_reference(kind, fullatt):
    """FasterVLM's and VisionZip's choices on the merged tokens equal a loop reference of the official VisionZip
    Qwen2.5-VL score (received attention of the last block, mean over each token's 4 patches), with windowed and
    full last blocks, images of different grids and a video (one segment per frame)."""
    model = tiny_qwen(kind, fullatt=fullatt or (1, 3), seed=3)
    grids = [(1, 8, 8), (1, 4, 6), (2, 4, 8)]
    vis = [visual("image" if g[0] == 1 else "video", g, 20 + i) for i, g in enumerate(grids)]
    pixels = torch.cat([v.pixels for v in vis])
    grid = torch.tensor(grids)
    score, keys = _received_and_keys(model, pixels, grid)
    with torch.no_grad():
        full = list(model.model.get_image_features(pixels, grid).pooler_output)
    last = len(model.model.visual.blocks) - 1
    tokenreduce.patch(model, "fastervlm", keep=5)
    try:
        with torch.no_grad():
            model.model.get_image_features(pixels, grid)
        kept = tokenreduce.info(model).kept[last]
    finally:
        tokenreduce.unpatch(model)
    for i, s in enumerate(score):
        want = sorted(sorted(range(len(s)), key=lambda j: (-float(s[j]), j))[:5])
        assert kept[i].tolist() == want, f"image {i}"
    tokenreduce.patch(model, "visionzip", dominant=4, contextual=2)
    try:
        with torch.no_grad():
            out = list(model.model.get_image_features(pixels, grid).pooler_output)
        kept = tokenreduce.info(model).kept[last]
    finally:
        tokenreduce.unpatch(model)
    for i in range(len(grids)):
        want_kept, want_tokens = _visionzip_loop(full[i], score[i], keys[i], 4, 2)
        assert kept[i].tolist() == want_kept, f"image {i}"
        torch.testing.assert_close(out[i], want_tokens, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Inside the language model: kept tokens keep their M-RoPE positions, deepstack injections follow them
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _manual_pruned_logits(model, inputs, site, kept):
    """The language model run layer by layer by hand on one prompt: the full sequence before layer ``site``, then
    only the ``kept`` tokens with the positions the full prompt gives them; Qwen3-VL's deepstack features added
    after the first layers to the visual tokens present (the kept ones, after the site)."""
    inner, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    feats = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    h = inner.get_input_embeddings()(ids)
    vis = ids == IMG
    h[vis] = torch.cat(list(feats.pooler_output))
    deep = [torch.cat(list(level)) for level in (getattr(feats, "deepstack_features", None) or [])]
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                  image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    rank = vis.long().cumsum(1) - 1  # row of each visual token in the deepstack features
    for j, layer in enumerate(lm.layers):
        if j == site:
            h, pos, vis, rank = h[:, kept], pos[:, :, kept], vis[:, kept], rank[:, kept]
        h = layer(h, position_embeddings=lm.rotary_emb(h, pos), attention_mask=None)
        if j < len(deep):
            h = h.clone()
            h[vis] = h[vis] + deep[j][rank[vis]]
    return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,params", [("fastv", dict(layer=1, keep=3)),
                                           ("dart", dict(layer=2, image_pivots=1, text_pivots=1, per_pivot=2))],
                         ids=["fastv", "dart"])
def test_llm_site_keeps_mrope_positions_and_deepstack(models, kind, method, params):
    """FastV / DART inside the language model equal a hand-run decoder on the kept tokens at their original M-RoPE
    positions (Qwen3-VL: deepstack injected into the surviving visual tokens after the site)."""
    model = models[kind]
    vis = [visual("image", (1, 8, 4), 5), visual("image", (1, 4, 6), 6)]
    inputs = batch([sample(kind, vis, 3, 4, 7)], [vis])
    tokenreduce.patch(model, method, **params)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        info = tokenreduce.info(model)
    finally:
        tokenreduce.unpatch(model)
    site = params["layer"]
    kept = info.kept[site][0]
    assert info.tokens_per_layer[site] == kept.numel() < inputs["input_ids"].shape[1]
    torch.testing.assert_close(logits, _manual_pruned_logits(model, inputs, site, kept), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Counts, caches, refusals, unpatch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_shrunk_prompt_and_cache_hold_the_kept_tokens(models, kind):
    model = models[kind]
    rows, vis = scenario(kind)
    inputs = batch(rows, vis)
    width = inputs["input_ids"].shape[1]
    tokenreduce.patch(model, "fastervlm", keep=3)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        info = tokenreduce.info(model)
    finally:
        tokenreduce.unpatch(model)
    merged = [v.merged for vs in vis for v in vs]
    assert info.tokens_per_sample.tolist() == [3] * len(merged)
    removed = [sum(v.merged - 3 for v in vs) for vs in vis]
    # left-padded to the longest shrunk row; the cache holds exactly that
    want = max(len(r) - d for r, d in zip(rows, removed))
    assert out.logits.shape[1] == want == cache_of(out).get_seq_length() < width
    tokenreduce.patch(model, "fastv", layer=2, keep=2)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        info = tokenreduce.info(model)
    finally:
        tokenreduce.unpatch(model)
    lengths = [layer.keys.shape[-2] for layer in cache_of(out).layers]
    assert lengths[:2] == [width, width] and all(n == info.tokens_per_layer[2] < width for n in lengths[2:])


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_say_why(models, kind, tmp_path):
    model = models[kind]
    for method, params in (("tome", dict(r=2)), ("pitome", {})):
        with pytest.raises(ValueError, match="patch merger") as err:
            tokenreduce.patch(model, method, **params)
        assert ("windowed" in str(err.value)) == (kind == "qwen2.5")
        assert ("deepstack" in str(err.value)) == (kind == "qwen3")
    for method, params in (("pdrop", dict(layers=[1, 2, 3])), ("sparsevlm", dict(keep=64, layers=[1, 2, 3]))):
        with pytest.raises(ValueError, match="M-RoPE"):
            tokenreduce.patch(model, method, **params)
    # CDPruner's CLIP relevance needs the CLIP the tower came from; a Qwen tower has none
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=8))
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="wide"):
        tokenreduce.patch(model, "cdpruner", keep=3, text_encoder=str(tmp_path / "clip"), instruction_ids=[1, 2])
    assert not tokenreduce.is_patched(model)
    # pooling needs a 2-D grid: a video is refused when it arrives
    rows, vis = scenario(kind)
    tokenreduce.patch(model, "pool", keep=2)
    try:
        with pytest.raises(ValueError, match="video"):
            greedy(model, batch(rows, vis), 1)
    finally:
        tokenreduce.unpatch(model)


def test_counts_for_servers():
    """The pure counts a server needs agree with the processor's grids and with what the adapter keeps."""
    processor = transformers.Qwen2VLImageProcessor()
    np = pytest.importorskip("numpy")
    from PIL import Image
    for h, w in ((300, 500), (28, 2000), (1200, 900), (40, 40)):
        image = Image.fromarray(np.zeros((h, w, 3), dtype="uint8"))
        want = tuple(processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist())
        assert image_grid(h, w) == want
    assert merged_tokens((1, 22, 36)) == 198 and merged_tokens((2, 4, 6)) == 12
    model = tiny_qwen("qwen2.5")
    geo = tower_geometry(model.config)
    for name, params, want in (("fastervlm", dict(keep=5), 5), ("visionzip", dict(dominant=4, contextual=2), 6),
                               ("pool", dict(keep=4), 4), ("random", dict(keep_ratio=0.5), 8),
                               ("divprune", dict(keep=3), 3)):
        method = tokenreduce.build_method(name, geo, **params)
        assert reduced_tokens(method, (1, 8, 8)) == want
        tokenreduce.patch(model, name, **params)
        try:
            v = visual("image", (1, 8, 8), 1)
            with torch.no_grad():
                f = model.model.get_image_features(v.pixels, torch.tensor([v.grid]))
            assert f.pooler_output[0].shape[0] == want
        finally:
            tokenreduce.unpatch(model)
    fastv = tokenreduce.build_method("fastv", tokenreduce.api.Geometry(num_blocks=4, num_prefix=0, num_patches=None,
                                                                       dim=32, num_heads=4), keep=3)
    with pytest.raises(ValueError, match="not at the vision tower"):
        reduced_tokens(fastv, (1, 8, 8))


@pytest.mark.parametrize("kind", KINDS)
def test_unpatch_restores_the_model(models, kind):
    model = models[kind]
    rows, vis = scenario(kind)
    inputs = batch(rows, vis)
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(**inputs).logits
    for method, params in (("visionzip", dict(dominant=2, contextual=1)), ("dart", LLM[0][1])):
        tokenreduce.patch(model, method, **params)
        assert set(model.state_dict()) == keys
        tokenreduce.unpatch(model)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, before)


def test_pooled_tokens_take_their_first_members_position_and_mean_deepstack():
    """Pooling synthesises every token: each takes the M-RoPE slot of its first member (the cell's top-left merged
    token) and, on Qwen3-VL, the mean of its members' deepstack features."""
    from tokenreduce.ops.pool import pool_grid, pool_membership
    model = tiny_qwen("qwen3", seed=2)
    v = visual("image", (1, 8, 12), 3)  # a 4 x 6 grid of merged tokens
    grid = torch.tensor([v.grid])
    with torch.no_grad():
        full = model.model.get_image_features(v.pixels, grid)
    tokenreduce.patch(model, "pool", keep=6)
    try:
        with torch.no_grad():
            out = model.model.get_image_features(v.pixels, grid)
        kept = tokenreduce.info(model).kept[len(model.model.visual.blocks) - 1][0]
    finally:
        tokenreduce.unpatch(model)
    cells = pool_grid(4, 6, 6)
    member = pool_membership((4, 6), cells, torch.float64, torch.device("cpu"))  # [K, P]
    assert kept.tolist() == member.argmax(dim=1).tolist() == sorted(kept.tolist())
    for level, (d_out, d_full) in enumerate(zip(out.deepstack_features, full.deepstack_features)):
        want = (member / member.sum(1, keepdim=True)) @ d_full[0]
        torch.testing.assert_close(d_out[0], want, rtol=1e-12, atol=1e-12)
