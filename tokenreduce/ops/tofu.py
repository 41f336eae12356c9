"""Token Fusion (ToFu, Kim et al., WACV 2024) as pure tensor functions: the two ways it combines a group of tokens
that ToMe's bipartite matching put in one output slot.

- *prune*: the group becomes its destination token unchanged (the matched sources are dropped), as token pruning
  would, but the group's size and source still count every member.
- *MLERP* (norm-preserving merge): the size-weighted mean of the group gives the direction, the largest member
  norm the length, ``MLERP(X) = mean(X) · max_i ||x_i|| / ||mean(X)||``, so merging does not shrink token norms the
  way averaging does.

A merge is an assignment ``assign [B, N]`` of every token to an output slot (``tokenreduce.ops.merge``).
"""
from __future__ import annotations

import torch

from .merge import gather_tokens, merge_weighted


def bipartite_sources(assign: torch.Tensor, num_out: int) -> torch.Tensor:
    """``[B, N]`` bool: the tokens a ToMe-style bipartite match merged into another, i.e. the A tokens (even
    positions) whose output slot also holds a B token (odd positions). B tokens are always destinations."""
    b, n = assign.shape
    holds_b = torch.zeros(b, num_out, dtype=torch.bool, device=assign.device)
    holds_b.scatter_(1, assign[:, 1::2], True)
    out = torch.zeros(b, n, dtype=torch.bool, device=assign.device)
    out[:, ::2] = holds_b.gather(1, assign[:, ::2])
    return out


def representatives(assign: torch.Tensor, is_source: torch.Tensor, num_out: int) -> torch.Tensor:
    """The token that stands for each output slot: ``[B, M]`` index of the one member that is not a source.

    Args:
        assign: ``[B, N]`` output slot of every token.
        is_source: ``[B, N]`` bool, tokens that were merged into another (each slot has exactly one non-source).
    """
    b, n = assign.shape
    index = torch.arange(n, device=assign.device).expand(b, n)
    key = torch.where(is_source, torch.full_like(index, -1), index)
    out = torch.full((b, num_out), -1, dtype=torch.long, device=assign.device)
    return out.scatter_reduce_(1, assign, key, reduce="amax")


def merge_prune(x: torch.Tensor, assign: torch.Tensor, is_source: torch.Tensor, num_out: int) -> torch.Tensor:
    """ToFu's prune step: ``x [B, N, C] -> [B, M, C]``, every slot is its representative token, bit for bit."""
    return gather_tokens(x, representatives(assign, is_source, num_out))


def merge_mlerp(x: torch.Tensor, size: torch.Tensor, assign: torch.Tensor, is_source: torch.Tensor,
                num_out: int) -> torch.Tensor:
    """MLERP: ``x [B, N, C] -> [B, M, C]``.

    Each slot with several members is the size-weighted mean of them rescaled to the largest member norm; a slot
    with one member is that token, bit for bit. A mean of exactly zero length (members that cancel) stays zero.

    Args:
        size: ``[B, N]`` tokens each token stands for (the weights of the mean).
        is_source: ``[B, N]`` bool, tokens merged into another (to find each slot's single-member case).
    """
    b, _, c = x.shape
    mean = merge_weighted(x, size, assign, num_out)[0]
    norms = x.norm(dim=-1)
    peak = norms.new_zeros(b, num_out).scatter_reduce_(1, assign, norms, reduce="amax", include_self=False)
    length = mean.norm(dim=-1)
    scale = torch.where(length > 0, peak / torch.where(length > 0, length, torch.ones_like(length)),
                        torch.ones_like(length))
    count = size.new_zeros(b, num_out).scatter_add_(1, assign, torch.ones_like(size))
    alone = merge_prune(x, assign, is_source, num_out)
    return torch.where((count > 1)[..., None], mean * scale[..., None].to(x.dtype), alone)
