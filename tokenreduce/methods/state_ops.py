"""Applying a method's decision to a :class:`~tokenreduce.core.TokenState`: a merge (an assignment of tokens to
output slots) or a selection (the indices of the kept tokens). The tensor work is in ``tokenreduce.ops``."""
from __future__ import annotations

import torch

from ..core import TokenState
from ..ops.merge import gather_tokens, merge_source, merge_weighted


def merge_state(state: TokenState, assign: torch.Tensor, num_out: int) -> TokenState:
    """Merge by ``assign [B, N]`` (output slot of every token): size-weighted mean of x, summed size, union of
    sources."""
    x, size = merge_weighted(state.x, state.size, assign, num_out)
    source = merge_source(state.source, assign, num_out) if state.source is not None else None
    return state.replace(x=x, size=size, source=source)


def select_state(state: TokenState, index: torch.Tensor) -> TokenState:
    """Keep the tokens ``index [B, M]`` (x, size, source, valid gathered) and record them as ``kept``."""
    gather = lambda t: gather_tokens(t, index) if t is not None else None  # noqa: E731
    return state.replace(x=gather_tokens(state.x, index), size=gather_tokens(state.size, index),
                         source=gather(state.source), valid=gather(state.valid), image_mask=gather(state.image_mask),
                         kept=index)
