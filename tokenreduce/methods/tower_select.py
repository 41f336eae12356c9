"""What the methods that choose an image's visual tokens at a VLM's tower output share (FasterVLM, VisPruner, DivPrune,
CDPruner, pooling, random): the budget parameters (``keep`` visual tokens per image or ``keep_ratio``), the
patch-importance score with or without a CLS token, and the state a selection of patches leaves.

Every one of them returns **patch tokens only**: the prefix (CLS) is dropped, as LLaVA's ``"default"`` feature strategy
drops it, and the tokens it returns go through the projector to become the image's visual tokens.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Optional, Tuple

import torch

from ..core import Geometry, Need, Param, TokenState
from ..core.params import fraction, integer
from ..ops.tower_scores import cls_patch_scores, received_attention
from .state_ops import select_state

#: Visual tokens per image when neither ``keep`` nor ``keep_ratio`` is given (the papers' smallest LLaVA-1.5 budget).
DEFAULT_KEEP = 64


def keep_params(keep_aliases: Tuple[str, ...] = (), ratio_aliases: Tuple[str, ...] = ()) -> Dict[str, Param]:
    """The budget parameters, with the method's official names as aliases."""
    return {
        "keep": Param(None, f"visual tokens kept per image (None: {DEFAULT_KEEP} unless keep_ratio is given); "
                            "papers: 64, 128, 192 on LLaVA-1.5", integer(1, optional=True), aliases=keep_aliases),
        "keep_ratio": Param(None, "fraction of each image's patch tokens kept: round(keep_ratio * patches), Python's "
                                  "round (half to even)", fraction(optional=True), aliases=ratio_aliases),
    }


class Budget:
    """Visual tokens kept per image: a count, or a fraction of the image's patches (``round``, at least 1)."""

    def __init__(self, name: str, keep: Optional[int], keep_ratio: Optional[float]) -> None:
        if keep is not None and keep_ratio is not None:
            raise ValueError(f"{name}: give keep or keep_ratio, not both")
        self.name = name
        self.keep = int(keep) if keep is not None else (None if keep_ratio is not None else DEFAULT_KEEP)
        self.ratio = None if keep_ratio is None else float(keep_ratio)

    def count(self, num_patches: int) -> int:
        """Tokens kept from an image of ``num_patches`` patch tokens; ValueError when ``keep`` exceeds them."""
        if self.keep is None:
            return max(1, min(num_patches, int(round(self.ratio * num_patches))))
        if self.keep > num_patches:
            raise ValueError(f"{self.name}: keep={self.keep} exceeds the {num_patches} patch tokens of an image; use "
                             f"keep <= {num_patches} (or keep_ratio)")
        return self.keep

    def check(self, geometry: Geometry) -> None:
        """At patch time: the budget fits the model's default image (when the adapter knows its patch count)."""
        if geometry.num_patches is not None:
            self.count(int(geometry.num_patches))

    def __repr__(self) -> str:
        return f"keep={self.keep}" if self.keep is not None else f"keep_ratio={self.ratio}"


def importance_needs(geometry: Geometry) -> FrozenSet[str]:
    """What :func:`patch_importance` reads on this model: the CLS attention row where the tower has a prefix token,
    else the attention rows it averages (SigLIP towers, e.g. LLaVA-OneVision, have no CLS token)."""
    return frozenset({Need.CLS_ATTN}) if geometry.num_prefix >= 1 else frozenset({Need.ATTN_ROWS})


def patch_importance(state: TokenState, name: str) -> torch.Tensor:
    """``[B, P]`` importance of each patch token at the feature layer.

    - With a prefix (``state.num_prefix >= 1``, CLIP): the CLS token's attention row averaged over heads, prefix
      columns dropped, not renormalised (FasterVLM / VisPruner).
    - Without one (SigLIP): the mean attention each patch **receives**, averaged over all query rows and heads — the
      rule of VisPruner's official SigLIP tower (``attentions.mean(dim=-2)`` then the head mean), here at the feature
      layer, computed in chunks of query rows from ``Need.ATTN_ROWS`` (no full attention matrix at once).
    """
    p = state.num_prefix
    if p >= 1:
        if state.cls_attn is None:
            raise ValueError(f"{name}: the tower site gave no CLS attention row (Need.CLS_ATTN)")
        return cls_patch_scores(state.cls_attn, p)
    if state.attn_rows is not None:
        return received_attention(state.attn_rows, state.batch_size, state.num_tokens, state.x.device)
    if state.attn is not None:
        return state.attn.mean(dim=2).mean(dim=1)
    raise ValueError(f"{name}: this tower has no CLS token, so the importance is the mean attention each patch "
                     "receives, and the tower site gave no attention rows (Need.ATTN_ROWS)")


def select_patches(state: TokenState, patch_index: torch.Tensor) -> TokenState:
    """Keep the patches ``patch_index [B, K]`` (0-based among the patches, any order) in ascending order, prefix
    dropped (the result has ``num_prefix == 0``); ``kept`` holds their indices into the site's tokens (prefix
    counted)."""
    index = patch_index.sort(dim=1).values + state.num_prefix
    out = select_state(state, index)
    return out.replace(num_prefix=0, kept=out.kept)

