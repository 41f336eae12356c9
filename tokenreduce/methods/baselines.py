"""Pruning baselines with Zero-TPrune's schedule machinery: they give every comparison a floor.

- ``random``: keep uniformly random non-prefix tokens (seeded). On a vision-language model it acts at the vision
  tower's output instead: ``keep`` random visual tokens per image, in spatial order (the VLM papers' random control).
- ``topk_attn``: keep the non-prefix tokens the CLS token attends to most, averaged over heads (EViT's
  criterion, Liang et al., ICLR 2022, without EViT's fusion of the dropped tokens into one extra token).

Between blocks they act like Zero-TPrune, so at equal schedules they cost exactly the same FLOPs and only the
choice of tokens differs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import integer, is_int
from ..ops.pruning import topk_keep
from .pruning import SCHEDULE_PARAMS, PruningMethod
from .tower_select import Budget, select_patches


@register_method
class RandomPrune(PruningMethod):
    """Random pruning. Every forward draws from a generator seeded with ``seed`` (its carry), so the model is a
    deterministic function of its input and a run is reproducible; ``seed=None`` draws from torch's global
    generator instead (fresh tokens every forward, controlled by ``torch.manual_seed``). The scores are drawn on
    the CPU, so CPU and GPU runs drop the same tokens.

    On a model that offers a vision tower's output (a VLM) it acts there (``sites``): ``keep`` (or ``keep_ratio``)
    visual tokens per image, the prefix dropped, the survivors in spatial order. Each image draws from its own
    generator seeded with ``seed``, so an image keeps the same tokens alone or in any batch (every image of a call
    keeps the same random positions; vary ``seed`` to average over subsets)."""

    name = "random"
    compilable = False  # a torch.Generator per forward: reduce runs outside a compiled graph
    sites = (Site.TOWER_OUT, Site.BLOCK_OUT)
    needs = frozenset()
    summary = ("Random pruning baseline: keep uniformly random non-prefix tokens between blocks, or random visual "
               "tokens per image at a VLM's tower output (seeded)")
    params: Dict[str, Param] = {**SCHEDULE_PARAMS,
                                "seed": Param(0, "seed of each forward's draws; None: torch's global generator",
                                              integer(optional=True))}

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        if geometry.site == Site.TOWER_OUT:
            ReductionMethod.__init__(self, geometry, **params)
            self.steps = {}
            self.budget = self._tower_budget(params)
            self.budget.check(geometry)
        else:
            super().__init__(geometry, **params)
        self.seed = params.get("seed", 0)

    @staticmethod
    def _tower_budget(params: Dict[str, Any]) -> Budget:
        for name in ("layers", "target_flops"):
            if params.get(name) is not None:
                raise ValueError(f"random at a VLM's tower output keeps keep visual tokens per image once, before the "
                                 f"projector: {name} does not apply there")
        keep = params.get("keep")
        if keep is not None and not is_int(keep):
            raise ValueError(f"random at a VLM's tower output: keep is the number of visual tokens kept per image (an "
                             f"int), got {keep!r}; use keep_ratio for a fraction")
        return Budget("random", keep, params.get("keep_ratio"))

    def acts_at(self, layer: int) -> bool:
        return True if self.site == Site.TOWER_OUT else super().acts_at(layer)

    def num_output(self, num_tokens: int) -> Optional[int]:
        if self.site != Site.TOWER_OUT:
            return None
        return self.budget.count(num_tokens - self.geometry.num_prefix)

    def begin(self, training: bool) -> Any:
        return None if self.seed is None else torch.Generator().manual_seed(int(self.seed))

    def select(self, state: TokenState, k: int) -> torch.Tensor:
        b, n = state.x.shape[:2]
        scores = torch.rand(b, n, generator=state.carry).to(state.x.device)
        return topk_keep(scores, state.num_prefix, k)

    def reduce(self, state: TokenState) -> TokenState:
        if self.site != Site.TOWER_OUT:
            return super().reduce(state)
        b, p = state.batch_size, state.num_prefix
        n = state.num_tokens - p
        k = self.budget.count(n)
        if self.seed is None:
            scores = torch.rand(b, n)
        else:  # one generator per image: the draw does not depend on the batch
            scores = torch.rand(n, generator=torch.Generator().manual_seed(int(self.seed))).expand(b, n)
        return select_patches(state, scores.topk(k, dim=1).indices.to(state.x.device))


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
