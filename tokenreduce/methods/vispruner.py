"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs",
ICCV 2025): at the vision tower's feature layer, keep ``important`` patches by CLS attention plus ``keep - important``
diverse patches chosen from the rest by iteratively removing the ones most similar to others, before the projector.

Reproduces Theia-4869/VisPruner at aefa01a (see ``../shared/fixtures/vispruner``): importance = the CLS query row of
the feature layer's attention probabilities, averaged over heads (CLS column dropped, not renormalised); the residual
stays in descending-importance order and is shrunk by :func:`~tokenreduce.ops.vispruner.remove_duplicates` on the
pre-projector features; the kept patches enter the language model in ascending patch order, CLS dropped. On a tower
without a CLS token (SigLIP) the importance is the mean attention each patch receives, as in the official code's SigLIP
tower. Fixed upstream bugs (odd ``important``, batch > 1 on the tensor path, ``forward``) are listed in
``docs/methods/vispruner.md``.
"""
from __future__ import annotations

from typing import Any, FrozenSet, Optional

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import integer, real
from ..ops.vispruner import vispruner_select
from .tower_select import Budget, importance_needs, keep_params, patch_importance, select_patches

#: Upstream's default ``important_ratio`` (the eval scripts' argparse default).
DEFAULT_IMPORTANT_RATIO = 0.5


def important_count(keep: int, important: Optional[int], important_ratio: Optional[float]) -> int:
    """Important tokens among ``keep``: ``important`` if given, else upstream's ``int(keep * important_ratio)``
    (truncation, float artefacts included: ``int(100 * 0.29) == 28``), ratio 0.5 when neither is given."""
    if important is not None:
        if important > keep:
            raise ValueError(f"vispruner: important={important} exceeds keep={keep}")
        return int(important)
    ratio = DEFAULT_IMPORTANT_RATIO if important_ratio is None else float(important_ratio)
    return int(keep * ratio)


@register_method
class VisPruner(ReductionMethod):
    name = "vispruner"
    site = Site.TOWER_OUT
    needs = frozenset({Need.CLS_ATTN, Need.ATTN_ROWS})  # CLS_ATTN with a CLS token, ATTN_ROWS without (needs_at)
    summary = ("VisPruner: important patches by CLS attention plus diverse patches by iterative duplicate removal, "
               "at the vision tower's feature layer")
    params = {
        **keep_params(keep_aliases=("visual_token_num",)),
        "important": Param(None, "important tokens (by CLS attention) among keep; None: int(keep * important_ratio)",
                           integer(0, optional=True), aliases=("important_token_num",)),
        "important_ratio": Param(None, "share of keep that is important, truncated with int() as upstream; None: 0.5 "
                                       "unless important is given (paper: 0.5; 0.75 on MME)",
                                 real(0.0, 1.0, optional=True)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.budget = Budget(self.name, params.get("keep"), params.get("keep_ratio"))
        self.important = params.get("important")
        self.important_ratio = params.get("important_ratio")
        if self.important is not None and self.important_ratio is not None:
            raise ValueError("vispruner: give important or important_ratio, not both")
        if geometry.num_patches is not None:
            important_count(self.budget.count(int(geometry.num_patches)), self.important, self.important_ratio)

    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        return importance_needs(self.geometry)

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        if Need.ATTN_ROWS in missing:
            return ("This tower has no CLS token, so vispruner ranks patches by the mean attention they receive, "
                    "which needs the feature layer's attention rows")
        return ""

    def num_output(self, num_tokens: int) -> Optional[int]:
        """``keep`` visual tokens per image (the prefix is dropped)."""
        return self.budget.count(num_tokens - self.geometry.num_prefix)

    def reduce(self, state: TokenState) -> TokenState:
        """``x [B, p + P, C]`` -> ``[B, keep, C]``: important and diverse patches, ascending patch order."""
        p = state.num_prefix
        keep = self.budget.count(state.num_tokens - p)
        m = important_count(keep, self.important, self.important_ratio)
        sel = vispruner_select(patch_importance(state, self.name), state.x[:, p:], m, keep - m)
        return select_patches(state, torch.cat([sel.important, sel.diverse], dim=1))
