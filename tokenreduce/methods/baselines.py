"""Pruning baselines with Zero-TPrune's schedule machinery: they give every comparison a floor.

- ``random``: keep uniformly random non-prefix tokens (seeded).
- ``topk_attn``: keep the non-prefix tokens the CLS token attends to most, averaged over heads (EViT's
  criterion, Liang et al., ICLR 2022, without EViT's fusion of the dropped tokens into one extra token).

Both act between blocks, like Zero-TPrune, so at equal schedules they cost exactly the same FLOPs and only the
choice of tokens differs.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..core import Geometry, Need, Param, TokenState, register_method
from ..core.params import integer
from ..ops.pruning import topk_keep
from .pruning import SCHEDULE_PARAMS, PruningMethod


@register_method
class RandomPrune(PruningMethod):
    """Random pruning. Every forward draws from a generator seeded with ``seed`` (its carry), so the model is a
    deterministic function of its input and a run is reproducible; ``seed=None`` draws from torch's global
    generator instead (fresh tokens every forward, controlled by ``torch.manual_seed``). The scores are drawn on
    the CPU, so CPU and GPU runs drop the same tokens."""

    name = "random"
    needs = frozenset()
    summary = "Random pruning baseline: keep uniformly random non-prefix tokens between blocks (seeded)"
    params: Dict[str, Param] = {**SCHEDULE_PARAMS,
                                "seed": Param(0, "seed of each forward's draws; None: torch's global generator",
                                              integer(optional=True))}

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.seed = params.get("seed", 0)

    def begin(self, training: bool) -> Any:
        return None if self.seed is None else torch.Generator().manual_seed(int(self.seed))

    def select(self, state: TokenState, k: int) -> torch.Tensor:
        b, n = state.x.shape[:2]
        scores = torch.rand(b, n, generator=state.carry).to(state.x.device)
        return topk_keep(scores, state.num_prefix, k)


@register_method
class TopKAttn(PruningMethod):
    """Keep the tokens with the highest head-averaged CLS attention of the block (EViT-style, no fusion)."""

    name = "topk_attn"
    needs = frozenset({Need.CLS_ATTN})
    summary = "CLS-attention top-k pruning baseline (EViT's criterion without fusion), between blocks"
    params: Dict[str, Param] = dict(SCHEDULE_PARAMS)

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        if not geometry.has_class_token:
            raise ValueError("topk_attn ranks tokens by the CLS token's attention, and this model has no class "
                             "token; use zero_tprune or random")
        super().__init__(geometry, **params)

    def select(self, state: TokenState, k: int) -> torch.Tensor:
        return topk_keep(state.cls_attn, state.num_prefix, k)
