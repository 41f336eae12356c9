"""DivPrune's selection as pure tensor functions: a greedy max–min diversity subset (Alvar et al., "DivPrune:
Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025)."""
from __future__ import annotations

import torch


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` pairwise ``1 - cos`` of ``features [B, N, D]`` (rows divided by their L2 norm, no epsilon, in
    the features' dtype)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    return 1.0 - unit @ unit.transpose(1, 2)


def max_min_select(distance: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max–min subset of ``k`` tokens, in selection order.

    Step 0 picks the token whose nearest neighbour is farthest: for every token j the second-smallest entry of column
    j of ``distance`` (the smallest is its ≈ 0 self-distance). Step i > 0 picks the token whose distance to the
    closest already-chosen token is largest. ``argmax`` takes the first index on exact ties. A chosen token is never
    chosen again (upstream relies on its ≈ 0 self-distance, which only fails for exact duplicates).

    Args:
        distance: ``[B, N, N]`` symmetric distances.
        k: ``1 <= k <= N``.

    Returns:
        ``[B, k]`` indices, in the order chosen.
    """
    b, n, _ = distance.shape
    rows = torch.arange(b, device=distance.device)
    chosen = torch.empty(b, k, dtype=torch.long, device=distance.device)
    first = distance.topk(2, dim=1, largest=False).values[:, 1]  # [B, N] nearest-neighbour distance
    j = first.argmax(dim=1)
    chosen[:, 0] = j
    taken = torch.zeros(b, n, dtype=torch.bool, device=distance.device)
    closest = distance[rows, j]  # [B, N] distance to the nearest chosen token
    for i in range(1, k):
        taken[rows, j] = True
        j = closest.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen[:, i] = j
        closest = torch.minimum(closest, distance[rows, j])
    return chosen
