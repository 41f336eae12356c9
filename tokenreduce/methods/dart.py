"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
2025): prune image tokens inside the language model during prefill by keeping the ones least duplicated.

Before decoder layer ``layer`` (K), pick pivot tokens by the largest L1 norm of layer K−1's post-RoPE keys (heads
concatenated): ``image_pivots`` among the image tokens and ``text_pivots`` among the tokens after the image. Then,
pivot by pivot, keep the ``per_pivot`` remaining image tokens least cosine-similar to the pivot (on layer K−1's output
passed through the LLM's final norm). Kept: the image pivots plus everything the pivots picked, i.e.
``image_pivots + (image_pivots + text_pivots) · per_pivot`` image tokens, and every non-image token. Defaults
reproduce ZichenWen1/DART at 5a19452 on LLaVA-1.5 (see ``../shared/fixtures/dart``), including the order in which
pivots are visited (CPython set order, ``pivot_order="upstream"``), which decides the kept set.

The method is a pure selection at the ``LLM_LAYER`` site. It declares what it reads: the hidden states ``x [B, S, C]``
entering layer K, ``keys_per_head [B, H, S, d]`` (layer K−1, post-RoPE), ``image_mask [B, S]``, ``valid [B, S]`` (real,
non-padding tokens), ``positions [B, S]`` (each token's index in its own unpadded prompt) and ``normed`` (``x``
through the language model's final norm). It returns the kept tokens with ``kept [B, S']``, sorted indices into the
S tokens; the decoder site (``backbones/decoder.py``) carries positions, masks and the KV cache.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import choice, integer
from .state_ops import select_state

PIVOT_ORDERS = ("upstream", "score", "position")


def resolve_per_pivot(per_pivot: Optional[int], budget: Optional[int], image_pivots: int, text_pivots: int) -> int:
    """Tokens each pivot adds: ``per_pivot`` if given, else upstream's ``budget // (image_pivots + text_pivots)``
    (``max_num_trunction``, default 128; upstream's ``ceil`` of an integer division is that division)."""
    if per_pivot is not None and budget is not None:
        raise ValueError("dart: give per_pivot or budget, not both")
    if per_pivot is not None:
        return per_pivot
    pivots = image_pivots + text_pivots
    if pivots == 0:
        raise ValueError("dart: image_pivots + text_pivots must be >= 1")
    return (128 if budget is None else budget) // pivots


def visit_order(image_pivots: Sequence[int], text_pivots: Sequence[int], order: str) -> List[int]:
    """The order in which pivots pick tokens.

    Args:
        image_pivots / text_pivots: pivot positions (ints, each list in descending key-L1 order).
        order: ``"upstream"`` iterates ``set(image_pivots + text_pivots)`` as CPython does (upstream builds a Python
            set of the positions and loops over it; for these small ints that order depends on the values and the
            insertion history, and it changes which tokens are kept); ``"score"``: image pivots, then text pivots,
            each by descending L1; ``"position"``: ascending position.
    """
    if order == "upstream":
        return list(set(list(image_pivots) + list(text_pivots)))
    if order == "score":
        return list(image_pivots) + list(text_pivots)
    return sorted(set(image_pivots) | set(text_pivots))


def select_sample(normed: torch.Tensor, key_l1: torch.Tensor, image_idx: torch.Tensor, text_idx: torch.Tensor,
                  positions: torch.Tensor, image_pivots: int, text_pivots: int, per_pivot: int,
                  order: str = "upstream") -> torch.Tensor:
    """DART's selection for one sample.

    Args:
        normed: ``[S, C]`` layer K−1 output through the final norm.
        key_l1: ``[S]`` L1 norm of layer K−1's post-RoPE keys, heads concatenated.
        image_idx: ``[M]`` ascending indices of the image tokens.
        text_idx: ``[T]`` ascending indices of the text-pivot candidates (real tokens after the image).
        positions: ``[S]`` the index of each token in the unpadded prompt (what upstream's set is built from).
        image_pivots, text_pivots, per_pivot: counts.
        order: see :func:`visit_order`.

    Returns:
        ``[image_pivots + (image_pivots + text_pivots) · per_pivot]`` kept image-token indices, ascending.
    """
    img_piv = image_idx[key_l1[image_idx].topk(image_pivots).indices]
    txt_piv = text_idx[key_l1[text_idx].topk(text_pivots).indices]
    by_position = {int(positions[i]): int(i) for i in torch.cat([img_piv, txt_piv]).tolist()}
    pivots = [by_position[p] for p in visit_order([int(positions[i]) for i in img_piv.tolist()],
                                                  [int(positions[i]) for i in txt_piv.tolist()], order)]
    candidate = torch.ones(normed.shape[0], dtype=torch.bool, device=normed.device)
    candidate[img_piv] = False
    is_image = torch.zeros_like(candidate)
    is_image[image_idx] = True
    candidate &= is_image
    picked = [img_piv]
    for p in pivots:
        cand = candidate.nonzero()[:, 0]  # ascending, as upstream's list of a set of small ints
        sim = F.cosine_similarity(normed[p].unsqueeze(0), normed[cand], dim=-1)
        take = cand[(-sim).topk(per_pivot).indices]
        candidate[take] = False
        picked.append(take)
    return torch.cat(picked).sort().values


@register_method
class DART(ReductionMethod):
    name = "dart"
    site = Site.LLM_LAYER
    needs = frozenset({Need.KEYS_PER_HEAD, Need.IMAGE_MASK, Need.VALID, Need.POSITIONS, Need.NORMED})
    summary = "DART: prune duplicated image tokens inside the LLM after layer K by cosine to key-norm pivots"
    params = {
        "layer": Param(2, "K: index of the first LLM layer that sees the pruned sequence (upstream pruned_layer)",
                       integer(1)),
        "image_pivots": Param(4, "pivots among the image tokens (upstream pivot_image_token)", integer(0)),
        "text_pivots": Param(4, "pivots among the tokens after the image (upstream pivot_text_token)",
                             integer(0)),
        "per_pivot": Param(None, "image tokens each pivot keeps (upstream TOKEN_TOPK); default budget // pivots",
                           integer(0, optional=True)),
        "budget": Param(None, "upstream max_num_trunction (default 128; paper '128'/'192'/...): per_pivot = "
                              "budget // (image_pivots + text_pivots)", integer(0, optional=True)),
        "pivot_order": Param("upstream", "order pivots pick in: 'upstream' (CPython set order), 'score', "
                                         "'position'", choice(*PIVOT_ORDERS)),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.layer = int(params["layer"])
        self.image_pivots = int(params["image_pivots"])
        self.text_pivots = int(params["text_pivots"])
        self.per_pivot = resolve_per_pivot(params["per_pivot"], params["budget"], self.image_pivots,
                                           self.text_pivots)
        self.pivot_order = params["pivot_order"]
        if self.layer >= geometry.num_blocks:
            raise ValueError(f"dart: layer={self.layer} must be below the language model's {geometry.num_blocks} "
                             "layers (layer K is the first decoder layer that runs on the pruned sequence)")
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("dart: image_pivots + text_pivots must be >= 1 (with no pivot every image token would "
                             "be dropped)")

    @property
    def num_kept_image_tokens(self) -> int:
        """``image_pivots + (image_pivots + text_pivots) · per_pivot`` (the '128' setting keeps 132)."""
        return self.image_pivots + (self.image_pivots + self.text_pivots) * self.per_pivot

    def acts_at(self, layer: int) -> bool:
        return layer == self.layer

    def select(self, state: TokenState) -> torch.Tensor:
        """``[B, S']`` sorted indices of the kept tokens (every non-image token and the selected image tokens)."""
        x, image, positions, normed = state.x, state.image_mask, state.positions, state.normed
        valid = state.valid if state.valid is not None else torch.ones_like(image)
        key_l1 = state.keys_per_head.abs().sum(dim=(1, 3))  # == L1 norm of the heads-concatenated key
        n_img = image.sum(dim=1)
        if bool((n_img != n_img[0]).any()):
            raise ValueError(f"dart keeps the same number of tokens in every sample, so every sample needs the same "
                             f"number of image tokens; got {n_img.tolist()}")
        m = int(n_img[0])
        if self.num_kept_image_tokens > m:
            raise ValueError(f"dart keeps {self.num_kept_image_tokens} image tokens (image_pivots + (image_pivots "
                             f"+ text_pivots) * per_pivot) but the prompt has only {m}")
        rows = []
        for b in range(x.shape[0]):
            image_idx = image[b].nonzero()[:, 0]
            after = torch.arange(x.shape[1], device=x.device) > image_idx[-1]
            text_idx = (after & valid[b]).nonzero()[:, 0]
            if text_idx.numel() < self.text_pivots:
                raise ValueError(f"dart needs text_pivots={self.text_pivots} tokens after the image but sample {b} "
                                 f"has {text_idx.numel()}")
            kept_img = select_sample(normed[b], key_l1[b], image_idx, text_idx, positions[b], self.image_pivots,
                                     self.text_pivots, self.per_pivot, self.pivot_order)
            keep = ~image[b]
            keep[kept_img] = True
            rows.append(keep.nonzero()[:, 0])
        return torch.stack(rows)

    def reduce(self, state: TokenState) -> TokenState:
        return select_state(state, self.select(state))
