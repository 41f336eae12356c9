"""Checks shared by the tests of the methods that act at a VLM's tower output (FasterVLM, VisPruner, DivPrune,
CDPruner, pool, random): batched ``generate`` with a KV cache, left and right padding and prompts of different
lengths equals each sample alone; the visual-token count is what was asked (features, ``info``, cache length); a
budget that keeps every patch is the unpatched model; and hand-built token states, with and without a CLS token."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch

import tokenreduce
from tokenreduce.backbones.layer_host import AttentionRows, attention_probs
from tokenreduce.core import Geometry, TokenState

from ..llava_helpers import greedy, pad, pixels, prompts, tiny_llava

#: The tiny LLaVA of tests/llava_helpers.py: 8 x 8 = 64 patches of width 32 (CLS first), a 32-wide LLM.
PATCHES, GRID, WIDTH = 64, (8, 8), 32
LENGTHS = ((3, 5), (6, 2), (4, 9))


def _context(model, instructions: Optional[List[Any]]):
    return tokenreduce.instructions(model, instructions) if instructions else contextlib.nullcontext()


def check_batch_equals_alone(method: str, params: Dict[str, Any], keep: int,
                             instructions: Optional[List[Any]] = None, model=None) -> None:
    """Batched greedy generation (KV cache; left and right padding; three prompt lengths) gives every sample exactly
    what it gets alone, and every image leaves ``keep`` visual tokens (features, info, prefill cache)."""
    model = tiny_llava() if model is None else model
    rows = prompts(lengths=LENGTHS)
    px = pixels(len(rows))
    tokenreduce.patch(model, method, **params)
    try:
        alone = []
        for i, row in enumerate(rows):
            one = torch.ones(1, len(row), dtype=torch.long)
            with _context(model, instructions and [instructions[i]]), torch.no_grad():
                out = model(input_ids=row[None], attention_mask=one, pixel_values=px[i:i + 1], use_cache=True)
                assert out.past_key_values.get_seq_length() == len(row) - PATCHES + keep
                assert tokenreduce.info(model).size.shape == (1, keep)
                alone.append(greedy(model, row[None], one, px[i:i + 1]))
        with _context(model, instructions), torch.no_grad():
            feats = model.get_image_features(pixel_values=px).pooler_output
        assert [f.shape for f in feats] == [torch.Size([keep, WIDTH])] * len(rows)
        for side in ("left", "right"):
            ids, mask = pad(rows, side)
            with _context(model, instructions):
                new, logits = greedy(model, ids, mask, px)
            for i in range(len(rows)):
                assert torch.equal(new[i], alone[i][0][0]), (side, i)
                torch.testing.assert_close(logits[i], alone[i][1][0], atol=1e-6, rtol=1e-6)
    finally:
        tokenreduce.unpatch(model)


def check_keep_all_is_unpatched(method: str, params: Dict[str, Any], instructions: Optional[List[Any]] = None
                                ) -> None:
    """Keeping every patch (in order) gives exactly the unpatched model's logits."""
    model = tiny_llava(vision_layers=2, lm_layers=2)
    rows = prompts(lengths=LENGTHS)
    ids, mask = pad(rows, "left")
    px = pixels(len(rows))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        tokenreduce.patch(model, method, **params)
        with _context(model, instructions):
            got = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    tokenreduce.unpatch(model)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def geometry(num_prefix: int = 1, num_patches: Optional[int] = PATCHES, dim: int = WIDTH,
             grid: Optional[Tuple[int, int]] = GRID) -> Geometry:
    return Geometry(num_blocks=2, num_prefix=num_prefix, num_patches=num_patches, dim=dim, num_heads=4,
                    has_class_token=num_prefix > 0, grid=grid)


def random_state(batch: int = 2, num_prefix: int = 1, patches: int = 30, dim: int = 8, heads: int = 3,
                 seed: int = 0, **fields: Any) -> Tuple[TokenState, torch.Tensor]:
    """A float64 token state with attention analysis from random q / k (CLS row, attention rows) and random projected
    features; also returns the full attention probabilities ``[B, H, N, N]`` for references."""
    g = torch.Generator().manual_seed(seed)
    n = num_prefix + patches
    x = torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    q = torch.randn(batch, heads, n, 4, generator=g, dtype=torch.float64) * 2
    k = torch.randn(batch, heads, n, 4, generator=g, dtype=torch.float64) * 2
    probs = attention_probs(q, k, 0.5, None)
    projected = torch.randn(batch, patches, 12, generator=g, dtype=torch.float64)
    state = TokenState(x=x, size=torch.ones(batch, n, dtype=torch.float64), num_prefix=num_prefix,
                       cls_attn=probs[:, :, 0].mean(1) if num_prefix else None,
                       attn_rows=AttentionRows(q, k, 0.5, None), projected=projected, **fields)
    return state, probs
