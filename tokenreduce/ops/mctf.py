"""Multi-criteria token fusion (MCTF, Lee et al., CVPR 2024) as pure tensor functions.

Tokens are split by position parity into A (even positions) and B (odd positions); prefix tokens (CLS, dist,
registers) belong to neither. Every A-B pair gets a score that multiplies three criteria:

- similarity: ``((cos(a, b) + 1) / 2) ** (1 / tau_sim)`` on the tokens themselves (full width, not keys);
- informativeness: ``(u_a u_b) ** (1 / tau_info)`` with ``u = (1 / m) / max(1 / m)`` and ``m`` the attention a
  token receives, averaged over heads and query rows (little-attended tokens are merged first);
- size: ``(z_a z_b) ** (1 / tau_size)`` with ``z = (1 / s) / max(1 / s)`` (small tokens are merged first).

Matching is *bidirectional*: A tokens merge into B (``r // 2`` of them), then B tokens, including those that just
received a merge, merge into the kept A tokens (``r - r // 2``), with the same score matrix. A merge is returned as
an assignment ``assign [B, N]`` of every token to an output slot (``tokenreduce.ops.merge``), so every group is
pooled in one reduction over all its members.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .merge import gather_tokens, merge_weighted, sum_rows


def mctf_r(r: float, num_tokens: int, num_prefix: int) -> int:
    """Tokens MCTF removes from ``num_tokens`` tokens (prefix included), in upstream's order of clamps.

    ``r`` is a count, or a fraction ``0 < r < 1`` of the non-prefix tokens. First ``r = T - 10`` when
    ``T - r < 10`` (checked before a fraction is converted, as upstream does), then the fraction becomes
    ``int((T - p) * r)``, then at most half of the non-prefix tokens. Never negative (upstream crashes on models
    with fewer than 10 tokens; here nothing is merged there).
    """
    t, p = int(num_tokens), int(num_prefix)
    if t - r < 10:
        r = t - 10
    n = t - p
    count = int(n * r) if r < 1 else int(r)
    return max(0, min(count, n // 2))


def split_positions(num_tokens: int, num_prefix: int, device: Optional[torch.device] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a_pos, b_pos)``: the even and the odd positions at or after ``num_prefix`` (A and B sets)."""
    a_start = num_prefix + (num_prefix % 2)
    b_start = num_prefix + 1 - (num_prefix % 2)
    return (torch.arange(a_start, num_tokens, 2, device=device),
            torch.arange(b_start, num_tokens, 2, device=device))


def normalised_inverse(v: torch.Tensor) -> torch.Tensor:
    """``(1 / v) / max(1 / v)`` over the tokens: ``v [B, N] -> [B, N]`` in (0, 1]."""
    inv = 1 / v
    return inv / inv.amax(dim=1, keepdim=True)


def criteria_scores(metric: torch.Tensor, received: Optional[torch.Tensor], size: Optional[torch.Tensor],
                    a_pos: torch.Tensor, b_pos: torch.Tensor, tau_sim: float, tau_info: float,
                    tau_size: float) -> torch.Tensor:
    """MCTF's pair scores ``W_sim · W_info · W_size`` between A and B.

    Args:
        metric: ``[B, N, C]`` the tokens (L2-normalised here).
        received: ``[B, N]`` attention each token receives (mean over heads and query rows), or None.
        size: ``[B, N]`` token sizes, or None (before any merge: every size is 1).
        a_pos, b_pos: ``[Na]``, ``[Nb]`` positions of the A and B tokens.
        tau_sim, tau_info, tau_size: temperatures; 0 drops a criterion.

    Returns:
        ``[B, Na, Nb]``. The normalisations of informativeness and size take the maximum over all ``N`` tokens,
        prefix tokens included, as upstream does.
    """
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a, b = unit[:, a_pos], unit[:, b_pos]
    if tau_sim:
        scores = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    else:
        scores = metric.new_ones(metric.shape[0], a_pos.numel(), b_pos.numel())
    if tau_info and received is not None:
        u = normalised_inverse(received)
        scores = scores * (u[:, a_pos, None] * u[:, None, b_pos]) ** (1 / tau_info)
    if tau_size and size is not None:
        z = normalised_inverse(size.to(metric.dtype))
        scores = scores * (z[:, a_pos, None] * z[:, None, b_pos]) ** (1 / tau_size)
    return scores


