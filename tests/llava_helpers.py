"""Tiny random LLaVA models and prompts for the LLaVA / VisionZip / DART tests (no downloads)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
import torch

import tokenreduce

from .conftest import FIXTURES, _load_checker

import transformers  # noqa: E402  (a dev dependency; missing, the LLaVA tests must fail, not vanish)


def run_llava_case(method: str, case: str):
    """Run one ``../shared/fixtures/<method>/<case>`` exactly as ../shared/tools/check_llava_fixtures.py does;
    returns ``(ok, messages)``."""
    checker = _load_checker("check_llava_fixtures")
    return checker.run_case(str(FIXTURES / method / f"{case}.json"), tokenreduce, True)

IMAGE_TOKEN = 63
PAD = 0


def tiny_llava(attn: str = "sdpa", seed: int = 0, vision_layers: int = 3, lm_layers: int = 3,
               image_size: int = 56, patch: int = 7, text_model: str = "llama") -> torch.nn.Module:
    """A random LlavaForConditionalGeneration shaped like LLaVA-1.5 in miniature: CLIP tower with ``vision_layers``
    layers (features from layer -2, CLS dropped), Llama with ``lm_layers`` layers and GQA, float64, eval.
    Weights get extra noise so attention is far from uniform and selections are far from ties."""
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                           patch_size=patch, hidden_act="quick_gelu"),
        text_config=dict(model_type=text_model, vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=lm_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=PAD),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.double().eval()


def prompts(num_image_tokens: int = 64, seed: int = 0,
            lengths: Sequence[Tuple[int, int]] = ((3, 5), (6, 2), (4, 4))) -> List[torch.Tensor]:
    """One prompt per (text before, text after) pair: BOS + text, ``num_image_tokens`` image tokens, text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for before, after in lengths:
        pre = torch.randint(3, IMAGE_TOKEN - 3, (before,), generator=g)
        pre[0] = 1
        post = torch.randint(3, IMAGE_TOKEN - 3, (after,), generator=g)
        rows.append(torch.cat([pre, torch.full((num_image_tokens,), IMAGE_TOKEN), post]))
    return rows


def pad(rows: Sequence[torch.Tensor], side: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the rows padded with PAD on ``side`` ("left" or "right")."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def left_pad(rows: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the rows, left-padded with PAD."""
    return pad(rows, "left")


def pixels(batch: int = 3, image_size: int = 56, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=g, dtype=torch.float64)


def greedy(model, input_ids, attention_mask, pixel_values, max_new_tokens: int = 4, **kwargs):
    """``(new tokens [B, T], logits [B, T, V])`` of greedy generation."""
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kwargs)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(list(out.logits), 1)


#: (method, params) at budgets that fit the tiny model (64 patches, 3-layer LLM)
METHODS = [
    ("visionzip", dict(dominant=10, contextual=4)),
    ("tome", dict(r=8)),
    ("dart", dict(layer=1, image_pivots=2, text_pivots=2, per_pivot=4)),
]
