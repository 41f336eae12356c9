"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", 2024): keep the ``keep`` patches of each image that the CLS token attends to most at the vision
tower's feature layer, in spatial order, before the projector.

The score is the CLS query row of the feature layer's attention probabilities (the layer whose output LLaVA takes its
features from, −2 for LLaVA-1.5), averaged over heads, CLS column dropped and not renormalised; the kept patches enter
the language model in ascending patch order and CLS is dropped. Reproduces Theia-4869/FasterVLM at f5d5f12 (see
``../shared/fixtures/fastervlm``); on a tower without a CLS token (SigLIP) the score is the mean attention each patch
receives (VisPruner's official SigLIP rule, from the same authors), see ``docs/methods/fastervlm.md``.
"""
from __future__ import annotations

from typing import Any, FrozenSet, Optional

from ..core import Geometry, Need, ReductionMethod, Site, TokenState, register_method
from ..ops.tower_scores import topk_in_order
from .tower_select import Budget, importance_needs, keep_params, patch_importance, select_patches


@register_method
class FasterVLM(ReductionMethod):
    name = "fastervlm"
    site = Site.TOWER_OUT
    needs = frozenset({Need.CLS_ATTN, Need.ATTN_ROWS})  # CLS_ATTN with a CLS token, ATTN_ROWS without (needs_at)
    summary = "FasterVLM: keep the patches the CLS token attends to most at the vision tower's feature layer"
    params = keep_params(keep_aliases=("visual_token_num",))

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.budget = Budget(self.name, params.get("keep"), params.get("keep_ratio"))
        self.budget.check(geometry)

    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        return importance_needs(self.geometry)

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        if Need.ATTN_ROWS in missing:
            return ("This tower has no CLS token, so fastervlm ranks patches by the mean attention they receive, "
                    "which needs the feature layer's attention rows")
        return ""

    def num_output(self, num_tokens: int) -> Optional[int]:
        """``keep`` visual tokens per image (the prefix is dropped)."""
        return self.budget.count(num_tokens - self.geometry.num_prefix)

    def reduce(self, state: TokenState) -> TokenState:
        """``x [B, p + P, C]`` -> ``[B, keep, C]``: the top-``keep`` patches by importance, ascending patch order."""
        k = self.budget.count(state.num_tokens - state.num_prefix)
        return select_patches(state, topk_in_order(patch_importance(state, self.name), k))
