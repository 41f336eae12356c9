"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025).

At the vision tower's output (the layer LLaVA takes its features from), keep ``dominant`` tokens — CLS plus the
``dominant - 1`` patches the CLS token attends to most (attention summed over heads) — in spatial order, and merge
the rest into ``contextual`` tokens: uniformly spaced targets among the remaining tokens, every other remaining token
assigned to its most key-similar target (cosine of head-averaged keys), each target's hidden state plus the mean of
its assignees. Defaults and semantics reproduce dvlab-research/VisionZip at 3151f6d (see
``../shared/fixtures/visionzip``).

On a tower without a CLS token (Qwen2.5-VL / Qwen3-VL's merged tokens, SigLIP) the dominant tokens are the
``dominant`` tokens that receive the most attention (the mean over all query rows and heads), as the official
VisionZip Qwen2.5-VL code ranks them; there is no CLS slot, so ``dominant + contextual`` is still the number of visual
tokens per image.
"""
from __future__ import annotations

from typing import Any, FrozenSet, NamedTuple, Optional

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import integer
from ..ops.merge import gather_tokens
from ..ops.tower_scores import topk_in_order
from .tower_select import importance_needs, patch_importance


class Contextual(NamedTuple):
    """The contextual merge of the non-dominant tokens.

    Attributes:
        tokens: ``[B, C, D]`` target hidden state plus the mean of its assignees.
        targets: ``[C]`` indices of the targets among the remaining tokens.
        counts: ``[B, C]`` assignees per target (0 for a target nobody joined).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    counts: torch.Tensor


def dominant_indices(cls_attn: torch.Tensor, num_dominant: int) -> torch.Tensor:
    """CLS plus the ``num_dominant - 1`` patches with the highest CLS attention, in ascending (spatial) order.

    Args:
        cls_attn: ``[B, N]`` CLS attention over all tokens (token 0 is CLS; any positive scale of the head sum).
        num_dominant: tokens kept, CLS included (>= 1).

    Returns:
        ``[B, num_dominant]`` int64 indices into the N tokens, ``0`` first, then ascending.
    """
    b = cls_attn.shape[0]
    top = cls_attn[:, 1:].topk(num_dominant - 1, dim=1).indices + 1
    top = top.sort(dim=1).values
    return torch.cat([top.new_zeros(b, 1), top], dim=1)


def remaining_indices(dominant: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, N - D]`` the indices not in ``dominant [B, D]``, in ascending order."""
    b = dominant.shape[0]
    keep = torch.ones(b, n, dtype=torch.bool, device=dominant.device)
    keep.scatter_(1, dominant, False)
    return keep.nonzero()[:, 1].view(b, -1)


def uniform_targets(num_remaining: int, num_contextual: int, device=None) -> torch.Tensor:
    """VisionZip's targets: every ``max(1, M // C)``-th of the M remaining tokens, the first C of them."""
    step = max(1, num_remaining // num_contextual)
    return torch.arange(0, num_remaining, step, device=device)[:num_contextual]


def contextual_merge(hidden: torch.Tensor, keys: torch.Tensor, num_contextual: int) -> Contextual:
    """Merge the remaining tokens into ``num_contextual`` contextual tokens.

    Args:
        hidden: ``[B, M, D]`` hidden states of the remaining (non-dominant) tokens, in original order.
        keys: ``[B, M, d]`` their head-averaged attention keys.
        num_contextual: C, ``1 <= C <= M``.

    Returns:
        :class:`Contextual`. A token joins the target of highest key cosine similarity; a contextual token is the
        target's hidden state plus the plain mean of its assignees (not a mean that includes the target).
    """
    b, m, d = hidden.shape
    targets = uniform_targets(m, num_contextual, hidden.device)
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    unit = keys / keys.norm(dim=-1, keepdim=True)
    others = (~is_target).nonzero()[:, 0]
    sim = unit[:, others] @ unit[:, targets].transpose(1, 2)  # [B, M - C, C]
    assign = sim.argmax(dim=-1)
    summed = hidden.new_zeros(b, num_contextual, d).scatter_add_(
        1, assign.unsqueeze(-1).expand(-1, -1, d), hidden[:, others])
    counts = torch.zeros(b, num_contextual, dtype=torch.long, device=hidden.device).scatter_add_(
        1, assign, torch.ones_like(assign))
    mean = summed / counts.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
    return Contextual(hidden[:, targets] + mean, targets, counts)


def check_budget(num_tokens: int, dominant: int, contextual: int, num_prefix: int = 1) -> Optional[str]:
    """Why ``dominant + contextual`` cannot be taken from ``num_tokens`` tokens (CLS included when ``num_prefix`` is
    1), or None."""
    if dominant > num_tokens:
        if num_prefix:
            return (f"dominant={dominant} (CLS included) exceeds the {num_tokens} tokens of the vision tower "
                    f"({num_tokens - 1} patches + CLS)")
        return f"dominant={dominant} exceeds the {num_tokens} visual tokens of the image"
    if contextual > num_tokens - dominant:
        return (f"contextual={contextual} exceeds the {num_tokens - dominant} tokens left after the {dominant} "
                f"dominant ones ({num_tokens} tokens in all); use contextual <= {num_tokens - dominant}")
    return None


@register_method
class VisionZip(ReductionMethod):
    name = "visionzip"
    site = Site.TOWER_OUT
    needs = frozenset({Need.CLS_ATTN, Need.KEYS, Need.ATTN_ROWS})  # CLS_ATTN with a CLS token, ATTN_ROWS without
    summary = "VisionZip: CLS-attention dominant tokens plus key-similarity contextual merges at the tower output"
    params = {
        "dominant": Param(54, "tokens kept by CLS attention, the CLS token included (paper: 54, 108, 162)",
                          integer(1)),
        "contextual": Param(10, "merged context tokens (paper: 10, 20, 30)", integer(0)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.dominant = int(params["dominant"])
        self.contextual = int(params["contextual"])
        if geometry.num_prefix > 1:
            raise ValueError(f"visionzip keeps one CLS token or none; this tower has {geometry.num_prefix} prefix "
                             "tokens")
        if geometry.num_patches is not None:
            problem = check_budget(geometry.num_patches + geometry.num_prefix, self.dominant, self.contextual,
                                   geometry.num_prefix)
            if problem:
                raise ValueError(f"visionzip: {problem}")

    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        """The keys, and the CLS attention row (a tower with a CLS token) or the attention rows (one without)."""
        return frozenset({Need.KEYS}) | importance_needs(self.geometry)

    def missing_needs_hint(self, missing: FrozenSet[str]) -> str:
        if Need.ATTN_ROWS in missing:
            return ("This tower has no CLS token, so visionzip ranks the dominant tokens by the mean attention they "
                    "receive, which needs the feature layer's attention rows")
        return ""

    def num_output(self, num_tokens: int) -> Optional[int]:
        """Tokens per image after the reduction: ``dominant + contextual`` (whatever the input size)."""
        return self.dominant + self.contextual

    def reduce(self, state: TokenState) -> TokenState:
        """``x [B, N, D]`` (CLS first, or no prefix) -> ``[B, dominant + contextual, D]``: (CLS,) dominant tokens in
        spatial order, contextual tokens in target order. ``kept`` holds ``[B, dominant + contextual]`` indices of
        the kept tokens and the targets; ``size`` counts the tokens each output holds."""
        if state.num_prefix > 1:
            raise ValueError(f"visionzip needs one prefix token (CLS) or none, got {state.num_prefix}")
        n = state.num_tokens
        problem = check_budget(n, self.dominant, self.contextual, state.num_prefix)
        if problem:
            raise ValueError(f"visionzip: {problem}")
        if state.num_prefix == 1:
            dom = dominant_indices(state.cls_attn, self.dominant)
        else:  # no CLS: the tokens that receive the most attention (official VisionZip Qwen2.5-VL code)
            dom = topk_in_order(patch_importance(state, self.name), self.dominant)
        x_dom = gather_tokens(state.x, dom)
        size_dom = gather_tokens(state.size, dom)
        if self.contextual == 0:
            return state.replace(x=x_dom, size=size_dom, source=None, kept=dom)
        rest = remaining_indices(dom, n)
        ctx = contextual_merge(gather_tokens(state.x, rest), gather_tokens(state.keys, rest), self.contextual)
        kept = torch.cat([dom, rest[:, ctx.targets]], dim=1)
        size = torch.cat([size_dom, (ctx.counts + 1).to(state.size.dtype)], dim=1)
        return state.replace(x=torch.cat([x_dom, ctx.tokens], dim=1), size=size, source=None, kept=kept)
