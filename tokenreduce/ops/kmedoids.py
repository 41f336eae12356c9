"""Attention-weighted K-medoids, as JoakimHaurum/TokenReduction clusters ViT tokens (``k_medoids_fit`` with token
weights).

Per sample, on points ``x [N, C]`` with weights ``w [N]`` (the attention each token received):

1. initial medoids: the ``K`` largest weights, in descending order (the cluster order, kept to the end);
2. ``D = cdist(x, x)`` (Euclidean, ``torch.cdist`` as upstream) and ``W = D · w_i`` (row i scaled by ``w_i``);
3. ``iterations`` times: assign every point to its nearest medoid (``argmin_k D[i, c_k]``, ties to the earlier
   medoid), then, with that assignment fixed, move every medoid to ``argmin_{i in cluster k} sum_j W[i, j]``:
   the sum runs over **all** points j, not only the cluster's members (upstream's cost). A point outside the
   cluster costs ``N · 1e6`` (upstream overwrites its row with 1e6), so an empty cluster picks point 0.

Equal weights at the initial top-K boundary go to the lower index (stable sort); upstream's ``topk`` agrees
whenever the weights differ there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

#: What upstream writes into the rows outside a cluster before summing them.
OUTSIDE = 1e6


class Medoids(NamedTuple):
    """``centers [B, K]`` int64 index of every cluster's medoid, in cluster order; ``assign [B, N]`` int64 cluster
    of every point under the final medoids (every medoid in its own, first, cluster)."""

    centers: torch.Tensor
    assign: torch.Tensor


def nearest_medoid(dist: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``argmin_k dist[i, c_k]`` for ``dist [B, N, N]``, ``centers [B, K]`` -> ``[B, N]`` (ties: smaller k)."""
    b, n, _ = dist.shape
    return dist.gather(2, centers[:, None, :].expand(b, n, centers.shape[1])).argmin(dim=-1)


def update_medoids(row_cost: torch.Tensor, assign: torch.Tensor, num_clusters: int, outside: torch.Tensor
                   ) -> torch.Tensor:
    """One medoid update: per cluster the member with the smallest ``row_cost`` (``[B, N]``), non-members costing
    ``outside`` (a 0-d tensor), ties and empty clusters to the lowest index -> ``centers [B, K]``."""
    slots = torch.arange(num_clusters, device=assign.device)
    member = assign[:, None, :] == slots[None, :, None]                          # [B, K, N]
    return torch.where(member, row_cost[:, None, :], outside).argmin(dim=-1)


def own_cluster(assign: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``assign`` with every medoid moved into its own cluster (the first one, should two clusters share a medoid),
    so no cluster that has a medoid is empty."""
    n = assign.shape[1]
    is_medoid = centers[:, :, None] == torch.arange(n, device=assign.device)[None, None, :]   # [B, K, N]
    first = is_medoid.to(torch.uint8).argmax(dim=1)                                        # [B, N]
    return torch.where(is_medoid.any(dim=1), first, assign)


def kmedoids(x: torch.Tensor, weight: torch.Tensor, num_clusters: int, iterations: int = 3) -> Medoids:
    """Weighted K-medoids of every sample's points (TokenReduction's ``k_medoids_fit`` with token weights).

    Args:
        x: ``[B, N, C]`` points (the tokens entering a block).
        weight: ``[B, N]`` non-negative weights (the attention each token received, summed over heads and queries).
        num_clusters: K, ``1 <= K <= N``.
        iterations: refinement rounds (upstream ``cluster_iters``, 3 in its ``train.py``).

    Returns:
        :class:`Medoids`. No gradient (a decision). Memory ``O(B·N·(N + K))``.
    """
    b, n, _ = x.shape
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be an int in [1, {n}], got {num_clusters!r}")
    with torch.no_grad():
        centers = weight.argsort(dim=-1, descending=True, stable=True)[:, :num_clusters]
        dist = torch.cdist(x, x)
        row_cost = (dist * weight[:, :, None].to(dist.dtype)).sum(dim=-1)   # sum_j W[i, j]
        outside = dist.new_full((n,), OUTSIDE).sum()                         # a row of 1e6 summed, as upstream
        for _ in range(iterations):
            centers = update_medoids(row_cost, nearest_medoid(dist, centers), num_clusters, outside)
        assign = own_cluster(nearest_medoid(dist, centers), centers)
    return Medoids(centers, assign)
