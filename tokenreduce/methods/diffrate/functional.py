"""DiffRate (Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers", ICCV 2023)
as pure tensor functions: importance sorting, the similarity merge, and the differentiable discrete proxy (DDP)
that turns learnable logits over candidate kept counts into an integer count, a soft keep mask and a FLOPs value.

Conventions. Tokens are sorted per block by the CLS attention they receive, prefix tokens pinned first, so "keep
K" always means "keep positions ``0 .. K-1``". Kept counts include the prefix tokens (as upstream's
``set_kept_num``). Candidate counts ``c`` count patch tokens only (``K = c + num_prefix``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ...core import CostModel
from ...ops.matching import best_match
from ...ops.merge import gather_tokens, merge_mean, merge_source

Count = Union[int, float, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Sorting and merging (shared by inference and rate search)
def sort_by_importance(cls_attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Token order by descending CLS attention, prefix tokens pinned first in their own order.

    Args:
        cls_attn: ``[B, N]`` head-averaged attention of the CLS query over all tokens.
        num_prefix: leading tokens that stay where they are.

    Returns:
        ``order [B, N]`` int64: ``x.gather(1, order)`` is the sorted sequence. Uses ``torch.sort`` (not stable
        sorting) exactly as upstream, so exact ties resolve the same way.
    """
    b = cls_attn.shape[0]
    rest = cls_attn[:, num_prefix:].sort(dim=-1, descending=True).indices + num_prefix
    prefix = torch.arange(num_prefix, device=cls_attn.device).expand(b, num_prefix)
    return torch.cat([prefix, rest], dim=1)


