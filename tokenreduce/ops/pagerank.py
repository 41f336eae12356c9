"""Weighted PageRank on the attention graph (Zero-TPrune, Wang et al., CVPR 2024, arXiv 2305.17328).

The post-softmax attention ``A [B, H, N, N]`` of a block (rows are queries, every row sums to 1) is read as
the adjacency matrix of a directed graph in which token ``j`` votes for token ``i`` with weight ``A[j, i]``.
Importance is the stationary score of the graph shift ``s <- Aᵀ s``, computed per sample and per head:

    s_h^(t+1)[i] = sum_j A[h, j, i] · s_h^(t)[j]

Because the rows of ``A`` sum to 1 the total score is preserved, so ``s`` stays a distribution without any
re-normalisation. Heads are then filtered by the variance of their scores and aggregated by root mean square.
All functions are pure and batched; they compute in at least float32 (30 iterations in half precision drift).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

#: Zero-TPrune's variance band of the head filter, on the mean-1 scale ``N · s_h``.
DEFAULT_HEAD_FILTER: Tuple[float, float] = (0.01, 0.7)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is promoted to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def initial_scores(num_tokens: int, cls_weight: Optional[float], *, dtype: torch.dtype = torch.float32,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """The starting distribution ``s^(0) [N]``.

    Args:
        num_tokens: N, the tokens in the graph.
        cls_weight: weight of token 0 (the CLS token) relative to every other token, e.g. ``sqrt(N)``
            (Zero-TPrune's "emphasizing informative region"); None for the uniform start.
        dtype, device: of the result.

    Returns:
        ``[N]`` non-negative, summing to 1.
    """
    s = torch.ones(num_tokens, dtype=dtype, device=device)
    if cls_weight is not None and num_tokens > 0:
        s[0] = cls_weight
    return s / s.sum()


def cls_sqrt_n_weight(num_tokens: int) -> float:
    """Zero-TPrune's CLS emphasis: the CLS token starts with ``sqrt(N)`` times the score of any other token."""
    return math.sqrt(num_tokens)


def pagerank_step(attn: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """One graph shift ``s <- Aᵀ s`` per sample and head.

    Args:
        attn: ``[B, H, N, N]`` attention probabilities, rows are queries.
        scores: ``[B, H, N]``.

    Returns:
        ``[B, H, N]`` with ``out[b, h, i] = sum_j attn[b, h, j, i] · scores[b, h, j]``.
    """
    return (scores.unsqueeze(-2) @ attn).squeeze(-2)


def weighted_pagerank(attn: torch.Tensor, iterations: int, init: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head Weighted PageRank scores after ``iterations`` graph shifts.

    Args:
        attn: ``[B, H, N, N]`` row-stochastic attention probabilities.
        iterations: number of shifts (>= 0).
        init: ``[N]`` or ``[B, H, N]`` starting distribution; uniform when None.

    Returns:
        ``[B, H, N]`` scores (float32, or float64 for float64 input); each ``[b, h]`` row sums to 1.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    a = attn.to(_work_dtype(attn.dtype))
    b, h, n, _ = a.shape
    if init is None:
        init = initial_scores(n, None, dtype=a.dtype, device=a.device)
    s = init.to(device=a.device, dtype=a.dtype).expand(b, h, n)
    for _ in range(iterations):
        s = pagerank_step(a, s)
    return s


def head_variance(scores: torch.Tensor) -> torch.Tensor:
    """Variance over tokens of ``N · s_h`` (population variance, i.e. divided by N).

    Args:
        scores: ``[B, H, N]`` per-head distributions.

    Returns:
        ``[B, H]``. ``N · s_h`` has mean 1, so the variance does not depend on the number of tokens.
    """
    n = scores.shape[-1]
    return (scores * n).var(dim=-1, unbiased=False)


def head_filter_mask(scores: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Zero-TPrune's variance-based head filter.

    Args:
        scores: ``[B, H, N]`` per-head distributions.
        low, high: the kept band of :func:`head_variance`, inclusive.

    Returns:
        ``[B, H]`` bool, True for the heads kept. A sample whose heads all fall outside the band keeps every
        head (the filter must never leave a sample without scores).
    """
    var = head_variance(scores)
    mask = (var >= low) & (var <= high)
    none_left = ~mask.any(dim=-1, keepdim=True)
    return mask | none_left


def rms_aggregate(scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Root mean square over the kept heads: ``s = sqrt(mean_{h kept} s_h²)``.

    Args:
        scores: ``[B, H, N]``.
        mask: ``[B, H]`` bool heads to use (at least one per sample), or None for all heads.

    Returns:
        ``[B, N]``.
    """
    sq = scores * scores
    if mask is None:
        return sq.mean(dim=1).sqrt()
    w = mask.to(scores.dtype).unsqueeze(-1)
    return ((sq * w).sum(dim=1) / w.sum(dim=1)).sqrt()


def aggregate_heads(scores: torch.Tensor, head_filter: Optional[Tuple[float, float]]) -> torch.Tensor:
    """Head filter (when given) then RMS: ``[B, H, N] -> [B, N]``."""
    mask = head_filter_mask(scores, *head_filter) if head_filter is not None else None
    return rms_aggregate(scores, mask)


def wpr_importance(attn: torch.Tensor, iterations: int, *, cls_token: bool = True,
                   cls_init: str = "sqrt_n",
                   head_filter: Optional[Tuple[float, float]] = DEFAULT_HEAD_FILTER) -> torch.Tensor:
    """Zero-TPrune's token importance: Weighted PageRank, head filter, RMS over heads.

    Args:
        attn: ``[B, H, N, N]`` attention probabilities of one block.
        iterations: graph shifts.
        cls_token: whether token 0 is a CLS token (only then does ``cls_init="sqrt_n"`` emphasise it).
        cls_init: ``"sqrt_n"`` (CLS starts with sqrt(N) times the weight of any other token) or ``"uniform"``.
        head_filter: ``(low, high)`` variance band, or None to use every head.

    Returns:
        ``[B, N]`` importance (float32, or float64 for float64 input).
    """
    n = attn.shape[-1]
    weight = cls_sqrt_n_weight(n) if (cls_token and cls_init == "sqrt_n") else None
    init = initial_scores(n, weight, dtype=_work_dtype(attn.dtype), device=attn.device)
    return aggregate_heads(weighted_pagerank(attn, iterations, init), head_filter)


def subgraph(attn: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The attention graph restricted to some tokens, rows renormalised to sum 1.

    Args:
        attn: ``[B, H, N, N]``.
        index: ``[B, M]`` tokens to keep, per sample.

    Returns:
        ``[B, H, M, M]`` row-stochastic (a row whose kept mass is 0 becomes uniform).
    """
    b, h, n, _ = attn.shape
    m = index.shape[1]
    rows = index[:, None, :, None].expand(b, h, m, n)
    sub = attn.gather(2, rows)
    cols = index[:, None, None, :].expand(b, h, m, m)
    sub = sub.gather(3, cols)
    total = sub.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(sub, 1.0 / m)
    return torch.where(total > 0, sub / total.clamp_min(torch.finfo(sub.dtype).tiny), uniform)
