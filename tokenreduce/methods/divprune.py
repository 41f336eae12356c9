"""DivPrune (Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025): keep the ``keep`` visual tokens of each image that form a greedy max–min diverse subset of its
projected features (1 − cosine distance), in spatial order.

Reproduces vbdi/divprune at 799e2d9 (see ``../shared/fixtures/divprune``): the distances come from the features
**after** the projector (the rows that would enter the language model), step 0 takes the token with the farthest
nearest neighbour, and the kept tokens enter the language model in ascending patch order. Upstream's hard-coded image
offset (35 prompt tokens) and batch-row-0 selection are fixed: the image comes from the prompt, and every image is
selected on its own. See ``docs/methods/divprune.md``.
"""
from __future__ import annotations

from typing import Any, Optional

from ..core import Geometry, Need, ReductionMethod, Site, TokenState, register_method
from ..ops.divprune import cosine_distance, max_min_select
from .tower_select import Budget, keep_params, select_patches


@register_method
class DivPrune(ReductionMethod):
    name = "divprune"
    site = Site.TOWER_OUT
    needs = frozenset({Need.PROJECTED})
    summary = "DivPrune: greedy max-min diverse subset of each image's projected visual tokens (1 - cosine)"
    params = keep_params(ratio_aliases=("subset_ratio",))

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.budget = Budget(self.name, params.get("keep"), params.get("keep_ratio"))
        self.budget.check(geometry)

    def num_output(self, num_tokens: int) -> Optional[int]:
        """``keep`` visual tokens per image (the prefix is dropped)."""
        return self.budget.count(num_tokens - self.geometry.num_prefix)

    def reduce(self, state: TokenState) -> TokenState:
        """``x [B, p + P, C]`` -> ``[B, keep, C]``: the max–min subset of the projected patches, ascending order."""
        if state.projected is None:
            raise ValueError("divprune: the tower site gave no projected features (Need.PROJECTED)")
        k = self.budget.count(state.num_tokens - state.num_prefix)
        return select_patches(state, max_min_select(cosine_distance(state.projected), k))
