"""Turning per-sample decisions of an in-LLM method (FastV, PyramidDrop, SparseVLM) into the state the decoder site
continues with: each sample's list of kept token indices (and, for a method that creates tokens, the new tokens),
packed into one batch with left padding where samples keep different numbers of tokens."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from ..core import TokenState
from ..ops.merge import gather_tokens
from ..ops.llm_tokens import pack_left


def assemble_state(state: TokenState, rows: Sequence[torch.Tensor],
                   made: Optional[Sequence[torch.Tensor]] = None, **changes: Any) -> TokenState:
    """The state holding, per sample, the tokens ``rows[b]`` in that order.

    Args:
        state: the site's state (``x [B, S, C]``, ``valid``, ``image_mask``).
        rows: per sample, a 1-D index into the S tokens; ``-1`` marks a token the method made.
        made: per sample, ``[n_b, C]`` the made tokens in the order of the ``-1`` entries of ``rows[b]`` (None when
            no sample makes any). Made tokens are real visual tokens.
        changes: other fields of the new state (e.g. ``carry``).

    Returns:
        ``state.replace`` with ``x``, ``size`` (ones), ``valid``, ``image_mask`` and ``kept [B, S']`` (-1 for made
        tokens). Samples shorter than the longest are padded on the left with invalid copies of token 0.
    """
    index, pad = pack_left(list(rows), fill=0)
    made_slot = index < 0
    safe = index.clamp(min=0)
    x = gather_tokens(state.x, safe)
    if made is not None and bool(made_slot.any()):
        x = x.clone()
        for b, tokens in enumerate(made):
            slots = made_slot[b].nonzero()[:, 0]
            if slots.numel() != tokens.shape[0]:
                raise RuntimeError(f"sample {b}: {slots.numel()} made slots but {tokens.shape[0]} made tokens")
            x[b, slots] = tokens.to(x.dtype)
    valid = state.valid if state.valid is not None else torch.ones_like(state.image_mask)
    real = (gather_tokens(valid, safe) | made_slot) & ~pad
    image = (gather_tokens(state.image_mask, safe) | made_slot) & ~pad
    return state.replace(x=x, size=real.to(state.size.dtype), valid=real, image_mask=image, kept=index, **changes)


def keep_rows(keep: torch.Tensor) -> List[torch.Tensor]:
    """``[B, S]`` bool -> per sample the ascending indices of its True entries."""
    return [row.nonzero()[:, 0] for row in keep]
