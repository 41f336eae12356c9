"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024): inside the language model, after layer K−1, drop the image tokens that the last
prompt token attends to least.

At the site before decoder layer ``layer`` (K): take layer K−1's causal attention probabilities (post-RoPE, softmax
in at least float32) of the **last real prompt token** of each sample, average them over the heads, and keep, per
image, the ``keep`` image tokens with the largest values; every other real token (text before and after the image)
is kept, in the original order (padding is dropped; samples that keep different numbers of tokens are re-padded on
the left). Layers K.. run on the shorter sequence; the kept tokens keep their original
RoPE positions (``positions = "keep"``) and the KV cache of layers >= K holds only them. Pruning happens once, in the
prefill; decode steps are not re-pruned. This is the official HF-LLaVA FastV with KV cache
(pkunlp-icler/FastV ``src/FastV/llava-hf``, see ``../shared/fixtures/fastv``), with its batch-row-0 ranking and
fixed image window replaced by a per-sample ranking over each sample's own image tokens.

The score is one extra ``q·Kᵀ`` of one query row per sample at layer K−1 (the decoder site taps that layer's q/k
projections); every layer keeps its fused attention.
"""
from __future__ import annotations

from typing import Any, List

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import integer, real
from ..ops.llm_tokens import last_real_index, runs, top_indices
from .llm_select import assemble_state, keep_rows

#: FastV's paper setting (K = 2, R = 50%) when no budget is given.
DEFAULT_KEEP_RATIO = 0.5


def image_keep_count(num_tokens: int, keep: Any, keep_ratio: Any, drop_ratio: Any) -> int:
    """Image tokens one image of ``num_tokens`` keeps.

    ``keep``: that many (all of them when the image has fewer); ``keep_ratio``: ``round(n · keep_ratio)``;
    ``drop_ratio`` (upstream ``fastv_r``, the fraction **dropped**): upstream's ``round(n · (1 - fastv_r))``, the
    same float expression, so ``fastv_r = 1 - 64/576`` keeps exactly 64. Python ``round`` (half to even), as
    upstream.
    """
    if keep is not None:
        return min(int(keep), num_tokens)
    if drop_ratio is not None:
        return min(num_tokens, round(num_tokens * (1 - drop_ratio)))
    return min(num_tokens, round(num_tokens * keep_ratio))


def select_image_tokens(scores: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, count) -> torch.Tensor:
    """FastV's selection for one sample.

    Args:
        scores: ``[S]`` head-mean attention of the last prompt token over the S tokens.
        image: ``[S]`` bool visual tokens; valid: ``[S]`` bool real tokens.
        count: ``count(n) -> kept`` for an image of n tokens.

    Returns:
        ``[S]`` bool: every real non-image token, and per image (each maximal run of image tokens) its ``count(n)``
        best tokens by score (equal scores: the earlier token). Padding is dropped (the batch is re-padded to the
        longest sample).
    """
    keep = ~image & valid
    for start, end in runs(image):
        best = top_indices(scores[start:end], count(end - start)) + start
        keep[best] = True
    return keep


@register_method
class FastV(ReductionMethod):
    name = "fastv"
    site = Site.LLM_LAYER
    positions = "keep"
    compilable = False  # per-sample, data-dependent selection (runs of image tokens, counts): outside a graph
    needs = frozenset({Need.ATTN_ROWS, Need.IMAGE_MASK, Need.VALID})
    summary = "FastV: drop the image tokens the last prompt token attends to least at LLM layer K-1 (once, in prefill)"
    params = {
        "layer": Param(2, "K: the first LLM layer that runs on the pruned sequence; the ranking uses layer K-1's "
                          "attention (upstream fastv_k / fast_v_agg_layer)", integer(1),
                       aliases=("fastv_k", "fast_v_agg_layer")),
        "keep": Param(None, "image tokens kept per image (upstream fast_v_attention_rank); give one of keep, "
                            "keep_ratio, drop_ratio (default: keep_ratio 0.5, the paper's R = 50%)",
                      integer(0, optional=True), aliases=("fast_v_attention_rank",)),
        "keep_ratio": Param(None, "fraction of each image's tokens KEPT: round(n * keep_ratio)",
                            real(0.0, 1.0, optional=True), aliases=("ratio",)),
        "drop_ratio": Param(None, "upstream fastv_r, the fraction of each image's tokens DROPPED: keeps "
                                  "round(n * (1 - fastv_r))", real(0.0, 1.0, optional=True), aliases=("fastv_r",)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.layer = int(params["layer"])
        given = [k for k in ("keep", "keep_ratio", "drop_ratio") if params.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"fastv: give one of keep, keep_ratio, drop_ratio (fastv_r), not {' and '.join(given)}; "
                             "note fastv_r is the fraction DROPPED, keep_ratio the fraction kept")
        self.keep = params.get("keep")
        self.drop_ratio = params.get("drop_ratio")
        self.keep_ratio = params.get("keep_ratio")
        if not given:
            self.keep_ratio = DEFAULT_KEEP_RATIO
        if self.layer >= geometry.num_blocks:
            raise ValueError(f"fastv: layer={self.layer} must be below the language model's {geometry.num_blocks} "
                             f"layers (K is the first layer that runs on the pruned sequence)")

    def acts_at(self, layer: int) -> bool:
        return layer == self.layer

    def count(self, num_tokens: int) -> int:
        """Image tokens an image of ``num_tokens`` keeps."""
        return image_keep_count(num_tokens, self.keep, self.keep_ratio, self.drop_ratio)

    def scores(self, state: TokenState) -> torch.Tensor:
        """``[B, S]`` head-mean attention probabilities of each sample's last real token at layer K−1."""
        valid = state.valid if state.valid is not None else torch.ones_like(state.image_mask)
        rows = last_real_index(valid)[:, None]                      # [B, 1]
        return state.attn_rows(rows).mean(dim=1)[:, 0]              # [B, H, 1, S] -> [B, S]

    def select(self, state: TokenState) -> List[torch.Tensor]:
        """Per sample, the ascending indices of the kept tokens."""
        scores = self.scores(state)
        keep = torch.stack([select_image_tokens(scores[b], state.image_mask[b], state.valid[b], self.count)
                            for b in range(state.batch_size)])
        return keep_rows(keep)

    def reduce(self, state: TokenState) -> TokenState:
        if not bool(state.image_mask.any()):
            return state
        return assemble_state(state, self.select(state))
