"""Adaptive Token Sampling (Fayyaz et al., "Adaptive Token Sampler For Efficient Vision Transformers", ECCV 2022)
as pure tensor functions: the significance score, the eps-smoothed softmax, and inverse-transform sampling with a
different number of kept tokens per sample.

Conventions: tokens ``[B, N, ...]`` start with ``num_prefix`` protected tokens (CLS, dist, registers); the score
row is the CLS token's (token 0). Samples with fewer tokens than the batch's longest carry padding, marked by
``valid [B, N]`` (False = padding); every function here treats each sample on its own valid tokens only, so a
sample's result never depends on the rest of its batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def significance(cls_attn_per_head: torch.Tensor, values: torch.Tensor, num_prefix: int,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ATS's token significance (also PPT's importance score).

    ``sigma_j = (sum_h A[h, 0, j]) * ||v_j||_2`` for the non-prefix tokens j, where ``v_j`` is token j's value
    vector with all heads concatenated, normalised to sum 1 over the (valid) non-prefix tokens.

    Args:
        cls_attn_per_head: ``[B, H, N]`` the CLS query's attention probabilities.
        values: ``[B, H, N, d]`` the values of the same attention.
        num_prefix: p.
        valid: ``[B, N]`` bool, or None; padding gets 0.

    Returns:
        ``[B, N - p]``.
    """
    b, h, n, d = values.shape
    v_norm = torch.linalg.vector_norm(values.transpose(1, 2).reshape(b, n, h * d), ord=2, dim=-1)
    score = cls_attn_per_head.sum(dim=1) * v_norm
    if valid is not None:
        score = score.masked_fill(~valid, 0.0)
    score = score[:, num_prefix:]
    return score / score.sum(dim=1, keepdim=True)


def smoothed_softmax(logits: torch.Tensor, valid: Optional[torch.Tensor], eps: float,
                     padding: str = "absent") -> torch.Tensor:
    """ATS's softmax with a smoothing term: ``(exp(s - max s) + eps/N) / (sum exp(s - max s) + eps)``.

    Args:
        logits: ``[B, H, Nq, N]`` scaled ``q·kᵀ``; padding columns may already be ``-inf``.
        valid: ``[B, N]`` bool real tokens, or None (all are).
        eps: the smoothing term (upstream ``softmax_with_policy``'s ``eps``).
        padding: how padding columns enter, per sample:

            - ``"absent"``: as if they did not exist (the sample run alone, compacted): the max runs over its
              valid columns and ``N`` is its valid count.
            - ``"zero"``: as upstream's zeroed, masked slots of a full-length sequence (``drop_tokens=False``):
              their logit is 0 and enters the max, ``N`` is the full length, they take their ``eps/N`` share of
              the denominator, and their value is zero (their probability is returned as 0).

    Returns:
        ``[B, H, Nq, N]`` probabilities, 0 at padding columns.
    """
    n = logits.shape[-1]
    if valid is None:
        shifted = logits - logits.amax(dim=-1, keepdim=True)
        e = shifted.exp()
        return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)
    cols = valid[:, None, None, :]
    if padding == "zero":
        s = logits.masked_fill(~cols, 0.0)
        count = n
    elif padding == "absent":
        s = logits.masked_fill(~cols, float("-inf"))
        count = valid.sum(dim=1).to(logits.dtype)[:, None, None, None]
    else:
        raise ValueError(f"padding must be 'absent' or 'zero', got {padding!r}")
    e = (s - s.amax(dim=-1, keepdim=True)).exp().masked_fill(~cols, 0.0)
    probs = (e + eps / count) / (e.sum(dim=-1, keepdim=True) + eps)
    return probs.masked_fill(~cols, 0.0)


