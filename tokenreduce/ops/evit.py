"""EViT's token reorganisation (Liang et al., "Not All Patches are What You Need", ICLR 2022) as pure tensor
functions: keep the most attentive tokens in descending score order, and fuse the others into one token.

Conventions (as in ``ops.pruning``): tokens ``[B, N, ...]`` start with ``num_prefix`` protected tokens (CLS, dist,
registers), which are always kept and always first. A selection is an index tensor ``[B, M]`` into the N input
tokens. Unlike ``ops.pruning.topk_keep`` the survivors here follow the prefix in **descending score order**, as
EViT's ``torch.topk(..., sorted=True)`` leaves them (PPT's pruning keeps the same order).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .pruning import KeepSpec, keep_count, with_prefix


def evit_keep_count(present: int, keep: KeepSpec) -> int:
    """Non-prefix tokens one EViT step keeps.

    Args:
        present: non-prefix tokens entering the step (an earlier fused token included).
        keep: an int count, or a float fraction: ``math.ceil(keep * present)`` computed as a plain float product,
            exactly as upstream (``0.55 * 100`` is ``55.00000000000001`` and keeps 56;
            ``ops.pruning.keep_count`` would keep 55). At least 1 (only a ratio of 0, used by budget searches,
            can ask for fewer).

    Returns:
        The count; ValueError when an int asks for more tokens than are present.
    """
    if isinstance(keep, float):
        return max(1, min(present, math.ceil(keep * present)))
    return keep_count(present, keep)


def topk_by_score(scores: torch.Tensor, num_prefix: int, k: int) -> torch.Tensor:
    """The prefix, then the ``k`` best non-prefix tokens in descending score order.

    Args:
        scores: ``[B, N]`` (prefix columns ignored).
        num_prefix: p.
        k: ``0 <= k <= N - p``.

    Returns:
        ``[B, p + k]`` selection. Ties follow ``torch.topk``.
    """
    top = scores[:, num_prefix:].topk(k, dim=1, largest=True, sorted=True).indices
    return with_prefix(top, num_prefix)


def complement_weights(scores: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``[B, N]``: the scores of the non-prefix tokens that ``keep [B, M]`` leaves out, 0 elsewhere."""
    weights = scores.clone()
    weights[:, :num_prefix] = 0
    return weights.scatter(1, keep, 0.0)


def fuse_inattentive(x: torch.Tensor, size: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor,
                     num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EViT's fused token: the left-out tokens summed with their **raw** scores as weights.

    Args:
        x: ``[B, N, C]`` tokens (after the attention residual).
        size: ``[B, N]``.
        scores: ``[B, N]`` the CLS attention of every token (head mean).
        keep: ``[B, M]`` the kept tokens (prefix included).
        num_prefix: p.

    Returns:
        ``(fused [B, 1, C], fused_size [B, 1], member [B, N])``: ``fused = sum_j score_j x_j`` over the left-out
        tokens j (the weights are not renormalised: they sum to less than 1, as upstream), its size the sum of
        theirs, and ``member`` 0/1 marking them (for sources).
    """
    weights = complement_weights(scores, keep, num_prefix)
    member = (complement_weights(torch.ones_like(scores), keep, num_prefix) > 0).to(x.dtype)
    fused = weights.to(x.dtype).unsqueeze(1) @ x
    fused_size = (size * member.to(size.dtype)).sum(dim=1, keepdim=True)
    return fused, fused_size, member
