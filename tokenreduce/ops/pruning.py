"""Token pruning as pure tensor functions: keep schedules, top-k keep, and Zero-TPrune's similarity stage.

Conventions shared by every function here:

- Tokens ``[B, N, ...]`` start with ``num_prefix`` protected tokens (CLS, dist, registers). They are always
  kept and always first, in their original order.
- A selection is an index tensor ``[B, M]`` into the N input tokens: the prefix ``0..p-1`` first, then the
  surviving other tokens in ascending (i.e. spatial) order. Counts are shared by the batch, choices are per
  sample. ``ops.merge.gather_tokens`` applies a selection.
- A keep spec is an int (tokens kept after the step, not counting the prefix) or a float in (0, 1] (the
  fraction of the non-prefix tokens present before the step, rounded up, as EViT does).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .merge import gather_tokens

KeepSpec = Union[int, float]


# ---------------------------------------------------------------------------------------------------------------
# schedules (plain Python, resolved at patch time or once per input shape)

def keep_count(present: int, keep: KeepSpec) -> int:
    """Non-prefix tokens kept by one step.

    Args:
        present: non-prefix tokens entering the step.
        keep: an int count, or a float fraction in (0, 1] of ``present`` (rounded up, at least 1).

    Returns:
        The count. ValueError when an int asks for more tokens than are present or fewer than 1.
    """
    if isinstance(keep, float):
        return max(1, min(present, math.ceil(keep * present - 1e-9)))  # 1e-9: 0.7 * 10 is 7.000000000000001
    if keep > present:
        raise ValueError(f"keep={keep} tokens, but only {present} non-prefix tokens are present at this step")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    return int(keep)


def split_drop(present: int, drop: int, sim_fraction: float) -> Tuple[int, int]:
    """Zero-TPrune's split of one step's drop between the similarity and the importance stage.

    Args:
        present: non-prefix tokens entering the step.
        drop: tokens the step removes.
        sim_fraction: share of the drop removed by the similarity stage.

    Returns:
        ``(r_sim, r_imp)`` with ``r_sim = floor(sim_fraction · drop)``, capped at the size of the less important
        group ``present // 2`` (the S-stage can only drop from that group); the importance stage takes the rest.
    """
    r_sim = min(int(math.floor(sim_fraction * drop + 1e-9)), present // 2)
    return r_sim, drop - r_sim


def tokens_per_block(num_patches: int, num_prefix: int, num_blocks: int,
                     steps: Dict[int, KeepSpec]) -> List[int]:
    """Tokens entering every block when the steps ``{block: keep}`` run after those blocks.

    Returns:
        ``num_blocks`` totals (prefix included); ValueError for a step that cannot be applied.
    """
    n, out = num_patches, []
    for layer in range(num_blocks):
        out.append(num_prefix + n)
        if layer in steps:
            n = keep_count(n, steps[layer])
    return out


def search_keep_ratio(cost: Callable[[float], float], budget: float, *, iters: int = 60) -> Optional[float]:
    """The largest uniform keep ratio whose cost fits a budget.

    ``cost(ratio)`` must be non-decreasing in ``ratio`` (true for the FLOPs of a pruning schedule: a larger
    ratio keeps at least as many tokens in every step). The search is a bisection on ``(0, 1]``; because the
    token counts are integers the cost is a step function, and the bisection converges to the last step that
    still fits.

    Returns:
        The ratio, 1.0 when no pruning is needed, None when even the smallest ratio does not fit.
    """
    if cost(1.0) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    if cost(lo) > budget:
        return None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------------------------
# selections

def prefix_index(batch: int, num_prefix: int, device: torch.device) -> torch.Tensor:
    """``[B, p]`` the prefix indices ``0..p-1``."""
    return torch.arange(num_prefix, device=device).expand(batch, num_prefix)


def with_prefix(index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Turn ``[B, K]`` indices into the non-prefix tokens into a selection ``[B, p + K]`` of all tokens."""
    return torch.cat([prefix_index(index.shape[0], num_prefix, index.device), index + num_prefix], dim=1)


