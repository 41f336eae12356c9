"""PiToMe: spectrum-preserving token merging (Tran et al., NeurIPS 2024).

In every block, between the attention residual and the MLP, tokens are ranked by an *energy score* (how many
similar tokens they have, ``ops.energy``) computed on the keys averaged over heads. High-energy tokens are split
alternately into two sets A and B by energy rank and A tokens are merged into their most similar B token
(size-weighted mean). Two variants, chosen per block:

- ``bsm`` (upstream's ``pitome_bsm``, the first ``ceil(L/2)`` blocks by default): all tokens take part; A =
  ranks 0, 2, 4, ..., B = ranks 1, 3, 5, ...; as in ToMe the ``r`` A tokens with the most similar partners merge.
- ``protected`` (upstream's ``pitome``, the remaining blocks): only the ``2r`` highest-energy tokens take part and
  every A token among them merges; the other tokens are protected.

Defaults reproduce hchautran/PiToMe at 550b5de (the DeiT/timm path). Beyond upstream: the margin schedule,
alpha, proportional attention and the per-block variant are options; every prefix token (CLS, the distilled
DeiT's distillation token, registers) is protected, where upstream protects only token 0; ``r`` is clamped to
half the unprotected tokens like ToMe, so ratios below 0.5 and blocks where ``r`` reaches 0 work (upstream
crashes).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, fraction, is_real
from ..ops.energy import energy_score
from ..ops.matching import best_match
from ..ops.merge import gather_tokens, with_prefix_slots
from .state_ops import merge_state


def check_margin(v: Any) -> Optional[str]:
    if v is None or is_real(v):
        return None
    if isinstance(v, (list, tuple)) and v and all(is_real(m) for m in v):
        return None
    return "margin must be None (upstream's schedule 0.75*(1 - l/L)), a number, or a list of numbers per block"


def check_alpha(v: Any) -> Optional[str]:
    return None if is_real(v) and v > 0 else "alpha must be a number > 0"


def check_bsm_layers(v: Any) -> Optional[str]:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    if isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return None
    return ("bsm_layers must be None (the first ceil(L/2) blocks), an int k (the first k blocks) or a list of "
            "block indices")


def pitome_r(num_tokens: int, ratio: float) -> int:
    """Tokens to merge among ``num_tokens`` unprotected tokens.

    Upstream's ``math.floor(T - T*ratio)`` evaluated literally in double precision (it differs from
    ``floor(T*(1-ratio))`` at e.g. ratio 0.9 and T divisible by 10), then clamped like ToMe to at most half the
    tokens, since each merge needs a partner.
    """
    r = math.floor(num_tokens - num_tokens * ratio)
    return max(0, min(r, num_tokens // 2))


def margin_schedule(margin: Any, num_blocks: int) -> List[float]:
    """Per-block margins: None -> upstream's ``0.75 - 0.75*l/L``; a number -> the same in every block; a list
    -> one per block (ValueError if its length is not the model's depth)."""
    if margin is None:
        return [0.75 - 0.75 * layer / num_blocks for layer in range(num_blocks)]
    if isinstance(margin, (list, tuple)):
        if len(margin) != num_blocks:
            raise ValueError(f"pitome: margin lists {len(margin)} values but the model has {num_blocks} blocks")
        return [float(m) for m in margin]
    return [float(margin)] * num_blocks


def bsm_blocks(bsm_layers: Any, num_blocks: int) -> frozenset:
    """Blocks that use the bipartite variant: None -> the first ``ceil(L/2)`` (upstream); k -> the first k;
    a list -> those indices (ValueError when out of range)."""
    if bsm_layers is None:
        return frozenset(range(math.ceil(num_blocks / 2)))
    if isinstance(bsm_layers, int):
        if bsm_layers > num_blocks:
            raise ValueError(f"pitome: bsm_layers={bsm_layers} but the model has {num_blocks} blocks")
        return frozenset(range(bsm_layers))
    bad = [i for i in bsm_layers if not 0 <= i < num_blocks]
    if bad:
        raise ValueError(f"pitome: bsm_layers {bad} out of range for a model with {num_blocks} blocks")
    return frozenset(bsm_layers)


def _assign(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], num_tokens: int) -> torch.Tensor:
    """Scatter ``(token indices [B, k], output slots [B, k])`` pairs into one assignment ``[B, num_tokens]``."""
    first = parts[0][0]
    assign = torch.empty(first.shape[0], num_tokens, dtype=torch.long, device=first.device)
    for index, slots in parts:
        assign.scatter_(1, index, slots.expand_as(index))
    return assign


