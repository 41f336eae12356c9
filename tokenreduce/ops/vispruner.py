"""VisPruner's selection as pure tensor functions: important tokens by an importance score, then diverse tokens by
iteratively removing the residual tokens most similar to others (Zhang et al., "Beyond Text-Visual Attention:
Exploiting Visual Cues for Effective Token Pruning in VLMs", ICCV 2025)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .merge import gather_tokens

#: Residual tokens dropped per iteration at most (upstream's constant).
MAX_DROP_PER_STEP = 8


class VisPrunerSelection(NamedTuple):
    """``important [B, M]`` (descending score order) and ``diverse [B, T - M]`` (the final residual, in the order the
    iterations leave it), indices among the P patches."""

    important: torch.Tensor
    diverse: torch.Tensor


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` patch indices by descending ``scores [B, P]`` (stable: equal scores keep the lower index first)."""
    return scores.argsort(dim=1, descending=True, stable=True)


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, num_diverse: int,
                      max_drop: int = MAX_DROP_PER_STEP) -> torch.Tensor:
    """Shrink ``residual`` to ``num_diverse`` tokens by iterative matching and pruning.

    Each iteration, with R tokens left (in their current order): ``r = min(max_drop, R - num_diverse)``; the tokens at
    even positions (a; ``ceil(R/2)`` of them) each score their highest cosine similarity to a token at an odd position
    (b); the ``r`` highest-scoring a tokens are dropped (all of them when ``r`` exceeds their number) and the new
    order is [surviving a tokens by descending score, then all b tokens in their previous order]. Only a tokens are
    ever dropped; the order matters because it decides the next even/odd split.

    Args:
        unit: ``[B, P, C]`` L2-normalised features of all patches.
        residual: ``[B, R0]`` indices into P, in their starting order.
        num_diverse: tokens to leave, ``0 <= num_diverse <= R0``.

    Returns:
        ``[B, num_diverse]`` indices into P.
    """
    while residual.shape[1] > num_diverse:
        r_total = residual.shape[1]
        a, b = residual[:, 0::2], residual[:, 1::2]
        drop = min(max_drop, r_total - num_diverse, a.shape[1])
        sim = gather_tokens(unit, a) @ gather_tokens(unit, b).transpose(1, 2)  # [B, |a|, |b|]
        order = sim.max(dim=-1).values.argsort(dim=-1, descending=True, stable=True)
        residual = torch.cat([a.gather(1, order[:, drop:]), b], dim=1)
    return residual


def vispruner_select(scores: torch.Tensor, features: torch.Tensor, num_important: int,
                     num_diverse: int) -> VisPrunerSelection:
    """VisPruner on a batch of images.

    Args:
        scores: ``[B, P]`` patch importance (CLS attention, or mean received attention on a CLS-less tower).
        features: ``[B, P, C]`` the features the similarity is computed on (the feature layer's patch hidden states,
            before the projector), divided by their L2 norm without an epsilon, in their own dtype.
        num_important: M, the top-M patches by ``scores``.
        num_diverse: tokens chosen from the remaining ``P - M`` (taken in descending-score order) by
            :func:`remove_duplicates`; ``M + num_diverse <= P``.
    """
    order = descending_order(scores)
    important, residual = order[:, :num_important], order[:, num_important:]
    if num_diverse == 0:
        return VisPrunerSelection(important, residual[:, :0])
    unit = features / features.norm(dim=-1, keepdim=True)
    return VisPrunerSelection(important, remove_duplicates(unit, residual, num_diverse))