def topk_keep(scores: torch.Tensor, num_prefix: int, k: int) -> torch.Tensor:
    """Keep the prefix and the ``k`` non-prefix tokens with the highest scores.

    Args:
        scores: ``[B, N]`` (the prefix columns are ignored).
        num_prefix: p.
        k: non-prefix tokens kept, ``0 <= k <= N - p``.

    Returns:
        ``[B, p + k]`` selection, survivors in spatial order.
    """
    body = scores[:, num_prefix:]
    top = body.topk(k, dim=1, sorted=False).indices
    return with_prefix(top.sort(dim=1).values, num_prefix)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """A selection of a selection: ``outer [B, M]`` into N tokens, ``inner [B, K]`` into those M -> ``[B, K]``."""
    return outer.gather(1, inner)


def sequential_partition(importance: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-TPrune's "sequential" partition: split tokens by importance rank.

    Args:
        importance: ``[B, M]`` scores of the candidate (non-prefix) tokens.

    Returns:
        ``(a [B, M // 2], b [B, M - M // 2])`` positions into the M tokens: A the less important half (the
        drop candidates), B the more important half (at least as large as A). Ties keep the lower position in
        the more important group (stable sort).
    """
    m = importance.shape[1]
    order = importance.sort(dim=1, descending=True, stable=True).indices
    nb = m - m // 2
    return order[:, nb:], order[:, :nb]


def max_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For every row of ``a [B, Na, C]`` its highest cosine similarity to any row of ``b [B, Nb, C]`` -> ``[B, Na]``."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ b.transpose(-1, -2)).amax(dim=-1)


def similarity_keep(keys: torch.Tensor, importance: torch.Tensor, num_prefix: int, r: int) -> torch.Tensor:
    """Zero-TPrune's S-stage: drop the ``r`` least-important-half tokens most similar to the other half.

    The non-prefix tokens are split by :func:`sequential_partition` of ``importance``; each token of A gets its
    highest cosine similarity (on ``keys``) to any token of B, and the ``r`` tokens of A with the highest such
    similarity are dropped: they are the ones whose information B already carries.

    Args:
        keys: ``[B, N, C]`` features for the similarity (Zero-TPrune: the block's attention keys).
        importance: ``[B, N]`` pre-ranking scores (the prefix columns are ignored).
        num_prefix: p.
        r: tokens dropped, ``0 <= r <= (N - p) // 2``.

    Returns:
        ``[B, N - r]`` selection, survivors in spatial order.
    """
    m = importance.shape[1] - num_prefix
    if not 0 <= r <= m // 2:
        raise ValueError(f"the similarity stage can drop at most {m // 2} of {m} tokens, asked for {r}")
    body_keys = keys[:, num_prefix:]
    a_pos, b_pos = sequential_partition(importance[:, num_prefix:])
    ka = gather_tokens(body_keys, a_pos)
    kb = gather_tokens(body_keys, b_pos)
    sim = max_cosine(ka, kb)
    # Keep the len(A) - r least redundant A tokens (static shapes, no boolean masking: torch.compile friendly).
    a_kept = a_pos.gather(1, sim.topk(a_pos.shape[1] - r, dim=1, largest=False, sorted=False).indices)
    return with_prefix(torch.cat([b_pos, a_kept], dim=1).sort(dim=1).values, num_prefix)


def importance_keep(importance: torch.Tensor, selection: torch.Tensor, num_prefix: int, r: int) -> torch.Tensor:
    """Zero-TPrune's I-stage on a previous selection: drop the ``r`` least important selected tokens.

    Args:
        importance: ``[B, M]`` scores of the selected tokens, in the selection's order (prefix first).
        selection: ``[B, M]`` indices into the step's input.
        num_prefix: p.
        r: tokens dropped, ``0 <= r <= M - p``.

    Returns:
        ``[B, M - r]`` selection into the step's input, survivors in spatial order.
    """
    inner = topk_keep(importance, num_prefix, selection.shape[1] - num_prefix - r)
    return compose(selection, inner)
