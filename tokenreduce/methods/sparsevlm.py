"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
ICML 2025), v1.0 as in the official code (Gumpest/SparseVLMs, ``LlamaDynamicvitModel``; see
``../shared/fixtures/sparsevlm``): text-guided visual-token pruning inside the language model, with recycling.

1. **Raters**, once, from the LLM input embeddings (the site before layer 0, which changes nothing): with ``V`` the
   visual tokens and ``T`` the real text tokens after the (first) image, ``r = softmax_T(V·Tᵀ).mean_V``; the raters
   are the tokens of ``T`` with ``r > mean(r)``. They are followed through every later stage.
2. At each stage, **after** decoder layer ``layers[s]`` (so at the site before layer ``layers[s] + 1``; the last
   layer's output, before the final norm, is a site too): that layer's causal attention probabilities of the rater
   rows (post-RoPE, softmax in at least float32), averaged over heads and raters, score the current visual tokens.
   The ``min(count_s, v − 1)`` best are kept in order; ``count_s`` comes from the official per-stage table chosen by
   ``keep`` (64 / 96 / 128 / 192) or from ``counts``.
3. **Recycling**: of the ``n`` pruned visual tokens, the ``int(n · 0.3) + 1`` best-scored (descending) are clustered
   by DPC-KNN (``tokenreduce.ops.dpc_knn``, k = the cluster count ``int(m / 10) + 1``) on the layer's output hidden
   states and each cluster becomes one token, ``sum / (count + 1e-6)``. The merged tokens are visual tokens placed
   right after the kept visual tokens (in the clusters' centre order) and may be pruned or recycled again later.
4. Positions are renumbered 0..S'−1 after every stage (``positions = "renumber"``); in a decode step every layer
   places the new token at its own cache length.

Upstream's batch-row-0 selection, unseeded clustering noise and fixed image window are replaced by per-sample,
deterministic selection over each sample's own visual tokens (ties: the lower index). The scores are one extra
``q·Kᵀ`` over the rater rows at each pruning layer (the decoder site's ``attn_rows``); every layer keeps its fused
attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, choice, int_list, layer_list
from ..ops.dpc_knn import cluster_mean, dpc_knn
from ..ops.llm_tokens import runs, top_indices
from ..ops.merge import gather_tokens
from .llm_select import assemble_state

#: Official v1.0 visual tokens kept at each of the three stages (after layers 2, 6, 15), by RETAIN_TOKN.
STAGE_TABLE: Dict[int, Tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
DEFAULT_LAYERS = (2, 6, 15)
RECYCLE_FRACTION = 0.3   # upstream: int(n * 0.3) + 1 of the pruned tokens are recycled
TOKENS_PER_CLUSTER = 10  # upstream: int(m / 10) + 1 clusters


@dataclass(frozen=True)
class Carry:
    """What one forward passes from site to site: ``raters [B, S]`` bool over the current tokens and each sample's
    number of images (runs of visual tokens at the input)."""

    raters: torch.Tensor
    images: Tuple[int, ...]


def select_raters(embeds: torch.Tensor, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters of one sample, from the LLM input embeddings.

    Args:
        embeds: ``[S, C]``; image: ``[S]`` bool visual tokens; valid: ``[S]`` bool real tokens.

    Returns:
        ``[S]`` bool: among the real text tokens after the first visual token (upstream: every token after the
        image), those whose relevance ``softmax_T(V·Tᵀ).mean_V`` exceeds its mean. When no token exceeds it (every
        relevance equal, e.g. a single token after the image, where upstream averages an empty set) all candidates
        rate.
    """
    vis = image.nonzero()[:, 0]
    after = torch.arange(image.shape[0], device=image.device) > vis[0]
    cand = (after & valid & ~image).nonzero()[:, 0]
    if cand.numel() == 0:
        raise ValueError("sparsevlm ranks the visual tokens by the text after the image, but a prompt has no real "
                         "token after its image")
    relevance = (embeds[vis] @ embeds[cand].T).softmax(dim=-1).mean(dim=0)  # [T]
    chosen = cand[relevance > relevance.mean()]
    out = torch.zeros_like(image)
    out[chosen if chosen.numel() else cand] = True
    return out


def recycle(points: torch.Tensor) -> torch.Tensor:
    """SparseVLM's token recycling: ``points [m, C]`` (the recycled tokens in descending score order) -> ``[c, C]``
    merged tokens, ``c = int(m / 10) + 1``, by DPC-KNN with ``k = c`` (the point itself among its neighbours),
    members averaged as ``sum / (count + 1e-6)``, clusters in their centres' score order."""
    c = int(points.shape[0] / TOKENS_PER_CLUSTER) + 1
    clusters = dpc_knn(points[None], c, k=c)
    return cluster_mean(points[None], clusters.assign, c)[0]


def stage_sample(x: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, score: torch.Tensor, count: int,
                 recycle_tokens: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One stage for one sample.

    Args:
        x: ``[S, C]`` the pruning layer's output; image: ``[S]`` bool current visual tokens; valid: ``[S]`` bool real
            tokens (padding is dropped); score: ``[S]`` rater attention (only the visual entries are read); count:
            the stage's visual tokens to keep.
        recycle_tokens: recycle the best pruned tokens (v1.0) or just drop them.

    Returns:
        ``(row, made)``: ``row`` the new sequence as indices into the S tokens with ``-1`` for each merged token
        (text before and kept visual tokens in order, the merged tokens, then the rest), ``made [c, C]`` the merged
        tokens.
    """
    vis = image.nonzero()[:, 0]
    v = vis.numel()
    keep = ~image & valid
    made = x.new_zeros(0, x.shape[-1])
    if v == 0:
        return keep.nonzero()[:, 0], made
    s = score[vis]
    top = top_indices(s, min(count, v - 1))
    keep[vis[top]] = True
    pruned = torch.ones(v, dtype=torch.bool, device=x.device)
    pruned[top] = False
    pruned = pruned.nonzero()[:, 0]                       # ascending position among the visual tokens
    if recycle_tokens and pruned.numel():
        m = int(pruned.numel() * RECYCLE_FRACTION) + 1
        chosen = pruned[top_indices(s[pruned], m)]        # descending score
        made = recycle(x[vis[chosen]])
    idx = keep.nonzero()[:, 0]
    end = vis[-1]
    row = torch.cat([idx[idx <= end], idx.new_full((made.shape[0],), -1), idx[idx > end]])
    return row, made


@register_method
class SparseVLM(ReductionMethod):
    name = "sparsevlm"
    site = Site.LLM_LAYER
    positions = "renumber"
    compilable = False  # per-sample, data-dependent selection (runs of image tokens, counts): outside a graph
    needs = frozenset({Need.ATTN_ROWS, Need.IMAGE_MASK, Need.VALID})
    summary = ("SparseVLM v1.0: text-raters' attention prunes visual tokens after LLM layers 2/6/15, pruned tokens "
               "recycled by DPC-KNN")
    params = {
        "keep": Param(192, "upstream RETAIN_TOKN: selects the official per-stage table (64, 96, 128 or 192; the "
                           "kept counts are larger because of recycling)", choice(*STAGE_TABLE),
                      aliases=("retain_token",)),
        "layers": Param(list(DEFAULT_LAYERS), "decoder layers whose OUTPUT is pruned (upstream pruning_loc)",
                        layer_list(optional=False), aliases=("pruning_loc",)),
        "counts": Param(None, "visual tokens kept per image at each stage, instead of the table chosen by keep",
                        int_list(0, optional=True)),
        "recycle": Param(True, "recycle the best pruned tokens by DPC-KNN (v1.0); False just drops them",
                         boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.layers = list(params["layers"])
        num = geometry.num_blocks
        if any(l > num - 1 for l in self.layers):
            raise ValueError(f"sparsevlm: layers={self.layers} prune the output of decoder layers, so each must be "
                             f"<= {num - 1} in this {num}-layer language model (upstream's [2, 6, 15] needs >= 16 "
                             "layers); pass layers=[...] (and counts=[...]) for this model")
        counts = params["counts"]
        if counts is None:
            if len(self.layers) != 3:
                raise ValueError(f"sparsevlm: the table chosen by keep has 3 stages but layers={self.layers}; give "
                                 "counts=[...] with one count per layer")
            counts = STAGE_TABLE[params["keep"]]
        if len(counts) != len(self.layers):
            raise ValueError(f"sparsevlm: counts={list(counts)} needs one entry per layer in layers={self.layers}")
        self.counts = [int(c) for c in counts]
        self.stage = {layer + 1: s for s, layer in enumerate(self.layers)}  # site j = pruned layer + 1
        self.recycle = bool(params["recycle"])

    def acts_at(self, layer: int) -> bool:
        return layer == 0 or layer in self.stage

    def needs_at(self, layer: int, training: bool = False):
        if layer == 0:
            return frozenset({Need.IMAGE_MASK, Need.VALID})
        return frozenset(self.needs) if layer in self.stage else frozenset()

    # -- the site before layer 0: raters -------------------------------------------------------------------------
    def raters(self, state: TokenState) -> Carry:
        image, valid = state.image_mask, state.valid
        rows, images = [], []
        for b in range(state.batch_size):
            if bool(image[b].any()):
                rows.append(select_raters(state.x[b], image[b], valid[b]))
            else:
                rows.append(torch.zeros_like(image[b]))
            images.append(len(runs(image[b])))
        return Carry(torch.stack(rows), tuple(images))

    # -- a pruning stage -----------------------------------------------------------------------------------------
    def scores(self, state: TokenState, raters: torch.Tensor) -> torch.Tensor:
        """``[B, S]``: the head- and rater-mean attention each token receives from the sample's raters."""
        lists = [r.nonzero()[:, 0] for r in raters]
        width = max(1, max(int(l.numel()) for l in lists))
        rows = torch.zeros(len(lists), width, dtype=torch.long, device=raters.device)
        weight = torch.zeros(len(lists), width, dtype=state.x.dtype, device=raters.device)
        for b, l in enumerate(lists):
            if l.numel():
                rows[b, :l.numel()] = l
                rows[b, l.numel():] = l[0]
                weight[b, :l.numel()] = 1.0 / l.numel()
        probs = state.attn_rows(rows).mean(dim=1)                  # [B, Q, S]
        return (probs * weight[:, :, None]).sum(dim=1)

    def reduce(self, state: TokenState) -> TokenState:
        if state.layer == 0:
            return state.replace(carry=self.raters(state))
        carry: Carry = state.carry
        count = self.counts[self.stage[state.layer]]
        scores = self.scores(state, carry.raters)
        rows, made = [], []
        for b in range(state.batch_size):
            row, new = stage_sample(state.x[b], state.image_mask[b], state.valid[b], scores[b], count * max(carry.images[b], 1),
                                    self.recycle)
            rows.append(row)
            made.append(new)
        out = assemble_state(state, rows, made)
        kept = out.kept
        raters = gather_tokens(carry.raters, kept.clamp(min=0)) & (kept >= 0) & out.valid
        return out.replace(carry=Carry(raters, carry.images), kept=kept)
