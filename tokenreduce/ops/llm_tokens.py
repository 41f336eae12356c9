"""Choosing visual tokens inside a language model, as pure functions: which query row ranks them, the top-k of a score
with a deterministic order, each image's run of visual tokens, and packing per-sample selections of different lengths
into one left-padded batch.

Used by the in-LLM methods (FastV, PyramidDrop, SparseVLM); nothing here knows a model or a method.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def last_real_index(valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last real token of every row of ``valid [B, S]`` (bool), wherever the padding is
    (left padding: ``S - 1``; right padding: before the pads). The "last prompt token" FastV and PyramidDrop rank
    with. Raises ValueError for a row without real tokens."""
    if not bool(valid.any(dim=1).all()):
        raise ValueError("a prompt row has no real token (its attention_mask is all zeros)")
    index = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return torch.where(valid, index, torch.full_like(index, -1)).amax(dim=1)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest of ``scores [N]`` in descending score order; equal scores go to the lower index
    (a stable sort), so the choice is deterministic where ``torch.topk``'s is not specified. ``0 <= k <= N``."""
    return scores.argsort(descending=True, stable=True)[:k]


def runs(mask: torch.Tensor) -> List[Tuple[int, int]]:
    """``[(start, end), ...]``: the maximal runs of True in a 1-D bool tensor, in order (one per image when every
    image is one run of visual tokens, as the VLM processors lay prompts out)."""
    m = mask.to(torch.int8)
    edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
    starts = (edges == 1).nonzero()[:, 0].tolist()
    ends = (edges == -1).nonzero()[:, 0].tolist()
    return list(zip(starts, ends))


def pack_left(rows: Sequence[torch.Tensor], fill: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample 1-D index tensors of different lengths, padding each on the left with ``fill``.

    Left, so that every row's last slot is still its last real token (``generate`` reads the next token from the
    last position).

    Returns:
        ``(index [B, S'], pad [B, S'] bool)`` with ``S' = max len``; ``pad`` marks the added slots.
    """
    width = max(int(r.shape[0]) for r in rows)
    device = rows[0].device
    index = torch.full((len(rows), width), fill, dtype=torch.long, device=device)
    pad = torch.ones(len(rows), width, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        n = int(r.shape[0])
        if n:
            index[i, width - n:] = r
            pad[i, width - n:] = False
    return index, pad
