"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee, Choi & Kim, CVPR 2024).

In each of ``layers`` MCTF removes ``r`` tokens by bidirectional bipartite matching on a score that multiplies a
similarity, an informativeness (attention received) and a size criterion (``tokenreduce.ops.mctf``), and pools each
group weighted by the attention its members receive. *One-step-ahead* attention merges at the start of the block,
using that block's attention on its (unmerged) input, so the block itself runs on fewer tokens:

- ``one_step_ahead=1`` (the paper's default): the block's attention map is merged too (key columns summed, query rows
  pooled) and the block uses it instead of recomputing attention: ``x' + proj(A'·v(norm1(x')))``. Site
  ``BLOCK_IN``; the merged map replaces the block's softmax (``Need.ATTENTION_PROBS``).
- ``one_step_ahead=2`` ("precise"): merge at the start, then the block recomputes attention on the merged tokens.
  Site ``BLOCK_IN``.
- ``one_step_ahead=0``: merge after the block, with the block's own attention. Site ``BLOCK_OUT``.

The site therefore depends on the configuration (:meth:`MCTF.site_for`): one method with one site per
configuration, rather than acting at the next block's start with the previous block's attention carried over,
which would lose the merge after the last block.

Defaults reproduce mlvlab/MCTF at 2004da0 (its eval path, ``r=16`` in blocks 1..11). Beyond upstream: every prefix
token (distillation token, registers) is protected and kept first, where upstream supports only CLS; LayerScale,
q/k norm and fused attention of timm >= 1.0 work (upstream's block has none); models without a CLS token work.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, FrozenSet, List, NamedTuple, Optional

import torch

from ..core import AttentionMap, DenseMap, Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, is_int, layer_list, real
from ..ops.mctf import (bidirectional_assign, criteria_scores, mctf_r, merge_attention, merged_attention_output,
                        pool_max, pool_weighted, split_positions)
from ..ops.merge import merge_source

#: Upstream's integer codes for ``pooling`` (``mctf_type[9]``).
POOLING_CODES = {0: "size", 1: "attn", 2: "max", 3: "mean"}


class MergedAttention(NamedTuple):
    """The carry of a one-step-ahead merge: block ``layer`` uses ``probs`` (``[B, H, N', N']``) as its attention."""

    layer: int
    probs: AttentionMap


class FactoredMergedMap(AttentionMap):
    """The merged attention map of weighted pooling, kept as the unmerged map and the merge: the block's
    ``map.apply(v)`` is :func:`~tokenreduce.ops.mctf.merged_attention_output` (``P·V`` over the N unmerged keys, then
    the rows pooled), and the ``[B, H, N', N']`` matrix is built only where a layer's eager path needs it."""

    def __init__(self, attn: torch.Tensor, assign: torch.Tensor, num_out: int, weight: torch.Tensor) -> None:
        self.attn, self.assign, self.num_out, self.weight = attn, assign, num_out, weight
        self.pv_tokens = int(attn.shape[-1])

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        return merged_attention_output(self.attn, self.assign, self.weight, v)

    def dense(self) -> torch.Tensor:
        return merge_attention(self.attn, self.assign, self.num_out, self.weight)


def check_r(v: Any) -> Optional[str]:
    if is_int(v) and v >= 0:
        return None
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < 1:
        return None
    return f"r must be an int >= 0 (tokens per block) or a fraction 0 < r < 1 of the non-prefix tokens, got {v!r}"


def check_mode(v: Any) -> Optional[str]:
    return None if is_int(v) and v in (0, 1, 2) else \
        f"one_step_ahead must be 0 (merge after the block), 1 (merge before it and reuse the merged attention) or " \
        f"2 (merge before it, recompute attention), got {v!r}"


def check_pooling(v: Any) -> Optional[str]:
    if v in POOLING_CODES.values() or (is_int(v) and v in POOLING_CODES):
        return None
    return f"pooling must be 'attn', 'size', 'mean' or 'max' (upstream codes 1, 0, 3, 2), got {v!r}"


def active_layers(layers: Optional[List[int]], num_blocks: int) -> FrozenSet[int]:
    """Blocks MCTF acts in: ``layers``, or every block but the first (the paper's DeiT setting) when None."""
    if layers is None:
        return frozenset(range(1, num_blocks))
    bad = [i for i in layers if i >= num_blocks]
    if bad:
        raise ValueError(f"mctf: layers {bad} out of range for a model with {num_blocks} blocks")
    return frozenset(layers)


def pooling_weight(pooling: str, received: torch.Tensor, size: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-token pooling weights ``[B, N]`` (None for element-wise max): ``"attn"`` the attention received times
    ``size / max(size)``, ``"size"`` the size, ``"mean"`` one."""
    if pooling == "attn":
        return received * (size / size.amax(dim=1, keepdim=True))
    if pooling == "size":
        return size
    if pooling == "mean":
        return torch.ones_like(size)
    return None


@register_method
class MCTF(ReductionMethod):
    name = "mctf"
    site = Site.BLOCK_IN  # with the default one_step_ahead=1; see site_for
    needs = frozenset({Need.ATTN, Need.ATTENTION_PROBS})
    summary = ("Multi-criteria token fusion: bidirectional matching on similarity x informativeness x size, "
               "one-step-ahead attention (merges at the block's start; after the block with one_step_ahead=0)")
    params = {
        "r": Param(16, "tokens removed per active block: an int, or a fraction 0 < r < 1 of the non-prefix tokens "
                       "present (int((T-p)*r)); r = T-10 when T-r < 10, then at most half the non-prefix tokens",
                   check_r, aliases=("r_eval", "r_evals")),
        "layers": Param(None, "0-based blocks where MCTF acts; None = every block but the first (the paper's DeiT "
                              "setting; MCTF-Fast uses [3, 6, 9])", layer_list(), aliases=("activate_layer",)),
        "one_step_ahead": Param(1, "1: merge at the start of the block and reuse the merged attention map; 2 "
                                   "('precise'): merge at the start, recompute attention; 0: merge after the block",
                                check_mode),
        "tau_sim": Param(1.0, "temperature of the similarity criterion (0 drops it)", real(0.0)),
        "tau_info": Param(20.0, "temperature of the informativeness criterion (0 drops it)", real(0.0)),
        "tau_size": Param(40.0, "temperature of the size criterion (0 drops it)", real(0.0)),
        "bidirectional": Param(True, "A->B stage of r//2 merges then B->A of r - r//2; False: one A->B stage of r",
                               boolean, aliases=("bidirection",)),
        "pooling": Param("attn", "how a group's tokens are pooled: 'attn' (weighted by attention received x "
                                 "size), 'size', 'mean' or 'max'; upstream's codes 1, 0, 3, 2 are accepted",
                         check_pooling, aliases=("pooling_type",)),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", boolean),
    }

    @classmethod
    def site_for(cls, params: Dict[str, Any]) -> Site:
        return Site.BLOCK_OUT if params.get("one_step_ahead", 1) == 0 else Site.BLOCK_IN

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.r = params["r"]
        self.layers = active_layers(params["layers"], geometry.num_blocks)
        self.one_step_ahead = int(params["one_step_ahead"])
        self.taus = (float(params["tau_sim"]), float(params["tau_info"]), float(params["tau_size"]))
        self.bidirectional = bool(params["bidirectional"])
        pooling = params["pooling"]
        self.pooling = POOLING_CODES[pooling] if is_int(pooling) else pooling

    def acts_at(self, layer: int) -> bool:
        return layer in self.layers and self.r != 0

    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        if not self.acts_at(layer):
            return frozenset()
        if self.one_step_ahead == 1:
            return frozenset({Need.ATTN, Need.ATTENTION_PROBS})
        return frozenset({Need.ATTN})

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        if Need.ATTENTION_PROBS in missing:
            return ("one_step_ahead=1 makes the block use the merged attention map instead of its own softmax, which "
                    "this model's layers cannot take; use one_step_ahead=2 (merge before the block, recompute "
                    "attention) or 0 (merge after the block)")
        return ""

    def attention_probs(self, state: TokenState) -> Optional[AttentionMap]:
        """In one-step-ahead mode 1, the merged attention map this block's merge left in the carry: the block uses
        it as its probabilities and never computes ``q·kᵀ`` (upstream's block does not either)."""
        carry = state.carry
        if self.one_step_ahead != 1 or not isinstance(carry, MergedAttention) or carry.layer != state.layer:
            return None  # nothing merged here (r clamped to 0): the block computes its attention as usual
        return carry.probs

    def reduce(self, state: TokenState) -> TokenState:
        t, p = state.num_tokens, state.num_prefix
        r = mctf_r(self.r, t, p)
        if r <= 0:
            return state
        attn, size = state.attn, state.size
        with torch.no_grad():
            received = attn.mean(dim=(1, 2))  # [B, N]: attention each token receives
            a_pos, b_pos = split_positions(t, p, device=state.x.device)
            scores = criteria_scores(state.x, received, size, a_pos, b_pos, *self.taus)
            assign, num_out = bidirectional_assign(scores, r, a_pos, b_pos, t, p, self.bidirectional)
            weight = pooling_weight(self.pooling, received, size.to(received.dtype))
            new_size = size.new_zeros(size.shape[0], num_out).scatter_add_(1, assign, size)
        x = pool_max(state.x, assign, num_out) if weight is None else pool_weighted(state.x, weight, assign, num_out)
        source = merge_source(state.source, assign, num_out) if state.source is not None else None
        carry = state.carry
        if self.one_step_ahead == 1:
            probs = DenseMap(merge_attention(attn, assign, num_out, None)) if weight is None else \
                FactoredMergedMap(attn, assign, num_out, weight)  # element-wise max does not factor
            carry = MergedAttention(state.layer, probs)
        return state.replace(x=x, size=new_size, source=source, carry=carry)
