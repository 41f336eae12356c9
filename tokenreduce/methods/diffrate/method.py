"""DiffRate: pruning and merging with learned per-layer kept counts (Chen et al., ICCV 2023).

Inside every block, between the attention residual and the MLP: tokens are sorted by the head-averaged attention
the CLS query gives them (prefix tokens pinned first), the first ``P_l`` are kept (pruning), then every token
beyond the first ``M_l`` is merged into its most similar (cosine of the hidden state) of the first ``M_l``:
unweighted mean including the destination, the merged tokens' sizes scaled by their similarity. Attention is
proportional (``log(size)`` bias). The counts include the prefix tokens, one per block, as upstream's
``set_kept_num``; the effective count after block l is ``min(N, P_l, M_l)``.

Two modes:

- **fixed rates** (``prune_kept`` / ``merge_kept`` lists, or ``rates=`` a YAML file or a named released table such
  as ``"deit_small@2.9"`` from ``configs/diffrate/``): inference, on timm's fused attention.
- **rate search** (no counts given): every block owns learnable logits over candidate kept counts, one vector for
  pruning and one for merging (:class:`RateLogits`, outside the model's ``state_dict``). In ``model.train()`` the
  forward runs the differentiable discrete proxy (tokens masked, never removed, softmax with policy); in
  ``model.eval()`` it runs the inference path with the counts the logits currently choose. The training loop
  lives in :mod:`tokenreduce.train.rate_search`.

Defaults reproduce OpenGVLab/DiffRate at 91ae3e3 (see ``../shared/fixtures/diffrate`` and docs/methods/diffrate.md).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ...core.params import boolean, int_list
from .functional import (candidate_counts, keep_probability, kept_count, masked_merge, permute_tokens,
                         similarity_merge, soft_keep_mask, softmax_with_policy, sort_by_importance)
from .rates import RateTable, load_rates

KINDS = ("prune", "merge")


# ---------------------------------------------------------------------------------------------------------------
# Learnable rates (rate search)
class RateLogits(nn.Module):
    """Learnable logits over candidate kept counts: one vector per block and kind (``"prune"``, ``"merge"``).

    Block 0 is never compressed: its vectors hold one entry (all patches). Initialised to zeros (upstream). It is
    a module of its own, never a submodule of the model, so the model's ``state_dict`` is untouched; save it with
    its own ``state_dict``.
    """

    def __init__(self, num_blocks: int, num_patches: int, num_prefix: int, granularity: Tuple[int, int]) -> None:
        super().__init__()
        self.num_patches, self.num_prefix = num_patches, num_prefix
        self.granularity = dict(zip(KINDS, granularity))
        for kind in KINDS:
            sizes = [1] + [len(candidate_counts(num_patches, self.granularity[kind]))] * (num_blocks - 1)
            setattr(self, kind, nn.ParameterList([nn.Parameter(torch.zeros(k)) for k in sizes]))

    @property
    def num_blocks(self) -> int:
        return len(self.prune)

    def logits(self, kind: str, layer: int) -> nn.Parameter:
        """The logits ``[K]`` of one block and kind."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return getattr(self, kind)[layer]

    def candidates(self, kind: str, layer: int) -> torch.Tensor:
        """Candidate patch counts ``[K]`` of one block and kind, in the logits' dtype and device."""
        ref = self.logits(kind, layer)
        if layer == 0:
            return torch.full((1,), float(self.num_patches), dtype=ref.dtype, device=ref.device)
        return candidate_counts(self.num_patches, self.granularity[kind], dtype=ref.dtype, device=ref.device)

    def kept(self, kind: str, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(kept, probs)`` of one block: kept count incl. prefix (integer value, straight-through gradient)."""
        with torch.autocast(self.logits(kind, layer).device.type, enabled=False):
            return kept_count(self.logits(kind, layer), self.candidates(kind, layer), self.num_prefix)

    def kept_counts(self) -> Dict[str, List[int]]:
        """The integer counts the logits choose now: ``{"prune": [...], "merge": [...]}``."""
        with torch.no_grad():
            return {kind: [int(round(float(self.kept(kind, l)[0]))) for l in range(self.num_blocks)]
                    for kind in KINDS}


@dataclass
class SearchRun:
    """One rate-search (training) forward, the method's carry: the running keep mask and what each block chose.
    ``tokenreduce.info(model).method_state`` returns it after the forward (the trainer reads it)."""

    mask: Optional[torch.Tensor] = None  # [B, N] keep policy in sorted order (carries gradient)
    cls_attn: Optional[torch.Tensor] = None  # [B, N] the current block's CLS row of the policy softmax
    kept: Dict[str, List[torch.Tensor]] = field(default_factory=lambda: {k: [] for k in KINDS})
    live: List[int] = field(default_factory=list)  # live tokens entering each block


def _check_counts(value: Any) -> Optional[str]:
    if value is None or int_list(1)(value) is None:
        return None
    return "must be a list of per-block kept token counts (ints >= 1, including CLS), or None"


def _check_rates(value: Any) -> Optional[str]:
    if value is None or isinstance(value, (str, os.PathLike)):
        return None
    return "must be a YAML path or a named config such as 'deit_small@2.9'"


def _check_granularity(value: Any) -> Optional[str]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if ok(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(ok(v) for v in value)):
        return None
    return "must be an int >= 1 or [prune_granularity, merge_granularity]"


@register_method
class DiffRate(ReductionMethod):
    name = "diffrate"
    site = Site.BLOCK_MID
    needs = frozenset({Need.CLS_ATTN, Need.ATTENTION_PROBS})
    summary = ("DiffRate: per block, prune by CLS attention then merge by similarity, with learned per-layer "
               "kept counts (released tables or a rate search)")
    params = {
        "prune_kept": Param(None, "kept tokens after pruning, per block, incl. CLS (upstream set_kept_num)",
                            _check_counts),
        "merge_kept": Param(None, "kept tokens after merging, per block, incl. CLS", _check_counts),
        "rates": Param(None, "a rate YAML file or a released table, e.g. 'deit_small@2.9' (configs/diffrate)",
                       _check_rates),
        "granularity": Param(1, "rate search: step between candidate kept counts (int, or [prune, merge])",
                             _check_granularity),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.num_prefix = geometry.num_prefix
        if not geometry.has_class_token or self.num_prefix < 1:
            raise ValueError("diffrate ranks tokens by the attention of the CLS token; this model has no class "
                             "token (class_token=False)")
        prune, merge, rates = params.get("prune_kept"), params.get("merge_kept"), params.get("rates")
        self.table: Optional[RateTable] = None
        if rates is not None:
            if prune is not None or merge is not None:
                raise ValueError("diffrate: give either rates= or prune_kept/merge_kept, not both")
            self.table = load_rates(rates)
            prune, merge = self.table.prune_kept, self.table.merge_kept
        self.searching = prune is None and merge is None
        self.rates: Optional[RateLogits] = None
        self.prune_kept: List[int] = []
        self.merge_kept: List[int] = []
        if self.searching:
            if not geometry.num_patches:
                raise ValueError("diffrate rate search needs the model's patch count (fixed input size)")
            g = params.get("granularity", 1)
            self.rates = RateLogits(geometry.num_blocks, geometry.num_patches, self.num_prefix,
                                    (g, g) if isinstance(g, int) else tuple(g))
            warnings.warn("diffrate without prune_kept / merge_kept / rates is the rate-search mode: train the rates "
                          "(tokenreduce search-rates, or tokenreduce.train.RateSearch); in eval() it reduces with "
                          "the counts the (untrained) rates choose now. For inference pass a released table, e.g. "
                          "rates='deit_small@2.9'", stacklevel=4)
        else:
            # A missing list means no reduction of that kind (a count no block can reach).
            never = [2 ** 31 - 1] * geometry.num_blocks
            self.prune_kept = self._validated(prune, "prune_kept") if prune is not None else never
            self.merge_kept = self._validated(merge, "merge_kept") if merge is not None else never

    def _validated(self, counts: Sequence[int], what: str) -> List[int]:
        counts = list(counts)
        if len(counts) != self.geometry.num_blocks:
            raise ValueError(f"diffrate: {what} has {len(counts)} entries but the model has "
                             f"{self.geometry.num_blocks} blocks (one count per block, including CLS)")
        low = [c for c in counts if c <= self.num_prefix]
        if low:
            raise ValueError(f"diffrate: {what} must keep more than the {self.num_prefix} prefix token(s) in every "
                             f"block, got {counts}")
        return counts

    # -----------------------------------------------------------------------------------------------------------
    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        # The rate search replaces every block's softmax and reads the CLS row from its own policy softmax.
        if training and self.searching:
            return frozenset({Need.ATTENTION_PROBS})
        return frozenset({Need.CLS_ATTN})

    def begin(self, training: bool) -> Any:
        if not self.searching:
            return None
        if training:
            return SearchRun()
        counts = self.rates.kept_counts()  # read every forward: the logits may have changed since the last one
        return counts["prune"], counts["merge"]

    def attention_probs(self, state: TokenState):
        if not (state.training and self.searching):
            return None
        run: SearchRun = state.carry

        def probs(logits: torch.Tensor) -> torch.Tensor:
            if run.mask is None:
                run.mask = logits.new_ones(logits.shape[0], logits.shape[-1],
                                           dtype=torch.promote_types(logits.dtype, torch.float32))
            p = softmax_with_policy(logits, run.mask)
            run.cls_attn = p[:, :, 0].detach().mean(dim=1)
            return p

        return probs

    def reduce(self, state: TokenState) -> TokenState:
        if self.searching and state.training:
            return self._reduce_search(state)
        prune, merge = state.carry if self.searching else (self.prune_kept, self.merge_kept)
        return self._reduce_fixed(state, prune[state.layer], merge[state.layer])

    def _reduce_fixed(self, state: TokenState, prune: int, merge: int) -> TokenState:
        """Inference: sort, keep the first ``prune``, merge everything beyond ``merge`` into the first ``merge``."""
        expected = self.geometry.num_tokens
        if state.layer == 0 and expected is not None and state.num_tokens != expected:
            # The counts are absolute, learned for one token count; at another input size they would prune a
            # different share (or nothing), so refuse instead of silently changing the method.
            raise ValueError(f"diffrate's kept counts are set for {expected} tokens (the model's default input size); "
                             f"this input has {state.num_tokens}. Feed the default image size, or learn rates for "
                             "this size with the rate search (tokenreduce search-rates)")
        order = sort_by_importance(state.cls_attn, self.num_prefix)
        x, size, source = permute_tokens(order[:, :prune], state.x, state.size, state.source)  # sort, then prune
        if merge < x.shape[1]:
            x, size, source = similarity_merge(x, size, source, merge, self.num_prefix)
        return state.replace(x=x, size=size, source=source, kept=order[:, :x.shape[1]])

    def _reduce_search(self, state: TokenState) -> TokenState:
        """Rate search (upstream's training forward): mask instead of removing, with gradients into the logits."""
        run, layer = state.carry, state.layer
        if run.cls_attn is None:
            raise RuntimeError("diffrate rate search needs the adapter to run attention_probs() before the "
                               "reduction site")
        mask = run.mask if run.mask is not None else state.x.new_ones(state.x.shape[:2])
        order = sort_by_importance(run.cls_attn, self.num_prefix)
        x, size, mask, source = permute_tokens(order, state.x, state.size, mask, state.source)
        n = x.shape[1]
        live = int(round(float(mask[0].detach().sum())))  # upstream: live tokens of sample 0
        prune, prune_probs = self.rates.kept("prune", layer)
        merge, merge_probs = self.rates.kept("merge", layer)
        prune_n, merge_n = int(round(float(prune.detach()))), int(round(float(merge.detach())))
        if prune_n < live:
            pi = keep_probability(prune_probs, self.rates.candidates("prune", layer), n, self.num_prefix)
            mask = mask * soft_keep_mask(pi, prune_n, live).to(mask.dtype)
        mid = min(live, prune_n)
        if merge_n < mid:
            x, size = masked_merge(x, size, merge_n, mid, self.num_prefix)
            pi = keep_probability(merge_probs, self.rates.candidates("merge", layer), n, self.num_prefix)
            mask = mask * soft_keep_mask(pi, merge_n, mid).to(mask.dtype)
        run.mask, run.cls_attn = mask, None
        run.kept["prune"].append(prune)
        run.kept["merge"].append(merge)
        run.live.append(live)
        return state.replace(x=x, size=size, source=source, carry=run)

    # -----------------------------------------------------------------------------------------------------------
    def kept_counts(self) -> Dict[str, List[int]]:
        """The per-block counts in use (fixed) or chosen by the logits now (search)."""
        if self.searching:
            return self.rates.kept_counts()
        return {"prune": list(self.prune_kept), "merge": list(self.merge_kept)}
