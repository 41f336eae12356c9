"""Rotary position embeddings as a pure function (the standard ``rotate_half`` form used by Llama, Mistral, Qwen2,
Qwen3 and, with merged M-RoPE sections, Qwen2.5-VL / Qwen3-VL)."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [..., d]``: ``(-x2, x1)`` for the two halves ``x1, x2`` of the last dimension."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, S, d]`` by ``cos, sin [B or 1, S, d]`` (one angle per position and channel)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
