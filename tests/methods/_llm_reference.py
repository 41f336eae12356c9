"""A plain reference of in-LLM token reduction (FastV, PyramidDrop, SparseVLM), independent of the decoder site and
of the methods' vectorised code: one prompt at a time (batch 1, no padding), the decoder layers of an UNPATCHED
LLaVA called one by one on explicitly gathered hidden states, with explicit position ids and a causal mask, and the
attention rows a method ranks with written out per head from the layer's own q/k projections.

A reference step sees ``(layer index i, hidden states entering layer i [S, C], positions [S])`` and returns the new
``(hidden, positions)``; ``before(i, ...)`` runs before layer i and ``after(i, ...)`` on its output.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def language_model(model):
    return model.model.language_model


def input_embeddings(model, ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[S, C]`` the LLM input of one prompt (image features scattered into the image tokens), unpatched model."""
    with torch.no_grad():
        out = model(input_ids=ids[None], pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[0][0]


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[1, 1, n, n]`` additive causal mask."""
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.zeros(n, n, dtype=dtype).masked_fill(upper, torch.finfo(dtype).min)[None, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding of ``x [S, d]`` with ``cos, sin [S, d]``, written out."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[:, half:], x[:, :half]], dim=-1)
    return x * cos + rotated * sin


def attention_row(lm, i: int, hidden: torch.Tensor, positions: torch.Tensor, row: int) -> torch.Tensor:
    """``[H, S]`` causal softmax probabilities of query ``row`` in decoder layer ``i`` run on ``hidden [S, C]`` at
    ``positions [S]``: q/k projections of the layer's input norm (and per-head q/k norms where the model has them),
    RoPE, ``q·k / sqrt(d)``, one head at a time."""
    layer = lm.layers[i]
    attn = layer.self_attn
    cfg = lm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = attn.head_dim
    with torch.no_grad():
        normed = layer.input_layernorm(hidden[None])[0]
        q = attn.q_proj(normed).view(-1, heads, d)
        k = attn.k_proj(normed).view(-1, kv_heads, d)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of q and k before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = lm.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0], sin[0]
        out = []
        for h in range(heads):
            qh = rotate(q[:, h], cos, sin)[row]
            kh = rotate(k[:, h // (heads // kv_heads)], cos, sin)[: row + 1]
            logits = [float((qh * kh[j]).sum()) / math.sqrt(d) for j in range(row + 1)]
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            total = sum(e)
            probs = [v / total for v in e] + [0.0] * (hidden.shape[0] - row - 1)
            out.append(torch.tensor(probs, dtype=torch.float64))
    return torch.stack(out)


def run_layer(lm, i: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Decoder layer ``i`` on ``hidden [S, C]`` at ``positions [S]`` with a plain causal mask."""
    with torch.no_grad():
        cos_sin = lm.rotary_emb(hidden[None], positions[None])
        out = lm.layers[i](hidden[None], attention_mask=causal_mask(hidden.shape[0], hidden.dtype),
                           position_ids=positions[None], position_embeddings=cos_sin)
    out = out[0] if isinstance(out, tuple) else out
    return out[0]


Step = Callable[[int, torch.Tensor, torch.Tensor], Optional[Tuple[torch.Tensor, torch.Tensor]]]


def reference_logits(model, ids: torch.Tensor, pixel_values: torch.Tensor, before: Optional[Step] = None,
                     after: Optional[Step] = None) -> torch.Tensor:
    """``[S_out, V]`` logits of one prompt with ``before`` / ``after`` steps around the decoder layers."""
    lm = language_model(model)
    hidden = input_embeddings(model, ids, pixel_values)
    positions = torch.arange(hidden.shape[0])
    for i in range(len(lm.layers)):
        if before is not None:
            new = before(i, hidden, positions)
            if new is not None:
                hidden, positions = new
        hidden = run_layer(lm, i, hidden, positions)
        if after is not None:
            new = after(i, hidden, positions)
            if new is not None:
                hidden, positions = new
    with torch.no_grad():
        return model.lm_head(lm.norm(hidden[None]))[0]


def image_runs(image: Sequence[bool]) -> List[Tuple[int, int]]:
    """``[(start, end)]`` of the runs of True, written out."""
    out, start = [], None
    for i, v in enumerate(list(image) + [False]):
        if v and start is None:
            start = i
        if not v and start is not None:
            out.append((start, i))
            start = None
    return out


def best(scores: Sequence[float], candidates: Sequence[int], k: int) -> List[int]:
    """The ``k`` candidates with the largest score (equal scores: the lower index), in descending score order."""
    return sorted(candidates, key=lambda i: (-scores[i], i))[:k]


# ---------------------------------------------------------------------------------------------------------------
# Batched checks against the reference and against each prompt alone
def mixed_prompts(image_tokens: int = 64, seed: int = 5):
    """Three prompts of different lengths, the second with two images: ``(rows, images per row, pixels [4, ...])``."""
    from ..llava_helpers import IMAGE_TOKEN, pixels
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(3, IMAGE_TOKEN - 3, (n,), generator=g)

    img = torch.full((image_tokens,), IMAGE_TOKEN)
    bos = torch.tensor([1])
    rows = [torch.cat([bos, text(3), img, text(5)]),
            torch.cat([bos, text(2), img, text(2), img, text(4)]),
            torch.cat([bos, text(5), img, text(3)])]
    return rows, [1, 2, 1], pixels(4)


def pad(rows: Sequence[torch.Tensor], side: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..llava_helpers import PAD
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def check_against_reference(method: str, params: dict, reference, text_model: str = "llama", lm_layers: int = 3,
                            expected_lengths: Optional[Sequence[int]] = None):
    """Patch a tiny LLaVA, run the mixed prompts batched (left and right padding) and compare:

    - the prefill logits of every sample's kept tokens with ``reference(unpatched model, ids, pixels)``;
    - the per-sample kept counts (``tokenreduce.info``) and the cache length of the last layer;
    - batched greedy ``generate`` (KV cache) with each prompt generated alone.

    Returns the last ``tokenreduce.info``.
    """
    import tokenreduce
    from ..llava_helpers import greedy, tiny_llava
    rows, images, px = mixed_prompts()
    starts = [sum(images[:i]) for i in range(len(rows))]
    model = tiny_llava(lm_layers=lm_layers, text_model=text_model)
    ref = tiny_llava(lm_layers=lm_layers, text_model=text_model)
    tokenreduce.patch(model, method, **params)
    pix = [px[s:s + n] for s, n in zip(starts, images)]
    expected = [reference(ref, r, p) for r, p in zip(rows, pix)]
    if expected_lengths is not None:
        assert [e.shape[0] for e in expected] == list(expected_lengths)
    alone = [greedy(model, r[None], torch.ones(1, len(r), dtype=torch.long), p, max_new_tokens=4)
             for r, p in zip(rows, pix)]
    info = None
    for side in ("left", "right"):
        ids, mask = pad(rows, side)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px,
                        position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        info = tokenreduce.info(model)
        valid = info.valid
        assert valid is not None and valid.shape == out.logits.shape[:2]
        assert valid.sum(dim=1).tolist() == [e.shape[0] for e in expected]
        assert out.logits.shape[1] == max(e.shape[0] for e in expected)  # padding was dropped, rows re-padded
        for b, e in enumerate(expected):
            torch.testing.assert_close(out.logits[b][valid[b]], e, atol=1e-9, rtol=1e-9)
        cached = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        assert cached[0] == ids.shape[1]
        assert cached[-1] == info.tokens_per_layer[-1]
        tokens, logits = greedy(model, ids, mask, px, max_new_tokens=4)
        for b, (t, l) in enumerate(alone):
            assert torch.equal(tokens[b], t[0]), (side, b)
            torch.testing.assert_close(logits[b], l[0], atol=1e-10, rtol=1e-10)
    tokenreduce.unpatch(model)
    return info
