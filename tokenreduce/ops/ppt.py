"""PPT (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers") as pure tensor functions:
the per-sample policy and combining the two candidate results of a block.

PPT reduces every sample of a block by the same number of tokens, either by *pooling* (ToMe's bipartite merge,
``ops.matching``) or by *pruning* (the least significant tokens, ``ops.ats.significance``); which one is decided per
sample by the variance of its significance scores. Both candidates have the same shape, so a batch that mixes
policies is one ``torch.where`` over the batch.
"""
from __future__ import annotations

from typing import Optional

import torch


def pooling_policy(sig: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B]`` bool: pool (True) where the unbiased variance of a sample's significance ``sig [B, T]`` is below
    ``threshold``; prune otherwise (also when the variance is undefined, T < 2)."""
    return sig.var(dim=1) < threshold


def per_sample(choose_a: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``a`` for the samples where ``choose_a [B]`` is True, ``b`` elsewhere (same shapes ``[B, ...]``)."""
    if a is None or b is None:
        return None
    return torch.where(choose_a.reshape(-1, *([1] * (a.dim() - 1))), a, b)


def singleton_index(assign: torch.Tensor, num_out: int) -> torch.Tensor:
    """For a merge ``assign [B, N] -> slot``: ``[B, num_out]`` the input token each output slot is when it holds
    exactly one token, -1 for a slot that merged several."""
    b, n = assign.shape
    count = torch.zeros(b, num_out, dtype=torch.long, device=assign.device).scatter_add_(
        1, assign, torch.ones_like(assign))
    index = torch.zeros(b, num_out, dtype=torch.long, device=assign.device).scatter_(
        1, assign, torch.arange(n, device=assign.device).expand(b, n))
    return torch.where(count == 1, index, torch.full_like(index, -1))
