"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023) as pure tensor functions.

Tokens are split by position parity into A (even) and B (odd). Every A token proposes its most similar B
token; the r proposals with the highest similarity are merged. Prefix tokens (CLS, dist, registers) are
protected: an A prefix token is never a source, a B prefix token never a destination, and all prefix tokens
leave first, in their original order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..kernels import dispatch

NEG_INF = float("-inf")


def best_match(
    a: torch.Tensor, b: torch.Tensor, protect_rows: int = 0, protect_cols: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every row of A its best partner in B by cosine similarity.

    Args:
        a: ``[B, Na, d]`` unit-norm rows.
        b: ``[B, Nb, d]`` unit-norm rows.
        protect_rows: the first rows of A never match (their score is -inf).
        protect_cols: the first rows of B are never chosen.

    Returns:
        ``(score [B, Na], index [B, Na])``: the best similarity and the B index achieving it.

    This is the reference of the fused Triton matching kernel, which never writes the ``Na x Nb`` matrix; the kernel
    runs instead on CUDA tensors (see ``tokenreduce.kernels.dispatch``). Ties go to the lowest B index on both paths.
    """
    if dispatch.use_kernel(a, b):
        return dispatch.kernels("matching").best_match(a, b, protect_rows, protect_cols)
    scores = a @ b.transpose(-1, -2)
    if protect_rows:
        scores[:, :protect_rows, :] = NEG_INF
    if protect_cols:
        scores[:, :, :protect_cols] = NEG_INF
    return scores.max(dim=-1)


class BipartiteMatch(NamedTuple):
    """The result of one bipartite matching over ``N`` tokens.

    Attributes:
        assign: ``[B, N]`` output slot of every input token (see ``ops.merge``).
        num_out: ``N - r`` output tokens.
        r: tokens removed.
    """

    assign: torch.Tensor
    num_out: int
    r: int


def clamp_r(r: int, num_tokens: int, num_prefix: int) -> int:
    """ToMe's clamp: at most half of the unprotected tokens can be merged in one step."""
    return max(0, min(r, (num_tokens - num_prefix) // 2))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 0) -> Optional[BipartiteMatch]:
    """ToMe's bipartite soft matching.

    Args:
        metric: ``[B, N, d]`` similarity features (ToMe: keys averaged over heads).
        r: tokens to remove; clamped to ``(N - num_prefix) // 2``.
        num_prefix: protected leading tokens.

    Returns:
        None when nothing is merged, else the match. Output order, as upstream: prefix tokens, then the
        unmerged A tokens (in position order when there are prefix tokens, else in descending order of their
        best similarity), then the B tokens in position order.
    """
    n = metric.shape[1]
    r = clamp_r(r, n, num_prefix)
    if r <= 0:
        return None
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        a, b = unit[:, ::2], unit[:, 1::2]
        prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
        node_max, node_idx = best_match(a, b, prefix_a, prefix_b)
        order = node_max.argsort(dim=-1, descending=True)
        unmerged, merged = order[:, r:], order[:, :r]
        if num_prefix:
            unmerged = unmerged.sort(dim=-1).values
        assign = _bipartite_assign(unmerged, merged, node_idx.gather(1, merged), n, num_prefix)
    return BipartiteMatch(assign, n - r, r)


def _bipartite_assign(
    unmerged: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor, n: int, num_prefix: int
) -> torch.Tensor:
    """Output slots for ``[prefix, unmerged A (given order), B]``; merged A tokens join their B slot.

    Args:
        unmerged: ``[B, Na - r]`` A indices, prefix A tokens first when ``num_prefix > 0``.
        merged: ``[B, r]`` A indices that are merged.
        dst: ``[B, r]`` the B index each merged A token joins.
    """
    bsz, n_unm = unmerged.shape
    device = unmerged.device
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    nb = n // 2
    # B token j sits at position 2j+1; prefix B tokens keep their position as slot, the rest follow the A block.
    b_slots = torch.arange(nb, device=device)
    b_slots = torch.where(b_slots < prefix_b, 2 * b_slots + 1, b_slots - prefix_b + num_prefix + n_unm - prefix_a)
    a_slots = torch.arange(n_unm, device=device)
    a_slots = torch.where(a_slots < prefix_a, 2 * a_slots, a_slots - prefix_a + num_prefix)
    assign_a = torch.empty(bsz, (n + 1) // 2, dtype=torch.long, device=device)
    assign_a.scatter_(1, unmerged, a_slots.expand(bsz, -1))
    assign_a.scatter_(1, merged, b_slots[dst])
    assign = torch.empty(bsz, n, dtype=torch.long, device=device)
    assign[:, ::2] = assign_a
    assign[:, 1::2] = b_slots.expand(bsz, -1)
    return assign