def similarity_assign(x: torch.Tensor, num_dst: int, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """DiffRate's merge matching: every token beyond the first ``num_dst`` joins its most similar of them.

    Args:
        x: ``[B, N, C]`` hidden states (the full width, not keys); N > num_dst.
        num_dst: M, the tokens that stay (``num_dst > num_prefix``).
        num_prefix: destinations that never receive a token (upstream protects the CLS column).

    Returns:
        ``(assign [B, N], score [B, N - M])``: output slot of every token (dst ``i -> i``, src -> its best dst)
        and each source's cosine similarity to the destination it joins. No gradient (a decision).
    """
    with torch.no_grad():
        unit = x / x.norm(dim=-1, keepdim=True)
        score, index = best_match(unit[:, num_dst:], unit[:, :num_dst], protect_cols=num_prefix)
        dst = torch.arange(num_dst, device=x.device).expand(x.shape[0], num_dst)
        return torch.cat([dst, index], dim=1), score


def similarity_merge(
    x: torch.Tensor, size: torch.Tensor, source: Optional[torch.Tensor], num_dst: int, num_prefix: int
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Inference merge: keep the first M tokens, fold every other token into its most similar kept one.

    Args:
        x: ``[B, N, C]`` sorted tokens, N > M.
        size: ``[B, N]`` sizes used by proportional attention.
        source: ``[B, N, N0]`` 0/1 or None.
        num_dst: M.
        num_prefix: protected destinations.

    Returns:
        ``x' [B, M, C]``: the UNWEIGHTED mean of each destination and its sources (upstream's
        ``scatter_reduce('mean', include_self=True)``); ``size' [B, M]``: destination size plus the sources' sizes
        scaled by their similarity (not clamped, as upstream at inference); ``source' [B, M, N0]`` or None.
    """
    assign, score = similarity_assign(x, num_dst, num_prefix)
    merged = merge_mean(x, assign, num_dst)
    contribution = torch.cat([size[:, :num_dst], size[:, num_dst:] * score.to(size.dtype)], dim=1)
    new_size = size.new_zeros(size.shape[0], num_dst).scatter_add_(1, assign, contribution)
    new_source = merge_source(source, assign, num_dst) if source is not None else None
    return merged, new_size, new_source


def masked_merge(
    x: torch.Tensor, size: torch.Tensor, num_dst: int, num_live: int, num_prefix: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rate-search merge: tokens are masked, never removed, so the sequence keeps its length.

    Args:
        x: ``[B, N, C]`` sorted tokens; only the first ``num_live`` take part.
        size: ``[B, N]`` sizes (>= 1 during the search).
        num_dst: M < num_live, the destinations.
        num_live: the tokens still alive after pruning.
        num_prefix: protected destinations.

    Returns:
        ``x' [B, N, C]`` with rows ``< M`` replaced by the unweighted mean of each destination and its sources
        (differentiable in x; the matching is not), other rows unchanged; ``size' [B, N]``: upstream's training
        rule, ``s[:live] = clamp([s_dst, s_src * cos], min=1)`` then ``s_dst += sum of its clamped sources``
        (sources keep their clamped sizes; they are masked from now on).
    """
    head = x[:, :num_live]
    assign, score = similarity_assign(head.detach(), num_dst, num_prefix)
    merged = merge_mean(head, assign, num_dst)
    x = torch.cat([merged, x[:, num_dst:]], dim=1)
    scaled = torch.cat([size[:, :num_dst], size[:, num_dst:num_live] * score.to(size.dtype)], dim=1).clamp(min=1)
    dst = scaled[:, :num_dst].scatter_add(1, assign[:, num_dst:], scaled[:, num_dst:])
    size = torch.cat([dst, scaled[:, num_dst:], size[:, num_live:]], dim=1)
    return x, size


def permute_tokens(order: torch.Tensor, *tensors: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Apply one token order ``[B, N]`` to several ``[B, N, ...]`` tensors (None passes through)."""
    return [gather_tokens(t, order) if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------------------------------------------
# Rate search: the differentiable discrete proxy
def candidate_counts(num_patches: int, granularity: int, *, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Candidate kept patch counts ``[num_patches, num_patches - g, ...] > 0`` (``[K]``, descending)."""
    return torch.arange(num_patches, 0, -granularity, dtype=dtype, device=device)


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """``ceil(x)`` forward, identity gradient (straight-through)."""
    return x + (torch.ceil(x) - x).detach()


def kept_count(logits: torch.Tensor, candidates: torch.Tensor, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """DDP's kept count from logits over candidates.

    Args:
        logits: ``[K]`` learnable logits.
        candidates: ``[K]`` candidate patch counts, same dtype.
        num_prefix: added to the count (the kept count includes CLS).

    Returns:
        ``(kept, probs)``: ``kept`` a scalar tensor whose value is the integer ``ceil(E) + num_prefix`` with
        ``E = sum_k c_k softmax(logits)_k`` and whose gradient is ``dE`` (straight-through ceil); ``probs [K]``.
    """
    probs = logits.softmax(dim=-1)
    expected = (probs * candidates).sum()
    return ste_ceil(expected) + num_prefix, probs


def keep_probability(probs: torch.Tensor, candidates: torch.Tensor, num_tokens: int, num_prefix: int) -> torch.Tensor:
    """Probability that sorted position j survives: ``pi_j = sum_k p_k [j < c_k + num_prefix]`` (``[N]``).

    Elementwise product and sum (no matmul), so autocast leaves it in the logits' precision.
    """
    position = torch.arange(num_tokens, device=probs.device, dtype=candidates.dtype)
    survives = (position[:, None] < (candidates + num_prefix)[None, :]).to(probs.dtype)
    return (survives * probs[None, :]).sum(dim=-1)


def soft_keep_mask(pi: torch.Tensor, kept: int, num_live: int) -> torch.Tensor:
    """DDP's mask over sorted positions: hard value, gradient of ``pi`` (``[N]``).

    ``h_j = 0`` for ``kept <= j < num_live`` (the live tokens this step drops), else 1; returned as
    ``h - stopgrad(pi) + pi``, so the forward is the hard 0/1 mask and every position routes gradient to ``pi``.
    """
    hard = torch.ones_like(pi)
    hard[kept:num_live] = 0
    return hard - pi.detach() + pi


def ste_min(n: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``min(n, p, m)`` forward; gradient passed unchanged to both ``p`` and ``m`` and none to ``n`` (upstream)."""
    value = torch.minimum(torch.minimum(n.detach(), p.detach()), m.detach())
    return (value - p.detach() - m.detach()) + p + m


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention probabilities that ignore masked keys while keeping a gradient into the mask.

    Args:
        logits: ``[B, H, N, N]`` attention logits (scaled ``q·kᵀ`` plus the proportional-attention bias).
        policy: ``[B, N]`` keep mask of the keys (1 kept, 0 masked; carries gradient).
        eps: upstream's smoothing.

    Returns:
        ``[B, H, N, N]`` in the logits' dtype: ``a = exp(l - rowmax) * policy_ij`` with ``policy_ii = 1`` (a
        masked token still sees itself), ``p = (a + eps / N) / (sum_j a + eps)``. Computed in at least float32
        (upstream's float32 island; float64 stays float64), so half-precision autocast cannot underflow it.
    """
    n = logits.shape[-1]
    work = torch.promote_types(logits.dtype, torch.float32)
    eye = torch.eye(n, dtype=work, device=logits.device)
    full = policy.to(work)[:, None, None, :] * (1 - eye) + eye
    z = logits.to(work)
    a = torch.exp(z - z.amax(dim=-1, keepdim=True)) * full
    probs = (a + eps / n) / (a.sum(dim=-1, keepdim=True) + eps)
    return probs.to(logits.dtype)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs model (DiffRate's own analytic counter, multiply-accumulates per image)
def rate_flops(prune_kept: Sequence[Count], merge_kept: Sequence[Count], cost: CostModel, num_tokens: int) -> Count:
    """DiffRate's MACs per image for per-block kept counts (upstream's ``calculate_flop_training/inference``):
    ``cost.constant + sum_l [attn_linear_l N_l + attn_quadratic_l N_l² + mlp_l N_{l+1}]`` with ``N_0 = num_tokens``
    and ``N_{l+1} = min(N_l, P_l, M_l)``.

    Args:
        prune_kept, merge_kept: one count per block, incl. prefix tokens; ints (inference) or scalar tensors
            with gradient (rate search: then ``N_{l+1}`` is :func:`ste_min`, so the gradient reaches both counts).
        cost: the adapter's MAC model (upstream charges the patch embedding for the prefix tokens too: add
            ``prefix · cost.embed_per_token`` to its constant for upstream's number).
        num_tokens: tokens entering the first block, prefix included.

    Returns:
        A float for int counts, else a scalar tensor in the counts' dtype.
    """
    if len(prune_kept) != cost.num_layers or len(merge_kept) != cost.num_layers:
        raise ValueError(f"need {cost.num_layers} kept counts per kind, got {len(prune_kept)} and {len(merge_kept)}")
    tensors = [c for c in list(prune_kept) + list(merge_kept) if torch.is_tensor(c)]
    if tensors:
        ref = tensors[0]
        as_t = (lambda v: v if torch.is_tensor(v) else torch.tensor(float(v), dtype=ref.dtype, device=ref.device))
        n: Count = as_t(num_tokens)
        total: Count = as_t(cost.constant)
    else:
        n, total = num_tokens, float(cost.constant)
    for l in range(cost.num_layers):
        total = total + cost.attn_linear[l] * n + cost.attn_quadratic[l] * n * n
        if tensors:
            n = ste_min(n, as_t(prune_kept[l]), as_t(merge_kept[l]))
        else:
            n = min(n, int(prune_kept[l]), int(merge_kept[l]))
        total = total + cost.mlp[l] * n
    return total