def energy_bipartite_assign(unit: torch.Tensor, order: torch.Tensor, r: int) -> Tuple[torch.Tensor, int]:
    """Upstream's ``pitome_bsm``: ToMe matching on an energy-ordered alternating split.

    Args:
        unit: ``[B, T, d]`` unit-norm metric of the unprotected tokens.
        order: ``[B, T]`` token indices by descending energy.
        r: tokens to merge, ``0 < r <= T // 2``.

    Returns:
        ``(assign [B, T], T - r)``. A = ``order[0::2]``, B = ``order[1::2]``; the r A tokens with the most similar
        B partner merge into it. Output order as upstream: kept A tokens by descending best similarity (not
        re-sorted), then the B tokens in energy order.
    """
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    n_a, n_b = a_idx.shape[1], b_idx.shape[1]
    node_max, node_idx = best_match(gather_tokens(unit, a_idx), gather_tokens(unit, b_idx))
    edge = node_max.argsort(dim=-1, descending=True, stable=True)
    kept, merged = edge[:, r:], edge[:, :r]
    device = unit.device
    slot_a = torch.empty_like(node_idx)
    slot_a.scatter_(1, kept, torch.arange(n_a - r, device=device).expand_as(kept))
    slot_a.scatter_(1, merged, node_idx.gather(1, merged) + (n_a - r))
    slot_b = torch.arange(n_b, device=device) + (n_a - r)
    t = order.shape[1]
    return _assign([(a_idx, slot_a), (b_idx, slot_b)], t), t - r


def energy_protected_assign(unit: torch.Tensor, order: torch.Tensor, r: int) -> Tuple[torch.Tensor, int]:
    """Upstream's ``pitome``: only the 2r highest-energy tokens merge, the rest are protected.

    Args:
        unit: ``[B, T, d]`` unit-norm metric of the unprotected tokens.
        order: ``[B, T]`` token indices by descending energy.
        r: tokens to merge, ``0 < r <= T // 2``.

    Returns:
        ``(assign [B, T], T - r)``. A = ``order[0:2r:2]``, B = ``order[1:2r:2]``; every A token merges into its
        most similar B token. Output order as upstream: protected tokens in energy order, then B in energy order.
    """
    t = order.shape[1]
    a_idx, b_idx, rest = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
    _, node_idx = best_match(gather_tokens(unit, a_idx), gather_tokens(unit, b_idx))
    device = unit.device
    n_rest = t - 2 * r
    slot_rest = torch.arange(n_rest, device=device)
    slot_b = torch.arange(r, device=device) + n_rest
    return _assign([(rest, slot_rest), (b_idx, slot_b), (a_idx, node_idx + n_rest)], t), t - r


@register_method
class PiToMe(ReductionMethod):
    name = "pitome"
    site = Site.BLOCK_MID
    needs = frozenset({Need.KEYS})
    summary = "PiToMe: energy-ranked token merging that protects isolated (low-energy) tokens"
    params = {
        "keep_ratio": Param(1.0, "fraction of the unprotected tokens kept in every block, in (0, 1]; "
                                 "r = floor(T - T*keep_ratio), clamped to T // 2", fraction(), aliases=("ratio",)),
        "margin": Param(None, "energy margin: None = upstream's 0.75*(1 - l/L), a number for every block, or a "
                              "per-block list", check_margin),
        "alpha": Param(1.0, "ELU saturation of the energy for similarities below the margin", check_alpha),
        "bsm_layers": Param(None, "blocks using the bipartite variant (the rest protect low-energy tokens): None "
                                  "= the first ceil(L/2), an int k = the first k, or a list of indices",
                            check_bsm_layers),
        "prop_attn": Param(False, "proportional attention: add log(size) to the attention logits", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.ratio = float(params["keep_ratio"])
        self.alpha = float(params["alpha"])
        self.margins = margin_schedule(params["margin"], geometry.num_blocks)
        self.bsm = bsm_blocks(params["bsm_layers"], geometry.num_blocks)

    def acts_at(self, layer: int) -> bool:
        return self.ratio < 1.0

    def reduce(self, state: TokenState) -> TokenState:
        p = state.num_prefix
        t = state.num_tokens - p
        r = pitome_r(t, self.ratio)
        if r <= 0:
            return state
        with torch.no_grad():
            metric = state.keys[:, p:]
            energy = energy_score(metric, self.margins[state.layer], self.alpha)
            order = energy.argsort(dim=-1, descending=True, stable=True)
            unit = F.normalize(metric, dim=-1)
            variant = energy_bipartite_assign if state.layer in self.bsm else energy_protected_assign
            assign, num_out = variant(unit, order, r)
        return merge_state(state, with_prefix_slots(assign, p), num_out + p)
