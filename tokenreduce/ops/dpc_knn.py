"""DPC-KNN clustering (density peaks with k-nearest-neighbour density) and the cluster mean it is used with.

The clustering of TCFormer (Zeng et al., CVPR 2022), as JoakimHaurum/TokenReduction runs it between ViT blocks and
SparseVLM recycles pruned visual tokens with it. Per sample, on points ``x [N, C]``:

1. ``d_ij = ||x_i - x_j|| / sqrt(C)`` (``torch.cdist``, as upstream, so the rounding is the same);
2. density ``rho_i = exp(-mean_{j in kNN(i)} d_ij²)`` over the ``k`` nearest points, the point itself included;
3. ``delta_i = min_{j denser than i} d_ij``, and the largest distance of the sample for the densest point;
4. centres: the ``K`` largest ``delta · rho``, in descending order (that order is the cluster order);
5. every point joins its nearest centre (ties: the earlier centre); every centre joins itself.

Upstream adds ``torch.rand(...) * 1e-6`` to the densities, unseeded, so that no two are equal. Here "denser" is a
strict total order instead: ``j`` is denser than ``i`` iff ``rho_j > rho_i``, or ``rho_j == rho_i`` and ``j < i``.
Where the noise could not change upstream's result (every recorded fixture) both agree; where it could, upstream
is random and this is deterministic. Equal scores at the centre boundary go to the lower index (stable sort).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .merge import gather_tokens


class Clusters(NamedTuple):
    """``assign [B, N]`` int64 cluster of every point (``0 <= assign < K``); ``centers [B, K]`` int64 index of every
    cluster's centre point, in cluster order."""

    assign: torch.Tensor
    centers: torch.Tensor


def scaled_distances(x: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j|| / sqrt(C)`` for ``x [B, N, C]`` -> ``[B, N, N]`` (``torch.cdist``, upstream's rounding)."""
    return torch.cdist(x, x) / (x.shape[-1] ** 0.5)


def knn_density(dist: torch.Tensor, k: int) -> torch.Tensor:
    """``exp(-mean of the k smallest d_ij²)`` per row of ``dist [B, N, N]`` -> ``[B, N]`` (the row's own zero
    distance is one of the k). ``k`` is clamped to N."""
    nearest = dist.topk(min(k, dist.shape[-1]), dim=-1, largest=False).values
    return (-(nearest ** 2).mean(dim=-1)).exp()


def denser(density: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool: entry ``(i, j)`` says point j is denser than point i, a strict total order on
    ``(density, -index)`` (ties go to the lower index), so exactly one point per sample has no denser point."""
    n = density.shape[-1]
    index = torch.arange(n, device=density.device)
    rho_i, rho_j = density[:, :, None], density[:, None, :]
    return (rho_j > rho_i) | ((rho_j == rho_i) & (index[None, :] < index[:, None])[None])


def dpc_knn(x: torch.Tensor, num_clusters: int, k: int = 5, valid: Optional[torch.Tensor] = None) -> Clusters:
    """Cluster every sample's points into ``num_clusters`` clusters by DPC-KNN.

    Args:
        x: ``[B, N, C]`` points (TokenReduction: the tokens entering a block; SparseVLM: an LLM layer's output
            hidden states of the recycled tokens).
        num_clusters: K, ``1 <= K <= N`` (the same for every sample).
        k: neighbours of the density, the point itself included (TokenReduction 5, SparseVLM K); clamped to N.
        valid: ``[B, N]`` bool, or None (all valid). As upstream's ``token_mask``: distances *to* an invalid point
            become the sample's largest distance + 1 (upstream takes the largest over the whole batch; per sample
            keeps samples independent), invalid points get density 0 (never a centre while enough valid points
            exist) and join cluster 0; give them weight 0 in :func:`cluster_mean`.

    Returns:
        :class:`Clusters` ``(assign [B, N], centers [B, K])``. No gradient (a decision).
    """
    b, n, _ = x.shape
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be an int in [1, {n}], got {num_clusters!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    with torch.no_grad():
        dist = scaled_distances(x)
        if valid is not None:
            far = dist.flatten(1).amax(dim=1)[:, None, None] + 1
            dist = torch.where(valid[:, None, :], dist, far)
        density = knn_density(dist, k)
        if valid is not None:
            density = density * valid.to(density.dtype)
        largest = dist.flatten(1).amax(dim=1)[:, None, None]
        delta = torch.where(denser(density), dist, largest).amin(dim=-1)
        score = delta * density
        centers = score.argsort(dim=-1, descending=True, stable=True)[:, :num_clusters]
        to_centers = gather_tokens(dist, centers)  # [B, K, N]: d(centre, j)
        assign = to_centers.argmin(dim=1)
        slots = torch.arange(num_clusters, device=x.device).expand(b, num_clusters)
        assign = assign.scatter(1, centers, slots)
    return Clusters(assign, centers)


def cluster_mean(x: torch.Tensor, assign: torch.Tensor, num_clusters: int, weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6) -> torch.Tensor:
    """Weighted mean of every cluster with upstream's epsilon: ``sum_i w_i x_i / (sum_i w_i + eps)``.

    Args:
        x: ``[B, N, C]``.
        assign: ``[B, N]`` cluster of every point, in ``[0, K)``.
        num_clusters: K.
        weight: ``[B, N]`` or None (all ones: ``sum(members) / (count + eps)``, TokenReduction's ``equal_weight``
            and SparseVLM's recycling).
        eps: TCFormer's ``1e-6`` (reproduced: the recorded SparseVLM outputs contain it).

    Returns:
        ``[B, K, C]``, computed as upstream: each weight is first normalised by its cluster's total, then the
        normalised contributions are summed (so the rounding is upstream's).
    """
    b, n, c = x.shape
    w = x.new_ones(b, n) if weight is None else weight.to(x.dtype)
    total = w.new_zeros(b, num_clusters).scatter_add_(1, assign, w) + eps
    norm = w / total.gather(1, assign)
    out = x.new_zeros(b, num_clusters, c)
    return out.scatter_add_(1, assign[:, :, None].expand(b, n, c), x * norm[:, :, None])
