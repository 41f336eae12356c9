"""Batched agglomerative (hierarchical) clustering in PyTorch, on the tensors' own device.

ATC (Haurum et al., "Agglomerative Token Clustering", ECCV 2024) clusters the tokens of every image with
scikit-learn's ``AgglomerativeClustering(metric="precomputed", linkage=...)``, one image at a time on the host.
:func:`agglomerative_clustering` computes the same partitions for a whole batch at once, without leaving the
device and without a Python loop over images.

Algorithm: the textbook greedy loop. Every step merges, in every image at once, the two closest clusters and
updates the distance matrix with the Lance-Williams formula of the linkage (average: size-weighted mean of the
two rows, complete: max, single: min). For these (reducible) linkages the greedy merge heights never decrease,
so the first ``N - K`` greedy merges are exactly the merges below scikit-learn's cut of the full tree at ``K``
clusters: the partitions agree up to ties between equal distances. Each image keeps the minimum of every row,
so a step reads ``O(N)`` per image instead of scanning the ``N x N`` matrix: the closest pair's row, the two
merged rows, and the few rows whose minimum sat in a merged column (for single linkage not even those).

A step is about fifty small tensor operations on ``[B, N]``-sized tensors whatever the batch size, so the batch
comes almost for free; the loop runs ``N - K`` steps. (Merging all reciprocal nearest-neighbour pairs per round
gives the same partitions in fewer, larger steps, but measured slower on CPU at ViT sizes: see
docs/benchmarks/clustering_cpu.md.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LINKAGES = ("average", "complete", "single")


def cosine_distance(metric: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between all pairs of rows: ``metric [B, N, d] -> [B, N, N]`` (rows L2-normalised first).

    Exactly symmetric: the lower triangle mirrors the upper one (a matrix product need not be bitwise
    symmetric, and scikit-learn's precomputed mode reads the upper triangle).
    """
    unit = F.normalize(metric, dim=-1)
    dist = 1.0 - unit @ unit.transpose(-1, -2)
    n = dist.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=dist.device).triu(1)
    return torch.where(upper, dist, dist.transpose(-1, -2))


def agglomerative_clustering(dist: torch.Tensor, num_clusters: int, linkage: str = "average") -> torch.Tensor:
    """Partition every image's points into ``num_clusters`` clusters by agglomerative clustering.

    Args:
        dist: ``[B, N, N]`` symmetric pairwise distances (e.g. :func:`cosine_distance`); the diagonal is ignored.
        num_clusters: K, ``1 <= K <= N``, the same for every image.
        linkage: ``"average"`` (UPGMA: mean of the pairwise distances), ``"complete"`` (max) or ``"single"``
            (min). Cluster sizes are counts of points; no other weights enter the linkage.

    Returns:
        ``assign [B, N]`` int64 in ``[0, K)``: the cluster slot of every point, usable directly with
        ``ops.merge.merge_weighted(x, size, assign, K)``. Slots are ordered by the smallest point index in each
        cluster (slot 0 holds point 0, slot 1 the lowest-indexed point outside cluster 0, ...).

    The partitions equal ``sklearn.cluster.AgglomerativeClustering(n_clusters=K, metric="precomputed",
    linkage=linkage)`` on the same matrix, up to ties between equal distances. scikit-learn reads only the
    upper triangle; both triangles are read here, so pass an exactly symmetric matrix (:func:`cosine_distance`
    returns one). The linkage is computed in float64 (float32 on MPS), as scikit-learn does on the host,
    whatever the input dtype.
    """
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2]:
        raise ValueError(f"dist must be [B, N, N], got {tuple(dist.shape)}")
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; choose one of {', '.join(LINKAGES)}")
    bsz, n = dist.shape[:2]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= max(n, 1):
        raise ValueError(f"num_clusters must be an int in [1, {n}], got {num_clusters!r}")
    if n == 0 or num_clusters == n:
        return torch.arange(n, device=dist.device).expand(bsz, n).clone()
    with torch.no_grad():
        work = dist.to(torch.float32 if dist.device.type == "mps" else torch.float64, copy=True)
        work.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        parent = _greedy_merges(work, n - num_clusters, linkage)
        return _slots_from_parents(parent)


