"""K-Medoids token clustering, as in JoakimHaurum/TokenReduction ("Which Tokens to Use? Investigating Token
Reduction in Vision Transformers", Haurum et al., ICCV 2023 workshops).

Before each of ``layers`` (default 3, 6, 9 in a 12-block ViT) the non-prefix tokens are clustered by K-medoids
weighted by the attention each token received in the previous block (summed over heads and all query rows), and
only the medoids go on: ``[prefix, medoid_0, ..., medoid_{K-1}]`` in the order of the initial medoids (descending
weight). Nothing is averaged; the cluster counts follow :mod:`~tokenreduce.methods.cluster_stages`.

Each medoid stands for its cluster: ``info(model).size`` is the cluster's summed size and ``source`` its members,
so a size-weighted average-pool head weights a medoid by its cluster. Attention is plain (no ``log(size)`` bias)
unless ``prop_attn=True``. Reproduces TokenReduction at 88fe07e with ``equal_weight=False`` (its only
deterministic mode; ``equal_weight=True`` seeds the medoids with ``np.random`` and is not offered), see
``../shared/fixtures/kmedoids`` and docs/methods/kmedoids.md.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core import Geometry, Need, Param, TokenState, register_method
from ..core.params import boolean, integer
from ..ops.kmedoids import kmedoids
from ..ops.merge import gather_tokens, merge_source, with_prefix_slots
from ..ops.pruning import with_prefix
from .cluster_stages import STAGE_PARAMS, ClusterStages


def received_attention(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Attention each non-prefix token received: ``attn [B, H, N, N]`` summed over heads and query rows ->
    ``[B, N - p]`` (upstream: ``attn.sum(1).sum(1)[:, p:]``)."""
    return attn.sum(dim=1).sum(dim=1)[:, num_prefix:]


@register_method
class KMedoids(ClusterStages):
    name = "kmedoids"
    summary = ("K-Medoids token clustering (TokenReduction): before given blocks, keep the attention-weighted "
               "medoids of the tokens")
    needs = frozenset({Need.ATTN})
    params = {
        **STAGE_PARAMS,
        "iterations": Param(3, "K-medoids refinement rounds (upstream cluster_iters)", integer(0),
                            aliases=("cluster_iters",)),
        "prop_attn": Param(False, "proportional attention from the cluster sizes (upstream: off)", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.iterations = int(params.get("iterations", 3))

    def cluster(self, state: TokenState, k: int) -> TokenState:
        p = state.num_prefix
        patches = state.x[:, p:]
        weight = received_attention(state.attn, p)
        medoids = kmedoids(patches, weight, k, self.iterations)
        index = with_prefix(medoids.centers, p)
        assign = with_prefix_slots(medoids.assign, p)
        size = state.size.new_zeros(state.batch_size, p + k).scatter_add_(1, assign, state.size)
        source = merge_source(state.source, assign, p + k) if state.source is not None else None
        return state.replace(x=gather_tokens(state.x, index), size=size, source=source, kept=index)
