"""ATC: Agglomerative Token Clustering (Haurum et al., ECCV 2024).

Between the attention residual and the MLP of a block, the non-prefix tokens are clustered by agglomerative
(hierarchical) clustering on the cosine distance of the keys averaged over heads, stopped at a target number of
clusters; every cluster becomes one token, the size-weighted mean of its members, and attention is proportional
(``log(size)`` added to the logits). Prefix tokens (CLS, distillation, registers) are never clustered and stay
first. Every reduction re-clusters the current tokens from scratch; existing token sizes do not enter the
linkage.

Two schedules, both faithful to JoakimHaurum/ATC at 227c94b:

- ``r`` (like ToMe: an int, ``[r, inflect]`` or a per-block list): block l removes exactly ``r_l`` tokens. The
  official off-the-shelf patch removes ``r - 1`` tokens per block when the model has a class token (its cluster
  count is computed from the token count including CLS); here ``r`` always means tokens removed.
- ``keep_rate`` with ``locations`` (the paper's fine-tuned DeiT setting): inside block ``locations[j]`` the
  patch tokens are clustered into ``int(num_patches * keep_rate ** (j + 1))`` clusters.

The clustering runs batched on the model's device (``ops.clustering``), with scikit-learn's partitions.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ..ops.clustering import LINKAGES, agglomerative_clustering, cosine_distance
from ..ops.schedule import parse_r
from ..state import TokenState
from .base import Geometry, Param, ReductionMethod, Site
from .registry import register_method
from .tome import check_bool, check_r, merge_state

#: The paper's reduction blocks for 12-block DeiT models.
DEFAULT_LOCATIONS = (3, 6, 9)


def check_optional_r(r: Any) -> Optional[str]:
    return None if r is None else check_r(r)


def check_keep_rate(v: Any) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 < v <= 1.0:
        return "keep_rate must be a number in (0, 1] (fraction of the patch tokens kept after each location)"
    return None


def check_locations(v: Any) -> Optional[str]:
    if v is None:
        return None
    if (isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            and all(i >= 0 for i in v) and all(x < y for x, y in zip(v, v[1:]))):
        return None
    return "locations must be a non-empty, strictly increasing list of block indices >= 0, e.g. [3, 6, 9]"


def check_linkage(v: Any) -> Optional[str]:
    return None if v in LINKAGES else f"linkage must be one of {', '.join(LINKAGES)}"


def keep_rate_targets(keep_rate: float, locations: List[int], num_patches: int) -> Dict[int, int]:
    """Clusters left after each location: ``int(num_patches * keep_rate ** (j + 1))`` (the official code's
    expression, evaluated in Python floats), at least 1."""
    return {loc: max(1, int(num_patches * keep_rate ** (j + 1))) for j, loc in enumerate(locations)}


@register_method
class ATC(ReductionMethod):
    name = "atc"
    site = Site.BLOCK_MID
    needs = frozenset({"keys"})
    summary = "Agglomerative Token Clustering: hierarchical clustering of the keys, clusters merged by size"
    params = {
        "r": Param(None, "tokens removed per block: int, [r, inflect] or per-block list (exclusive with "
                         "keep_rate; neither = no reduction)", check_optional_r),
        "keep_rate": Param(None, "fraction of the patch tokens kept after each location, compounding: "
                                 "int(num_patches * keep_rate**(j+1)) after the j-th", check_keep_rate),
        "locations": Param(None, "blocks that cluster with keep_rate (default [3, 6, 9], the paper's DeiT setting)",
                           check_locations),
        "linkage": Param("average", "cluster distance: average (UPGMA), complete (max) or single (min)",
                         check_linkage),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", check_bool),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.linkage: str = params["linkage"]
        r, keep_rate, locations = params["r"], params["keep_rate"], params["locations"]
        depth = geometry.num_blocks
        # Targets per block: tokens removed (r schedule) or clusters left (keep_rate schedule).
        self.remove: Optional[List[int]] = None
        self.targets: Dict[int, int] = {}
        if keep_rate is None:
            if locations is not None:
                raise ValueError("atc: locations only applies with keep_rate; for per-block counts pass r as a list")
            self.remove = parse_r(0 if r is None else r, depth)
            return
        if r is not None:
            raise ValueError("atc: give either r (tokens removed per block) or keep_rate (with locations), not both")
        locations = list(DEFAULT_LOCATIONS if locations is None else locations)
        if locations[-1] >= depth:
            raise ValueError(f"atc: locations {locations} out of range for a model with {depth} blocks "
                             f"(valid: 0..{depth - 1})")
        if geometry.num_patches is None:
            raise ValueError("atc: keep_rate needs the model's number of patch tokens, which is unknown here; "
                             "pass r instead")
        self.targets = keep_rate_targets(float(keep_rate), locations, geometry.num_patches)

    def acts_at(self, layer: int) -> bool:
        if self.remove is not None:
            return self.remove[layer] > 0
        return layer in self.targets

    def clusters_at(self, layer: int, num_tokens: int) -> int:
        """Clusters to form from ``num_tokens`` unprotected tokens at this block (``num_tokens`` = no change).

        At least one cluster is left (the official code's clamp); the r schedule removes at most
        ``num_tokens - 1`` tokens, unlike ToMe's clamp to half.
        """
        if self.remove is not None:
            return num_tokens - min(self.remove[layer], max(num_tokens - 1, 0))
        return min(self.targets.get(layer, num_tokens), num_tokens)

    def reduce(self, state: TokenState) -> TokenState:
        p = state.num_prefix
        t = state.num_tokens - p
        k = self.clusters_at(state.layer, t)
        if k >= t:
            return state
        with torch.no_grad():
            metric = state.keys[:, p:]
            if metric.dtype in (torch.float16, torch.bfloat16):
                metric = metric.float()  # half-precision distances would be riddled with exact ties
            labels = agglomerative_clustering(cosine_distance(metric), k, self.linkage)
            if p:
                prefix = torch.arange(p, device=labels.device).expand(labels.shape[0], p)
                labels = torch.cat([prefix, labels + p], dim=1)
        return merge_state(state, labels, p + k)
