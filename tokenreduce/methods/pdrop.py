"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025): drop image tokens in stages inside the language model, ranking them at each stage
boundary by the attention the last instruction token pays them.

At each boundary ``L`` of ``layers`` (before decoder layer L, in the prefill): apply **layer L's** input norm and q/k
projections to the current tokens, RoPE at their current positions, and take the head-mean softmax row of each
sample's **last real prompt token** over the image tokens. Keep the ``int(n · keep_ratio[k])`` best image tokens,
where n is the sample's **original** image-token count (Python ``int()`` of the float product, artefacts included:
``int(576 · 0.3) = 172``), and every other token. After every boundary the tokens are renumbered 0..S'−1
(``positions = "renumber"``): the layers of stage k cache S_k tokens and, in a decode step, each layer places the new
token at its own cache length. This is the official code (Cooperx521/PyramidDrop ``pdrop_forward`` /
``pdrop_rank_drop``, see ``../shared/fixtures/pdrop``) with its per-row bookkeeping made per sample under padding
(upstream crashes with a padding mask, with eager attention and in batched ``generate``) and GQA supported.

The ranking is one extra ``k_proj`` over the current tokens and one ``q·Kᵀ`` row per sample at each boundary (the
decoder site's ``next_attn_rows``); every layer keeps its fused attention.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import either, is_real, layer_list, real
from ..ops.llm_tokens import last_real_index, top_indices
from .llm_select import assemble_state, keep_rows

#: The repository's schedule: 50% / 25% / 12.5% of the image tokens after the three boundaries (lambda = 0.5).
DEFAULT_KEEP_RATIO = (0.5, 0.25, 0.125)


def ratio_list(value: Any) -> Optional[str]:
    """A list of fractions in [0, 1] (the validator of ``keep_ratio``)."""
    if isinstance(value, (list, tuple)) and value and all(is_real(v) and 0.0 <= float(v) <= 1.0 for v in value):
        return None
    return f"must be a non-empty list of numbers in [0, 1], got {value!r}"


def default_layers(num_layers: int) -> List[int]:
    """The repository's boundaries scaled to the model: ``[8, 16, 24]`` of 32 layers -> quarters of ``num_layers``."""
    return [num_layers * k // 4 for k in (1, 2, 3)]


def resolve_schedule(layers: Optional[Sequence[int]], keep_ratio: Any, num_layers: int):
    """``(layers, ratios)`` validated against a model of ``num_layers`` decoder layers.

    ``keep_ratio`` is one fraction per boundary, a single number lambda (stage k keeps lambda**k, the paper's
    geometric schedule) or upstream's ``image_token_ratio_list`` with the leading 1.0 its scripts insert.
    """
    layers = list(default_layers(num_layers) if layers is None else layers)
    if is_real(keep_ratio):
        ratios = [float(keep_ratio) ** (k + 1) for k in range(len(layers))]
    else:
        ratios = [float(r) for r in keep_ratio]
        if len(ratios) == len(layers) + 1 and ratios[0] == 1.0:
            ratios = ratios[1:]  # upstream's list with the scripts' leading 1.0 (stage 0 keeps everything)
    if len(ratios) != len(layers):
        raise ValueError(f"pdrop: keep_ratio has {len(ratios)} entries but layers has {len(layers)} ({layers}); give "
                         "one ratio per boundary")
    bad = [l for l in layers if not 1 <= l <= num_layers - 1]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"pdrop: layers={layers}: every boundary L must be in 1..{num_layers - 1} (the stage "
                         f"boundary between decoder layers L-1 and L; layer L's q/k rank) and appear once")
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"pdrop: keep_ratio={ratios} must not increase (each is a fraction of the ORIGINAL image "
                         "tokens; a stage cannot keep more than the previous one left)")
    return layers, ratios


def stage_keep(num_image: int, ratio: float) -> int:
    """Image tokens kept after a stage: upstream's ``int(n_image * ratio)`` (truncation of the float product)."""
    return int(num_image * ratio)


def select_stage(scores: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """One sample's stage: ``[S]`` bool, every real non-image token (``valid [S]``; padding is dropped) and the
    ``count`` image tokens with the largest ``scores [S]`` (equal scores: the earlier token)."""
    idx = image.nonzero()[:, 0]
    keep = ~image & valid
    keep[idx[top_indices(scores[idx], count)]] = True
    return keep


@register_method
class PyramidDrop(ReductionMethod):
    name = "pdrop"
    site = Site.LLM_LAYER
    positions = "renumber"
    compilable = False  # per-sample, data-dependent selection (runs of image tokens, counts): outside a graph
    needs = frozenset({Need.NEXT_ATTN_ROWS, Need.IMAGE_MASK, Need.VALID})
    summary = ("PyramidDrop: staged image-token dropping inside the LLM by the last instruction token's attention "
               "(layer L's own q/k), positions renumbered per stage")
    params = {
        "layers": Param(None, "stage boundaries L (between decoder layers L-1 and L; upstream layer_list); default "
                              "the quarters of the LLM ([8, 16, 24] of 32)", layer_list(optional=True),
                        aliases=("layer_list",)),
        "keep_ratio": Param(list(DEFAULT_KEEP_RATIO),
                            "fraction of the ORIGINAL image tokens kept after each boundary (upstream "
                            "image_token_ratio_list without its leading 1.0), or one number lambda for lambda**k",
                            either(ratio_list, real(0.0, 1.0)), aliases=("image_token_ratio_list",)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.layers, self.ratios = resolve_schedule(params["layers"], params["keep_ratio"], geometry.num_blocks)
        self.stage = {layer: k for k, layer in enumerate(self.layers)}

    def acts_at(self, layer: int) -> bool:
        return layer in self.stage

    def begin(self, training: bool) -> Any:
        return None  # the carry becomes each sample's original image-token count at the first boundary

    def scores(self, state: TokenState) -> torch.Tensor:
        """``[B, S]`` head-mean attention of each sample's last real token, with layer L's q/k on these tokens."""
        rows = last_real_index(state.valid)[:, None]
        return state.next_attn_rows(rows).mean(dim=1)[:, 0]

    def reduce(self, state: TokenState) -> TokenState:
        image = state.image_mask
        original = state.carry if state.carry is not None else image.sum(dim=1)
        if not bool(image.any()):
            return state.replace(carry=original)
        ratio = self.ratios[self.stage[state.layer]]
        scores = self.scores(state)
        keep = torch.stack([select_stage(scores[b], image[b], state.valid[b], stage_keep(int(original[b]), ratio))
                            for b in range(state.batch_size)])
        return assemble_state(state, keep_rows(keep), carry=original)
