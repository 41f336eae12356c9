"""ToFu: Token Fusion (Kim, Gao, Hsu, Shen & Jin, "Token Fusion: Bridging the Gap between Token Pruning and Token
Merging", WACV 2024).

ToFu keeps ToMe's bipartite soft matching (between the attention residual and the MLP, on the keys averaged over
heads, ``r`` tokens per block, proportional attention) and changes how a matched group is combined
(``tokenreduce.ops.tofu``):

- in the early blocks, where a ViT responds non-linearly to interpolated inputs, it *prunes*: the group is its
  destination token unchanged and the matched sources are dropped;
- from block ``merge_from`` on it merges with *MLERP*: the size-weighted mean rescaled to the largest member norm,
  so merging does not shrink token norms (averaging does, which shifts the feature distribution).

Sizes and sources count every member of a group in both modes, so proportional attention and ``info().source``
describe what each token stands for. No official code was released; the semantics follow the paper, with the
prune/merge split of OpenToMe's implementation (docs/methods/tofu.md lists every choice).
"""
from __future__ import annotations

from typing import Any, List

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, integer
from ..ops.matching import bipartite_soft_matching
from ..ops.merge import merge_source
from ..ops.schedule import parse_r
from ..ops.tofu import bipartite_sources, merge_mlerp, merge_prune
from .tome import check_r, tome_plan, warn_clamped


def default_merge_from(num_blocks: int) -> int:
    """First MLERP block when ``merge_from`` is None: ``L // 2 + 1`` (OpenToMe prunes in blocks ``i <= L // 2``)."""
    return num_blocks // 2 + 1


@register_method
class ToFu(ReductionMethod):
    name = "tofu"
    site = Site.BLOCK_MID
    needs = frozenset({Need.KEYS})
    summary = "Token Fusion: ToMe's matching, pruning in early blocks and norm-preserving MLERP merging later"
    params = {
        "r": Param(0, "tokens removed per block: int, [r, inflect] (decreasing if inflect < 0), or per-layer list; "
                      "clamped to half the non-prefix tokens", check_r),
        "merge_from": Param(None, "first block that MLERP-merges; earlier blocks prune (keep the destination "
                                  "token). None = L // 2 + 1 (OpenToMe's split); 0 = MLERP everywhere; >= L = prune "
                                  "everywhere", integer(0, optional=True)),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.schedule: List[int] = parse_r(params["r"], geometry.num_blocks)
        given = params["merge_from"]
        self.merge_from = default_merge_from(geometry.num_blocks) if given is None else int(given)
        if geometry.num_tokens is not None:
            warn_clamped(self.name, self.schedule, tome_plan(self.schedule, geometry.num_tokens, geometry.num_prefix),
                         "half of the non-prefix tokens")

    def acts_at(self, layer: int) -> bool:
        return self.schedule[layer] > 0

    def prunes_at(self, layer: int) -> bool:
        """Whether block ``layer`` prunes (True) or MLERP-merges (False)."""
        return layer < self.merge_from

    def reduce(self, state: TokenState) -> TokenState:
        match = bipartite_soft_matching(state.keys, self.schedule[state.layer], state.num_prefix)
        if match is None:
            return state
        assign, m = match.assign, match.num_out
        is_source = bipartite_sources(assign, m)
        if self.prunes_at(state.layer):
            x = merge_prune(state.x, assign, is_source, m)
        else:
            x = merge_mlerp(state.x, state.size, assign, is_source, m)
        size = state.size.new_zeros(state.batch_size, m).scatter_add_(1, assign, state.size)
        source = merge_source(state.source, assign, m) if state.source is not None else None
        return state.replace(x=x, size=size, source=source)