def bidirectional_assign(scores: torch.Tensor, r: int, a_pos: torch.Tensor, b_pos: torch.Tensor,
                         num_tokens: int, num_prefix: int, bidirectional: bool = True) -> Tuple[torch.Tensor, int]:
    """MCTF's matching as an assignment.

    Args:
        scores: ``[B, Na, Nb]`` pair scores (:func:`criteria_scores`).
        r: tokens to remove, ``0 < r <= min(Na, Nb)``.
        a_pos, b_pos: positions of the A and B tokens among the ``num_tokens`` tokens.
        num_prefix: the prefix tokens (positions ``0..p-1``), kept in their own slots.
        bidirectional: A→B with ``r // 2`` merges, then B→A with ``r - r // 2`` merges; else A→B with ``r``.

    Returns:
        ``(assign [B, N], N - r)``. Stage 1: each A token's best B; the ``r1`` A tokens with the highest best score
        merge into it. Stage 2: each B token's best kept A, from the same (stale) scores; the ``r2`` B tokens with
        the highest best score merge, carrying what they received. Output order as upstream: prefix tokens, kept
        A tokens (by position when there are prefix tokens, else by descending stage-1 score, upstream's
        unsorted branch), then kept B tokens (by descending stage-2 score; unidirectional: every B by position).
    """
    bsz, na, nb = scores.shape
    device = scores.device
    p = num_prefix
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    src_a, kept_a = order[:, :r1], order[:, r1:]
    if p:
        kept_a = kept_a.sort(dim=-1).values
    n_kept_a = na - r1
    slot_b = torch.empty(bsz, nb, dtype=torch.long, device=device)
    if bidirectional:
        stage2 = gather_tokens(scores, kept_a).transpose(1, 2)  # [B, Nb, Na - r1]
        max2, idx2 = stage2.max(dim=-1)
        order2 = max2.argsort(dim=-1, descending=True, stable=True)
        src_b, kept_b = order2[:, :r2], order2[:, r2:]
        slot_b.scatter_(1, kept_b, (p + n_kept_a + torch.arange(nb - r2, device=device)).expand(bsz, -1))
        slot_b.scatter_(1, src_b, p + idx2.gather(1, src_b))
    else:
        slot_b.copy_((p + n_kept_a + torch.arange(nb, device=device)).expand(bsz, -1))
    slot_a = torch.empty(bsz, na, dtype=torch.long, device=device)
    slot_a.scatter_(1, kept_a, (p + torch.arange(n_kept_a, device=device)).expand(bsz, -1))
    slot_a.scatter_(1, src_a, slot_b.gather(1, node_idx.gather(1, src_a)))
    assign = torch.empty(bsz, num_tokens, dtype=torch.long, device=device)
    assign[:, :p] = torch.arange(p, device=device)
    assign[:, a_pos] = slot_a
    assign[:, b_pos] = slot_b
    return assign, num_tokens - r


def pool_weighted(x: torch.Tensor, weight: torch.Tensor, assign: torch.Tensor, num_out: int) -> torch.Tensor:
    """``x [B, N, C] -> [B, M, C]``: per output slot, ``sum w·x / sum w`` over its members (``weight [B, N]``)."""
    return merge_weighted(x, weight.to(x.dtype), assign, num_out)[0]


def pool_max(x: torch.Tensor, assign: torch.Tensor, num_out: int) -> torch.Tensor:
    """``x [B, N, C] -> [B, M, C]``: element-wise maximum over each slot's members."""
    b, _, c = x.shape
    out = x.new_zeros(b, num_out, c)
    return out.scatter_reduce_(1, assign[..., None].expand(-1, -1, c), x, reduce="amax", include_self=False)


def merge_attention(attn: torch.Tensor, assign: torch.Tensor, num_out: int,
                    weight: Optional[torch.Tensor]) -> torch.Tensor:
    """One-step-ahead attention: the attention map of the merged tokens, without recomputing it.

    Args:
        attn: ``[B, H, N, N]`` probabilities (queries × keys) of the tokens before the merge.
        assign: ``[B, N]`` output slot of every token.
        weight: ``[B, N]`` pooling weights of the query rows, or None for an element-wise maximum.

    Returns:
        ``[B, H, M, M]``: the key columns of each group summed, then its query rows pooled like the tokens
        (weighted mean, or maximum).
    """
    b, h, n, _ = attn.shape
    cols = attn.new_zeros(b, h, n, num_out).scatter_add_(3, assign[:, None, None, :].expand(b, h, n, n), attn)
    rows = assign[:, None, :, None].expand(b, h, n, num_out)
    if weight is None:
        out = cols.new_zeros(b, h, num_out, num_out)
        return out.scatter_reduce_(2, rows, cols, reduce="amax", include_self=False)
    w = weight.to(attn.dtype)
    summed = cols.new_zeros(b, h, num_out, num_out).scatter_add_(2, rows, cols * w[:, None, :, None])
    total = w.new_zeros(b, num_out).scatter_add_(1, assign, w)
    return summed / total[:, None, :, None]


def merged_attention_output(attn: torch.Tensor, assign: torch.Tensor, weight: torch.Tensor,
                            v: torch.Tensor) -> torch.Tensor:
    """``merge_attention(attn, assign, M, weight) @ v`` without building the merged map.

    Args:
        attn: ``[B, H, N, N]`` probabilities of the tokens before the merge.
        assign: ``[B, N]`` output slot of every token.
        weight: ``[B, N]`` pooling weights of the query rows.
        v: ``[B, H, M, d]`` values of the merged tokens.

    Returns:
        ``[B, H, M, d]``. Summing a group's key columns and then multiplying by ``v`` is multiplying the unmerged map
        by each key's slot value, ``attn @ v[assign]``; pooling the query rows is then a weighted mean of ``[N, d]``
        rows. ``O(N²·d)`` and no ``[B, H, N, N]`` scatter, against ``O(N²)`` index traffic twice for the map. The
        gather and the pooling move whole ``d``-rows of the ``B·H`` maps (``gather_tokens``, ``sum_rows``).
    """
    b, h, n, _ = attn.shape
    m, d = v.shape[2], v.shape[3]
    per_map = assign[:, None].expand(b, h, n).reshape(b * h, n)  # the slots, once per head
    per_key = gather_tokens(v.reshape(b * h, m, d), per_map)  # [B·H, N, d]: each key's slot value
    out = attn.to(v.dtype).reshape(b * h, n, n) @ per_key  # [B·H, N, d]: the merged keys, query rows still apart
    w = weight.to(v.dtype)
    out = out.view(b, h, n, d).mul_(w[:, None, :, None])
    total = w.new_zeros(b, m).scatter_add_(1, assign, w)
    return sum_rows(out.view(b * h, n, d), per_map, m).view(b, h, m, d).div_(total[:, None, :, None])
