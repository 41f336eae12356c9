"""Attention masks as pure functions: causal + padding (+ sliding window) masks over a key layout of one's own,
for layers whose KV cache holds a different set of tokens than the model's 2-D attention mask describes."""
from __future__ import annotations

from typing import Optional

import torch


def causal_padding_mask(key_valid: torch.Tensor, query_len: int, dtype: torch.dtype,
                        window: Optional[int] = None) -> torch.Tensor:
    """Additive mask ``[B, 1, Q, L]`` for the last ``Q`` of ``L`` keys acting as queries.

    Query i sits at key index ``L - Q + i`` and may attend key j when ``j <= L - Q + i``, ``key_valid[b, j]`` and,
    with a sliding ``window``, ``j > L - Q + i - window``. Allowed entries are 0, the rest ``finfo(dtype).min``
    (not ``-inf``: no NaN). A padding query (its own key invalid) attends only itself, so its (unused) output
    stays finite.

    Args:
        key_valid: ``[B, L]`` bool, the real tokens among the keys (cached ones first, then this chunk's).
        query_len: Q, the tokens of this chunk (the last Q keys).
        dtype: of the attention logits.
        window: sliding-window size, or None.
    """
    b, length = key_valid.shape
    device = key_valid.device
    q_index = torch.arange(length - query_len, length, device=device)[:, None]  # [Q, 1]
    k_index = torch.arange(length, device=device)[None, :]                      # [1, L]
    allowed = (k_index <= q_index)[None] & key_valid[:, None, :]                # [B, Q, L]
    if window is not None:
        allowed &= (k_index > q_index - window)[None]
    own = (k_index == q_index)[None] & ~key_valid[:, length - query_len:, None]  # padding queries: themselves
    allowed |= own
    mask = torch.zeros(b, query_len, length, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def positions_from_valid(valid: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, S]`` position of each token among the real ones (0, 1, ...; padding gets the next real token's
    clamped value), plus ``offset [B]`` (real tokens before, e.g. in a cache)."""
    pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return pos if offset is None else pos + offset[:, None]
