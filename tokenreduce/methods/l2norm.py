"""L2-norm pruning: after each of ``layers``, keep the non-prefix tokens whose hidden state has the largest L2 norm.

A baseline and the worked example of docs/writing_a_method.md: it reads only the hidden states, so it declares no
needs and runs wherever an adapter offers a ``BLOCK_OUT`` site. The schedule parameters (``keep``, ``keep_ratio``,
``layers``, ``target_flops``) and their validation come from :class:`~tokenreduce.methods.pruning.PruningMethod`.
"""
from __future__ import annotations

import torch

from ..core import TokenState, register_method
from ..ops.pruning import topk_keep
from .pruning import SCHEDULE_PARAMS, PruningMethod


@register_method
class L2NormPrune(PruningMethod):
    name = "l2norm"
    summary = "L2-norm pruning baseline: keep the tokens with the largest hidden-state norm, between blocks"
    needs = frozenset()
    params = dict(SCHEDULE_PARAMS)

    def select(self, state: TokenState, k: int) -> torch.Tensor:
        """``[B, p + k]``: the prefix, then the ``k`` largest-norm tokens in spatial order."""
        return topk_keep(state.x.norm(dim=-1), state.num_prefix, k)
