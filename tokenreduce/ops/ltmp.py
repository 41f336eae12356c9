"""LTMP (Bonnaerens & Dambre, "Learned Thresholds Token Merging and Pruning for Vision Transformers", TMLR 2023)
as pure tensor functions: the scores, the bipartite pairing, the straight-through threshold masks, one block's
merge-then-prune on real tokens (inference) and on masked tokens (training), and the FLOPs ratio of the masks.

Conventions. Tokens ``[B, N, ...]`` start with ``num_prefix`` protected tokens (CLS, dist, registers): they are
never merged, never receive a merge and never pruned, and stay first. Pairing is by position parity over all N
tokens, as upstream: src = positions 0, 2, 4, ..., dst = 1, 3, 5, .... A block's new token order is the *layout*
``[src..., dst...]`` with the prefix tokens moved to the front in their own order (with one prefix token, which is
position 0 and a src, that is upstream's ``[src, dst]`` exactly).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..core import CostModel
from .merge import gather_tokens


# ---------------------------------------------------------------------------------------------------------------
# Scores
def received_importance(attn: torch.Tensor, num_prefix: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention each token receives, averaged over heads and query rows (prefix: +inf, never pruned).

    Args:
        attn: ``[B, H, N, N]`` attention probabilities.
        num_prefix: p.
        valid: ``[B, N]`` bool real tokens, or None. Padding query rows are left out of the mean, so a padded
            sample gets what it would get alone (upstream's ``attn.mean(dim=(1, 2))`` over its own tokens).

    Returns:
        ``[B, N]``.
    """
    if valid is None:
        imp = attn.mean(dim=(1, 2))
    else:
        rows = valid[:, None, :, None].to(attn.dtype)
        imp = (attn * rows).sum(dim=(1, 2)) / (attn.shape[1] * valid.sum(dim=1, keepdim=True)).to(attn.dtype)
    return protect(imp, num_prefix, float("inf"))


def protect(values: torch.Tensor, num_prefix: int, fill: float) -> torch.Tensor:
    """``values [B, N]`` with the first ``num_prefix`` columns set to ``fill`` (out of place)."""
    if not num_prefix:
        return values
    col = torch.arange(values.shape[1], device=values.device) < num_prefix
    return values.masked_fill(col, fill)


class Pairing(NamedTuple):
    """``best [B, Ns]`` each src token's highest cosine similarity to a dst token (-inf where it may not merge);
    ``dst [B, Ns]`` int64 the dst it would join."""

    best: torch.Tensor
    dst: torch.Tensor


def bipartite_pairing(keys: torch.Tensor, num_prefix: int, valid: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None) -> Pairing:
    """Each src token's most similar dst token on L2-normalised keys.

    Args:
        keys: ``[B, N, d]`` keys averaged over heads.
        num_prefix: prefix src rows and prefix dst columns are excluded (-inf); upstream excludes position 0.
        valid: ``[B, N]`` bool: padding rows / columns excluded too (inference with per-sample counts).
        mask: ``[B, N]`` the training path's running mask: the normalised keys are multiplied by it (detached),
            so a dead token's similarities are 0, as upstream (it stays in its slot).

    Returns:
        :class:`Pairing`. The similarity keeps its gradient (the training path's merge mask routes through it).
    """
    metric = keys / keys.norm(p=2, dim=-1, keepdim=True)
    if mask is not None:
        metric = metric * mask[..., None].detach().to(metric.dtype)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)
    n = keys.shape[1]
    pos = torch.arange(n, device=keys.device)
    blocked_rows = (pos[0::2] < num_prefix)[None, :, None]
    blocked_cols = (pos[1::2] < num_prefix)[None, None, :]
    if valid is not None:
        blocked_rows = blocked_rows | ~valid[:, 0::2, None]
        blocked_cols = blocked_cols | ~valid[:, None, 1::2]
    best, dst = scores.masked_fill(blocked_rows | blocked_cols, float("-inf")).max(dim=-1)
    return Pairing(best, dst)