def sampling_grid(y0: torch.Tensor, num_points: int) -> torch.Tensor:
    """Upstream's ``create_ys``: ``num_points`` values from ``y0`` to 1 per sample.

    ``y_k = y0 + (lin_k·(R-1) - y0·k) / (R-1)`` with ``lin = linspace(0, 1, R)``, computed in that order.

    Args:
        y0: ``[B]`` the smallest non-zero normalised CDF value of each sample.
        num_points: R >= 1 (R = 1 gives the single point 1: the most significant token).

    Returns:
        ``[B, R]``.
    """
    if num_points == 1:
        return torch.ones_like(y0)[:, None]
    lin = torch.linspace(0.0, 1.0, num_points, dtype=y0.dtype, device=y0.device)
    steps = torch.arange(num_points, dtype=y0.dtype, device=y0.device)
    y0 = y0[:, None]
    return y0 + ((lin * (num_points - 1)) - y0 * steps) / (num_points - 1)


def inverse_transform_sampling(sig: torch.Tensor, valid: Optional[torch.Tensor], num_points: int,
                               floor_at_zero: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick tokens by inverse-transform sampling of their significance (deterministic grid).

    Per sample, on its valid tokens only: sort ``sig`` ascending, ``cdf = cumsum``, min-max normalise it to
    ``c`` (the minimum is the smallest token's cdf, or 0 where ``floor_at_zero``), lay the grid
    :func:`sampling_grid` from the smallest non-zero ``c`` to 1, and let each grid point pick the token whose
    ``c`` is nearest (the first on ties). The distinct picks are kept. With the min-max CDF the least
    significant token has ``c = 0`` and is never picked.

    Args:
        sig: ``[B, T]`` significance of the candidate (non-prefix) tokens; padding ignored.
        valid: ``[B, T]`` bool, or None.
        num_points: grid points R (the paper's K - 1; upstream: the input's token count - 1, fixed per forward).
        floor_at_zero: ``[B]`` bool, or None: use 0 as the CDF minimum (upstream's full-length mode, where
            zeroed slots sort first with cdf 0).

    Returns:
        ``(order [B, T], picked [B, T])``: token positions in ascending significance (padding last), and whether
        the token at each sorted position is kept.
    """
    if valid is None:
        valid = torch.ones_like(sig, dtype=torch.bool)
    inf = torch.finfo(sig.dtype).max
    sorted_sig, order = sig.masked_fill(~valid, inf).sort(dim=1)
    count = valid.sum(dim=1)
    live = torch.arange(sig.shape[1], device=sig.device)[None, :] < count[:, None]  # sorted positions in use
    cdf = sorted_sig.masked_fill(~live, 0.0).cumsum(dim=1)
    lo = cdf[:, :1]
    if floor_at_zero is not None:
        lo = torch.where(floor_at_zero[:, None], torch.zeros_like(lo), lo)
    hi = cdf.gather(1, (count - 1).clamp_min(0)[:, None])
    c = (cdf - lo) / (hi - lo)
    y0 = torch.where(c == 0, torch.full_like(c, float("inf")), c).masked_fill(~live, float("inf")).amin(dim=1)
    ys = sampling_grid(y0, num_points)
    distance = (ys[:, :, None] - c.masked_fill(~live, float("inf"))[:, None, :]).abs()
    picks = distance.argmin(dim=2)  # [B, R]; ties go to the first (lowest sorted) position, as torch.min
    picked = torch.zeros_like(live).scatter(1, picks, True) & live
    # One candidate (min == max): nothing to normalise; keep it.
    picked = torch.where((count == 1)[:, None], live, picked)
    return order, picked


def sampled_index(order: torch.Tensor, picked: torch.Tensor, num_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of :func:`inverse_transform_sampling`, compacted to the front.

    Args:
        order: ``[B, T]`` positions in ascending significance.
        picked: ``[B, T]`` bool, per sorted position.
        num_out: output slots (>= the largest count of picks).

    Returns:
        ``(index [B, num_out], valid [B, num_out])``: token positions of the kept tokens in ascending
        significance, then padding (``valid`` False; the index there repeats a kept position and is not
        meaningful).
    """
    t = order.shape[1]
    rank = torch.arange(t, device=order.device).expand_as(order)
    # picked positions first (in sorted order), the rest after: a stable sort on "not picked"
    front = torch.where(picked, rank, rank + t).argsort(dim=1)[:, :num_out]
    index = order.gather(1, front)
    valid = picked.gather(1, front)
    return index, valid
