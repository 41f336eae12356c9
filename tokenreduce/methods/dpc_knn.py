"""DPC-KNN token clustering, as in JoakimHaurum/TokenReduction ("Which Tokens to Use? Investigating Token
Reduction in Vision Transformers", Haurum et al., ICCV 2023 workshops), after TCFormer (Zeng et al., CVPR 2022).

Before each of ``layers`` (default 3, 6, 9 in a 12-block ViT) the non-prefix tokens entering the block are
clustered by density peaks with k-nearest-neighbour density (:func:`tokenreduce.ops.dpc_knn.dpc_knn`: distances
``||x_i - x_j|| / sqrt(C)``, ``k`` neighbours) and every cluster becomes one token, the mean of its members,
``sum / (count + 1e-6)``; the clusters are ordered by their centre's score. The cluster counts follow
:mod:`~tokenreduce.methods.cluster_stages`.

Training-free, as TokenReduction's ``equal_weight`` mode: every member counts once (upstream's other mode weights
members by ``exp`` of a learned linear score, which exists only after fine-tuning). Sizes and sources are tracked
(the merged token's size is its members' summed size); attention is plain unless ``prop_attn=True``. Upstream adds
unseeded noise to the densities; here ties are broken deterministically (see ``ops/dpc_knn.py``). See
docs/methods/dpc_knn.md for every choice.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core import Geometry, Param, TokenState, register_method
from ..core.params import boolean, integer
from ..ops.dpc_knn import cluster_mean, dpc_knn
from ..ops.merge import merge_source, with_prefix_slots
from .cluster_stages import STAGE_PARAMS, ClusterStages


@register_method
class DPCKNN(ClusterStages):
    name = "dpc_knn"
    summary = ("DPC-KNN token clustering (TokenReduction, TCFormer): before given blocks, merge the tokens into "
               "density-peak clusters")
    needs = frozenset()
    params = {
        **STAGE_PARAMS,
        "k": Param(5, "nearest neighbours of the local density, the token itself included (upstream k_neighbors)",
                   integer(1), aliases=("k_neighbors",)),
        "prop_attn": Param(False, "proportional attention from the cluster sizes (upstream: off)", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.k = int(params.get("k", 5))

    def cluster(self, state: TokenState, k: int) -> TokenState:
        p = state.num_prefix
        patches = state.x[:, p:]
        clusters = dpc_knn(patches, k, self.k)
        merged = cluster_mean(patches, clusters.assign, k)
        assign = with_prefix_slots(clusters.assign, p)
        size = state.size.new_zeros(state.batch_size, p + k).scatter_add_(1, assign, state.size)
        source = merge_source(state.source, assign, p + k) if state.source is not None else None
        return state.replace(x=torch.cat([state.x[:, :p], merged], dim=1), size=size, source=source)
