"""PPT: Token Pruning and Pooling (Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers";
xjwu1024/PPT).

In each of ``layers``, between the attention residual and the MLP, every sample loses ``r`` tokens, by one of two
operators chosen per sample from how concentrated its attention is:

- the significance of every non-prefix token is ATS's score, its CLS attention (summed over heads) times the norm
  of its value vector, normalised to sum 1 (``ops.ats.significance``);
- when the variance of those scores is below ``threshold`` (attention spread out: many redundant tokens) the
  sample **pools**: ToMe's bipartite soft matching on the head-mean keys merges ``r`` tokens (size-weighted mean);
- otherwise it **prunes**: the ``r`` least significant tokens are dropped and the rest follow the prefix in
  descending significance (upstream re-orders them so).

Both operators remove the same number of tokens, so the batch keeps one length. Attention is proportional
(``log(size)``) from the first merge on. Defaults reproduce xjwu1024/PPT at 706bcdd with its README's DeiT-S
evaluation setting (``threshold 7e-5``, blocks 3, 6, 9; ``r`` is model-specific: 50 there).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, is_int, layer_list, real
from ..ops.ats import significance
from ..ops.evit import topk_by_score
from ..ops.matching import bipartite_soft_matching
from ..ops.ppt import per_sample, pooling_policy, singleton_index
from .pruning import default_prune_layers
from .state_ops import merge_state, select_state


def check_r(v: Any) -> Optional[str]:
    if is_int(v) and v >= 0:
        return None
    if isinstance(v, (list, tuple)) and v and all(is_int(x) and x >= 0 for x in v):
        return None
    return "r must be an int >= 0 (tokens removed at every PP block) or a list of ints >= 0, one per entry of layers"


@dataclass
class PPTRun:
    """One forward's record (the method's carry; ``tokenreduce.info(model).method_state``): per PP block, the
    variance criterion and the policy each sample took."""

    s_op: Dict[int, torch.Tensor] = field(default_factory=dict)    # [B] variance of the significance scores
    pooled: Dict[int, torch.Tensor] = field(default_factory=dict)  # [B] bool, True = pooled, False = pruned


@register_method
class PPT(ReductionMethod):
    name = "ppt"
    site = Site.BLOCK_MID
    needs = frozenset({Need.KEYS, Need.CLS_ATTN_PER_HEAD, Need.VALUES_PER_HEAD})
    summary = ("PPT: per image and block, prune the least significant tokens (concentrated attention) or pool "
               "them with ToMe's matching (spread attention), r tokens either way")
    params = {
        "r": Param(0, "tokens removed at each PP block (pooled or pruned): an int, or one per entry of layers; "
                      "clamped to half the non-prefix tokens", check_r, aliases=("r_tokens",)),
        "layers": Param(None, "PP blocks (0-based); None: floor(d/4), floor(d/2), floor(3d/4) (3, 6, 9 for 12 "
                              "blocks, the README's setting)", layer_list(), aliases=("pp_loc_list",)),
        "threshold": Param(7e-5, "per image: pool when the variance of its significance scores is below this, "
                                 "else prune (0: always prune, upstream's argparse default)", real(0.0),
                           aliases=("op_threshold",)),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        if not geometry.has_class_token:
            raise ValueError("ppt scores tokens by the CLS token's attention, and this model has no class token "
                             "(class_token=False); use tome for pooling alone")
        super().__init__(geometry, **params)
        self.threshold = float(params.get("threshold", 7e-5))
        layers = params.get("layers")
        layers = list(layers) if layers is not None else default_prune_layers(geometry.num_blocks)
        bad = [layer for layer in layers if layer >= geometry.num_blocks]
        if bad:
            raise ValueError(f"ppt: layers {bad} are out of range: the model has {geometry.num_blocks} blocks "
                             f"(indices 0..{geometry.num_blocks - 1})")
        r = params.get("r", 0)
        if isinstance(r, (list, tuple)):
            if len(r) != len(layers):
                raise ValueError(f"ppt: r lists {len(r)} values but layers has {len(layers)} PP blocks {layers}; "
                                 "give one r per PP block (upstream consumes its r list in PP-block order)")
            rs = [int(v) for v in r]
        else:
            rs = [int(r)] * len(layers)
        self.r: Dict[int, int] = {layer: v for layer, v in zip(layers, rs) if v > 0}
        self._warn_clamped()

    def _warn_clamped(self) -> None:
        g = self.geometry
        if g.num_tokens is None:
            return
        n, p = g.num_tokens, g.num_prefix
        for layer in range(g.num_blocks):
            r = self.r.get(layer, 0)
            limit = (n - p) // 2
            if r > limit:
                warnings.warn(f"ppt: r={r} in block {layer} is more than the block can remove at the default input "
                              f"size ({limit}: half of the non-prefix tokens, upstream's clamp); it is clamped "
                              "there", stacklevel=5)
                break
            n -= r

    def acts_at(self, layer: int) -> bool:
        return layer in self.r

    def begin(self, training: bool) -> Any:
        return PPTRun()

    # -----------------------------------------------------------------------------------------------------------
    def reduce(self, state: TokenState) -> TokenState:
        p, n = state.num_prefix, state.num_tokens
        r = min(self.r[state.layer], (n - p) // 2)
        if r <= 0:
            return state
        sig = significance(state.cls_attn_per_head, state.values_per_head, p)  # [B, n - p]
        pool = pooling_policy(sig, self.threshold)
        run: PPTRun = state.carry
        if run is not None:
            run.s_op[state.layer], run.pooled[state.layer] = sig.var(dim=1), pool

        def pooled() -> TokenState:
            match = bipartite_soft_matching(state.keys, r, p)
            out = merge_state(state, match.assign, match.num_out)
            return out.replace(kept=singleton_index(match.assign, match.num_out))

        def pruned() -> TokenState:
            scores = torch.cat([sig.new_zeros(sig.shape[0], p), sig], dim=1)
            return select_state(state, topk_by_score(scores, p, n - p - r))

        if not torch.compiler.is_compiling():  # skip the candidate no sample takes (a graph needs both)
            if bool(pool.all()):
                return pooled()
            if not bool(pool.any()):
                return pruned()
        a, b = pooled(), pruned()
        return state.replace(x=per_sample(pool, a.x, b.x), size=per_sample(pool, a.size, b.size),
                             source=per_sample(pool, a.source, b.source), kept=per_sample(pool, a.kept, b.kept))