def _greedy_merges(dist: torch.Tensor, num_merges: int, linkage: str) -> torch.Tensor:
    """Run ``num_merges`` greedy merges in place on ``dist [B, N, N]`` (symmetric, +inf diagonal).

    Returns ``parent [B, N]``: merging the clusters whose lowest point indices are ``a < b`` sets
    ``parent[b] = a``, so the slot that survives a merge is always its cluster's lowest point index.

    Invariants after every step, per image: ``dist`` holds the linkage distance between live clusters (the
    columns of merged-away slots are +inf), and ``low[i]`` is the minimum of row i for every live slot i
    (+inf for merged-away slots). The nearest neighbour itself is only looked up for the closest pair.
    """
    bsz, n, _ = dist.shape
    device = dist.device
    inf = float("inf")
    rows = dist.view(bsz * n, n)                                     # row i of image k is rows[k*n + i]
    flat = dist.view(-1)                                             # (k, i, j) is flat[k*n*n + i*n + j]
    row_base = torch.arange(bsz, device=device).unsqueeze(1) * n     # [B, 1]
    col_base = row_base * n + torch.arange(n, device=device) * n     # [B, N]: flat index of (k, i, 0)
    positions = torch.arange(n, device=device).expand(bsz, n)
    parent = positions.clone()
    count = torch.ones(bsz, n, dtype=dist.dtype, device=device)
    low = dist.amin(dim=-1)

    for _ in range(num_merges):
        g = low.argmin(dim=1, keepdim=True)                          # [B, 1] one end of the closest pair
        h = rows.index_select(0, (row_base + g).view(-1)).argmin(dim=1, keepdim=True)
        a, b = torch.minimum(g, h), torch.maximum(g, h)
        ab = torch.cat([a, b], dim=1)
        pair_rows = (row_base + ab).view(-1)
        pair = rows.index_select(0, pair_rows).view(bsz, 2, n)       # rows a and b before the merge
        da, db = pair[:, 0], pair[:, 1]
        if linkage == "average":
            na, nb = count.gather(1, a), count.gather(1, b)
            total = na + nb
            new = (da * na + db * nb) / total                        # scipy's update, same rounding
            count.scatter_(1, a, total)
        elif linkage == "complete":
            new = torch.maximum(da, db)
        else:
            new = torch.minimum(da, db)
        if linkage != "single":
            # Rows whose minimum sat in column a or b: their distance to the merged cluster can only be larger
            # (reducible linkage), so their minimum must be looked up again. Other rows keep theirs.
            stale = (da == low) | (db == low)
        new.scatter_(1, ab, inf)                                     # the diagonal, and b is gone
        rows.index_copy_(0, pair_rows[0::2], new)                   # row a and column a: symmetric exactly
        flat.index_copy_(0, (col_base + a).view(-1), new.view(-1))
        flat.index_fill_(0, (col_base + b).view(-1), inf)            # column b (row b is never read again)
        parent.scatter_(1, b, a)
        low.scatter_(1, b, inf)
        if linkage == "single":
            # min(d(k,a), d(k,b)) is at least every row's old minimum and equals it where it sat at a or b.
            low.scatter_(1, a, new.amin(dim=1, keepdim=True))
        else:
            stale &= low < inf                                       # drop b and slots merged away earlier
            stale.scatter_(1, a, True)
            _rescan(rows, row_base, stale, a, positions, low)
    return parent


def _rescan(rows: torch.Tensor, row_base: torch.Tensor, stale: torch.Tensor, pad: torch.Tensor,
            positions: torch.Tensor, low: torch.Tensor) -> None:
    """Recompute the row minima ``low [B, N]`` of the rows flagged in ``stale [B, N]``, in place.

    The flagged rows are compacted into ``[B, C]`` (C the largest count in the batch; padded with the flagged,
    live slot ``pad [B, 1]``) and read with one gather of ``B*C`` rows.
    """
    bsz = stale.shape[0]
    c = int(stale.sum(dim=1).max())
    target = torch.where(stale, stale.cumsum(dim=1) - 1, c)          # unflagged rows land in a junk column
    sel = pad.repeat(1, c + 1).scatter_(1, target, positions)[:, :c]
    low.scatter_(1, sel, rows.index_select(0, (row_base + sel).view(-1)).view(bsz, c, -1).amin(dim=-1))


def _slots_from_parents(parent: torch.Tensor) -> torch.Tensor:
    """Cluster slot of every point from merge pointers ``parent [B, N]`` (``parent[i] <= i``, roots point to
    themselves): pointer jumping to the roots, then slots numbered by root index."""
    n = parent.shape[1]
    for _ in range(max(1, math.ceil(math.log2(n)))):
        parent = parent.gather(1, parent)
    is_root = parent == torch.arange(n, device=parent.device)
    return (is_root.cumsum(dim=1) - 1).gather(1, parent)