def threshold_mask(score: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """Upstream's ``ThresholdMasker``: forward ``1`` where ``sigmoid((score - threshold) / tau) > 0.5``, else ``0``;
    gradient that of the sigmoid (straight-through). Both values are exact (Sterbenz: ``soft + (1 - soft) == 1``)."""
    soft = torch.sigmoid((score - threshold) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return soft + (hard - soft).detach()


# ---------------------------------------------------------------------------------------------------------------
# Layout
def layout(num_tokens: int, num_prefix: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[N]`` int64: for each output slot, the index into ``cat([src, dst])`` it takes: the prefix tokens first in
    their own order, then the other src tokens, then the other dst tokens (position order within each)."""
    positions = list(range(0, num_tokens, 2)) + list(range(1, num_tokens, 2))
    order = sorted(range(num_tokens), key=lambda t: (positions[t] >= num_prefix,
                                                     positions[t] if positions[t] < num_prefix else t))
    return torch.tensor(order, dtype=torch.long, device=device)


def layout_positions(num_tokens: int, num_prefix: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[N]`` int64: for each output slot of a block that merges and prunes nothing, the position of the token it
    holds (``x[:, layout_positions(...)]`` is that block's new order)."""
    positions = torch.tensor(list(range(0, num_tokens, 2)) + list(range(1, num_tokens, 2)), dtype=torch.long,
                             device=device)
    return positions[layout(num_tokens, num_prefix, device)]


def split(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)`` = even and odd positions along dim 1."""
    return t[:, 0::2], t[:, 1::2]


def scatter_into(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, reduce: str) -> torch.Tensor:
    """``dst.scatter_reduce(1, index, src, reduce)`` with ``index [B, Ns]`` broadcast over trailing dims."""
    idx = index.reshape(index.shape + (1,) * (src.dim() - 2)).expand_as(src)
    return dst.scatter_reduce(1, idx, src, reduce=reduce)


def merge_into_dst(y: torch.Tensor, size: torch.Tensor, importance: torch.Tensor, source: Optional[torch.Tensor],
                   pairing: Pairing, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     Optional[torch.Tensor]]:
    """Add the weighted src rows into their dst rows, in the layout ``cat([src, dst])`` (N rows, none removed).

    Args:
        y: ``[B, N, C]`` size-weighted tokens ``x · size``.
        size: ``[B, N]``; importance: ``[B, N]``; source: ``[B, N, N0]`` or None.
        pairing: each src row's dst.
        weight: ``[B, Ns]`` 0/1 (detached) per src row: whether it merges.

    Returns:
        ``(y, size, importance, source)`` in ``[src, dst]`` order: dst rows ``y + sum w·y_src``, ``size + sum
        w·size_src``, ``max(importance, max_src w·importance_src)`` (an unmerged src contributes 0, a prefix src
        nothing), ``max`` of the sources; src rows unchanged.
    """
    src_y, dst_y = split(y)
    src_s, dst_s = split(size)
    src_i, dst_i = split(importance)
    w = weight.to(y.dtype)
    dst_y = scatter_into(dst_y, pairing.dst, src_y * w[..., None], "sum")
    dst_s = scatter_into(dst_s, pairing.dst, src_s * w.to(size.dtype), "sum")
    # upstream multiplies the importance by the (0/1) merge mask; inf * 0 (a protected src) is set to 0
    contrib = torch.where(torch.isinf(src_i), torch.zeros_like(src_i), src_i * w.to(src_i.dtype))
    dst_i = scatter_into(dst_i, pairing.dst, contrib, "amax")
    out_source = None
    if source is not None:
        src_src, dst_src = split(source)
        dst_src = scatter_into(dst_src, pairing.dst, src_src * w.to(source.dtype)[..., None], "amax")
        out_source = torch.cat([src_src, dst_src], dim=1)
    return (torch.cat([src_y, dst_y], dim=1), torch.cat([src_s, dst_s], dim=1),
            torch.cat([src_i, dst_i], dim=1), out_source)


# ---------------------------------------------------------------------------------------------------------------
# One block, inference: tokens really go
class Reduced(NamedTuple):
    """``x [B, M, C]``, ``size [B, M]`` (0 for padding), ``source [B, M, N0]`` or None, ``valid [B, M]`` bool or
    None (when every sample keeps M tokens)."""

    x: torch.Tensor
    size: torch.Tensor
    source: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]


def changes_anything(importance: torch.Tensor, pairing: Pairing, merge_threshold: float, prune_threshold: float,
                     valid: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`merge_prune` would merge or drop any token of the batch (a host sync): some src merges, or,
    with nothing merged (importances unchanged), some real token's importance is not above the prune threshold."""
    if bool((pairing.best > merge_threshold).any()):
        return True
    weak = importance <= prune_threshold
    return bool((weak if valid is None else weak & valid).any())


def merge_prune(x: torch.Tensor, size: torch.Tensor, importance: torch.Tensor, pairing: Pairing,
                merge_threshold: float, prune_threshold: float, num_prefix: int,
                valid: Optional[torch.Tensor] = None, source: Optional[torch.Tensor] = None) -> Reduced:
    """LTMP's inference block step: merge every src whose best similarity exceeds ``merge_threshold`` into its dst
    (size-weighted mean), then keep the tokens whose (merged) importance exceeds ``prune_threshold``.

    Args:
        x: ``[B, N, C]`` tokens after the attention residual; size: ``[B, N]``; importance: ``[B, N]`` from
            :func:`received_importance`; pairing: from :func:`bipartite_pairing`.
        merge_threshold, prune_threshold: strict ``>`` comparisons, as upstream's ``InferenceThresholdMasker``.
        num_prefix: p. valid: ``[B, N]`` bool or None. source: ``[B, N, N0]`` or None.

    Returns:
        :class:`Reduced`: survivors in layout order, packed to the front of every sample; M is the largest count
        in the batch (a host sync), the rest padding. Upstream runs one image at a time (its boolean masking
        breaks for B > 1); each sample here is what it would be alone.
    """
    b, n, c = x.shape
    merge = pairing.best > merge_threshold                                   # [B, Ns]
    y, s, imp, src = merge_into_dst(x * size[..., None].to(x.dtype), size, importance, source, pairing, merge)
    src_live = ~merge if valid is None else ~merge & valid[:, 0::2]
    dst_live = torch.ones(b, n // 2, dtype=torch.bool, device=x.device) if valid is None else valid[:, 1::2]
    alive = torch.cat([src_live, dst_live], dim=1) & (imp > prune_threshold)
    order = layout(n, num_prefix, x.device)
    y, s, alive = y[:, order], s[:, order], alive[:, order]
    src = src[:, order] if src is not None else None
    # survivors first, in layout order (a stable sort of the dead flag)
    pack = (~alive).to(torch.uint8).argsort(dim=1, stable=True)
    counts = alive.sum(dim=1)
    m = int(counts.max())
    pack = pack[:, :m]
    keep = torch.arange(m, device=x.device)[None, :] < counts[:, None]        # [B, M]
    y = gather_tokens(y, pack)
    s = s.gather(1, pack)
    safe = torch.where(keep, s, torch.ones_like(s))
    out_x = torch.where(keep[..., None], y / safe[..., None].to(y.dtype), torch.zeros_like(y))
    out_size = torch.where(keep, s, torch.zeros_like(s))
    out_source = None
    if src is not None:
        out_source = torch.where(keep[..., None], gather_tokens(src, pack),
                                 torch.zeros((), dtype=src.dtype, device=src.device))
    all_kept = bool((counts == m).all())
    return Reduced(out_x, out_size, out_source, None if all_kept else keep)


# ---------------------------------------------------------------------------------------------------------------
# One block, training: tokens are masked, never removed
class Masked(NamedTuple):
    """``x [B, N, C]``, ``size [B, N]``, ``mask [B, N]`` (forward 0/1, straight-through gradient), ``source`` or
    None, all in the new layout."""

    x: torch.Tensor
    size: torch.Tensor
    mask: torch.Tensor
    source: Optional[torch.Tensor]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Upstream's ``softmax_with_mask`` in train mode: ``a = exp(l - rowmax) · m_j`` (the key mask, no exception
    for the diagonal), ``p = (a + eps / N) / (sum_j a + eps)``. ``logits [B, H, N, N]``, ``mask [B, N]``."""
    a = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask[:, None, None, :].to(logits.dtype)
    return (a + eps / logits.shape[-1]) / (a.sum(dim=-1, keepdim=True) + eps)


def masked_merge_prune(x: torch.Tensor, size: torch.Tensor, mask: torch.Tensor, importance: torch.Tensor,
                       keys: torch.Tensor, merge_threshold: torch.Tensor, prune_threshold: torch.Tensor, tau: float,
                       num_prefix: int, source: Optional[torch.Tensor] = None) -> Masked:
    """LTMP's training block step (upstream ``LTMPBlock`` between attention and MLP), on all N positions.

    Args:
        x: ``[B, N, C]`` after the attention residual; size: ``[B, N]`` (>= 1); mask: ``[B, N]`` entering the
            block (ones at block 0); importance: ``[B, N]`` from the block's masked softmax; keys: ``[B, N, d]``.
        merge_threshold, prune_threshold: 0-d learnable tensors; tau: the masks' temperature.
        num_prefix: p. source: ``[B, N, N0]`` or None.

    Returns:
        :class:`Masked`. The merge mask ``M = threshold_mask(best, merge_threshold)`` kills merged src rows
        (``1 - M``, dead rows stay dead); merged sums use ``M`` detached, so sizes and merged values carry no
        threshold gradient; the prune mask ``P = threshold_mask(importance, prune_threshold)`` replaces every row
        whose mask is nonzero. Gradients reach the thresholds through the masks only.
    """
    pairing = bipartite_pairing(keys, num_prefix, mask=mask)
    merge = threshold_mask(pairing.best, merge_threshold, tau)                # [B, Ns]
    src_m, dst_m = split(mask)
    unmerged = torch.where(src_m.bool(), 1 - merge, src_m)
    y, s, imp, src = merge_into_dst(x * size[..., None].to(x.dtype), size, importance, source, pairing,
                                    merge.detach())
    m = torch.cat([unmerged, dst_m], dim=1)
    order = layout(x.shape[1], num_prefix, x.device)
    y, s, m, imp = y[:, order], s[:, order], m[:, order], imp[:, order]
    src = src[:, order] if src is not None else None
    prune = threshold_mask(imp, prune_threshold, tau)
    m = torch.where(m.bool(), prune, m)
    return Masked(y / s[..., None].to(y.dtype), s, m, src)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs ratio
def flops_ratio(kept: Sequence[torch.Tensor], cost: CostModel, num_tokens: int) -> torch.Tensor:
    """LTMP's differentiable FLOPs ratio: the mean over blocks of each block's cost relative to the unreduced block.

    Args:
        kept: per block l, the fraction of the ``num_tokens`` positions alive after its reduction (``mean`` of its
            mask, a 0-d tensor with gradient); the fraction entering block 0 is 1.
        cost: the adapter's MAC model; block l's cost is ``a_l·N_l + q_l·N_l² + m_l·M_l`` with ``N_l`` the tokens
            entering its attention (``kept[l-1]·n``) and ``M_l`` its MLP (``kept[l]·n``: the reduction sits between
            them). The constant (embedding, head) is left out, as upstream.
        num_tokens: n, the positions of the masked path (prefix included).

    Returns:
        ``(1/L) sum_l cost_l / cost_l(n, n)``. For a standard ViT block (``a = 4d²``, ``q = 2d``, ``m = 8d²``) this is
        upstream's closed form ``[2(μ_l n)d² + (μ_l n)²d + 4(μ_{l+1} n)d²] / (6nd² + n²d)`` term by term.
    """
    n = float(num_tokens)
    layers = cost.num_layers
    if len(kept) != layers:
        raise ValueError(f"need one kept fraction per block ({layers}), got {len(kept)}")
    total = 0
    before: torch.Tensor | float = 1.0
    for l in range(layers):
        a, q, m = cost.attn_linear[l], cost.attn_quadratic[l], cost.mlp[l]
        tokens_in, tokens_mlp = before * n, kept[l] * n
        total = total + (a * tokens_in + q * tokens_in ** 2 + m * tokens_mlp) / (a * n + q * n * n + m * n) / layers
        before = kept[l]
    return total


def kept_fractions(masks: List[torch.Tensor]) -> List[torch.Tensor]:
    """Mean of each block's mask over the batch and all positions (upstream ``torch.mean(m)``)."""
    return [m.mean() for m in masks]
