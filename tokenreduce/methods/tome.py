"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

In every block, between the attention residual and the MLP, bipartite soft matching on the keys averaged over
heads merges r tokens into their most similar partners (size-weighted mean), and attention is proportional
(``log(size)`` added to the keys' logits). Defaults reproduce facebookresearch/ToMe at af95e4b.
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, is_int
from ..ops.matching import bipartite_soft_matching, clamp_r
from ..ops.schedule import is_inflect_pair, parse_r
from .state_ops import merge_state


def check_r(r: Any) -> Optional[str]:
    """An int >= 0, ``[r, inflect]`` with a float inflect, or a per-layer list of ints >= 0."""
    if is_int(r):
        return None if r >= 0 else "r must be >= 0"
    if is_inflect_pair(r):
        return None if r[0] >= 0 else "r must be >= 0"
    if isinstance(r, (list, tuple)) and all(is_int(v) and v >= 0 for v in r):
        return None
    return "r must be an int >= 0, [r, inflect] with a float inflect (e.g. [16, -1.0]) or a list of ints >= 0"


def warn_clamped(name: str, schedule: List[int], limits: List[int], rule: str) -> None:
    """Warn once when a schedule asks for more than a method can remove (the paper's clamp applies)."""
    over = [i for i, (r, limit) in enumerate(zip(schedule, limits)) if r > limit]
    if over:
        i = over[0]
        more = f" (and in {len(over) - 1} later block(s))" if len(over) > 1 else ""
        warnings.warn(f"{name}: r={schedule[i]} in block {i} is more than the block can remove at the default input "
                      f"size ({limits[i]}: {rule}); it is clamped there{more}", stacklevel=5)


def tome_plan(schedule: List[int], num_tokens: int, num_prefix: int) -> List[int]:
    """Largest r each block can merge at the default size, following the token count down the schedule."""
    limits, n = [], num_tokens
    for r in schedule:
        limit = clamp_r(10 ** 9, n, num_prefix)
        limits.append(limit)
        n -= min(r, limit)
    return limits


@register_method
class ToMe(ReductionMethod):
    name = "tome"
    site = Site.BLOCK_MID
    needs = frozenset({Need.KEYS})
    summary = "Token Merging: bipartite soft matching on attention keys, r tokens merged per block"
    params = {
        "r": Param(0, "tokens merged per block: int, [r, inflect] (decreasing if inflect < 0), or per-layer list; "
                      "clamped to half the non-prefix tokens", check_r),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.schedule: List[int] = parse_r(params["r"], geometry.num_blocks)
        if geometry.num_tokens is not None:
            warn_clamped(self.name, self.schedule, tome_plan(self.schedule, geometry.num_tokens, geometry.num_prefix),
                         "half of the non-prefix tokens")

    def acts_at(self, layer: int) -> bool:
        return self.schedule[layer] > 0

    def reduce(self, state: TokenState) -> TokenState:
        match = bipartite_soft_matching(state.keys, self.schedule[state.layer], state.num_prefix)
        if match is None:
            return state
        return merge_state(state, match.assign, match.num_out)
