"""Pure tensor functions the tower-output selection methods share (FasterVLM, VisPruner, random and pooling at a VLM's
vision tower): a patch-importance score with or without a CLS token, and a top-k kept in spatial order."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def cls_patch_scores(cls_attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The CLS token's attention to the patches: ``cls_attn [B, N]`` (row of token 0, all N columns, prefix first) ->
    ``[B, N - num_prefix]``. The prefix columns are dropped and the rest is **not** renormalised (FasterVLM's and
    VisPruner's score)."""
    return cls_attn[:, num_prefix:]


def received_attention(attn_rows: Callable[[torch.Tensor], torch.Tensor], batch: int, num_tokens: int,
                       device: torch.device, chunk: int = 64) -> torch.Tensor:
    """Mean attention each token receives: the post-softmax probabilities averaged over every query row and every head,
    ``[B, N]`` (VisPruner's score on a tower without a CLS token, e.g. SigLIP).

    Args:
        attn_rows: ``rows [B, Q] -> probabilities [B, H, Q, N]`` of the layer (``Need.ATTN_ROWS``).
        batch, num_tokens: B and N.
        chunk: query rows per call, so at most ``B·H·chunk·N`` probabilities exist at once (the full matrix never does).
    """
    total: Optional[torch.Tensor] = None
    for start in range(0, num_tokens, chunk):
        rows = torch.arange(start, min(start + chunk, num_tokens), device=device).expand(batch, -1)
        part = attn_rows(rows).sum(dim=2).mean(dim=1)  # [B, N]: summed over the chunk's queries, mean over heads
        total = part if total is None else total + part
    return total / num_tokens


def topk_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` indices of the ``k`` highest ``scores [B, P]`` per row, in **ascending index order** (the kept tokens
    enter the language model in spatial order; the order inside the top-k does not matter). Equal scores go to the
    lower index (a stable sort), so the choice is deterministic where ``torch.topk``'s is not specified."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values
