"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

In every block, between the attention residual and the MLP, bipartite soft matching on the keys averaged over
heads merges r tokens into their most similar partners (size-weighted mean), and attention is proportional
(``log(size)`` added to the keys' logits). Defaults reproduce facebookresearch/ToMe at af95e4b.
"""
from __future__ import annotations

from typing import Any, List, Optional

from ..ops.matching import bipartite_soft_matching
from ..ops.merge import merge_source, merge_weighted
from ..ops.schedule import is_inflect_pair, parse_r
from .registry import register_method
from ..state import TokenState
from .base import Geometry, Param, ReductionMethod, Site


def check_r(r: Any) -> Optional[str]:
    if isinstance(r, bool):
        return "r must be an int, [r, inflect] or a list of per-layer ints"
    if isinstance(r, int):
        return None if r >= 0 else "r must be >= 0"
    if is_inflect_pair(r):
        return None if r[0] >= 0 else "r must be >= 0"
    if isinstance(r, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
        return None
    return "r must be an int >= 0, [r, inflect] with a float inflect (e.g. [16, -1.0]) or a list of ints >= 0"


def check_bool(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def merge_state(state: TokenState, assign, num_out: int) -> TokenState:
    """Apply an assignment to x, size and source (size-weighted mean, summed size, union of sources)."""
    x, size = merge_weighted(state.x, state.size, assign, num_out)
    source = merge_source(state.source, assign, num_out) if state.source is not None else None
    return state.replace(x=x, size=size, source=source)


@register_method
class ToMe(ReductionMethod):
    name = "tome"
    site = Site.BLOCK_MID
    needs = frozenset({"keys"})
    summary = "Token Merging: bipartite soft matching on attention keys, r tokens merged per block"
    params = {
        "r": Param(0, "tokens merged per block: int, [r, inflect] (decreasing if inflect < 0), or per-layer list",
                   check_r),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", check_bool),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.schedule: List[int] = parse_r(params["r"], geometry.num_blocks)

    def acts_at(self, layer: int) -> bool:
        return self.schedule[layer] > 0

    def reduce(self, state: TokenState) -> TokenState:
        match = bipartite_soft_matching(state.keys, self.schedule[state.layer], state.num_prefix)
        if match is None:
            return state
        return merge_state(state, match.assign, match.num_out)
