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
- ``keep_ratio`` with ``layers`` (upstream ``keep_rate`` / ``locations``, the paper's fine-tuned DeiT setting):
  inside block ``layers[j]`` the patch tokens are clustered into ``int(num_patches * keep_ratio ** (j + 1))``
  clusters, ``num_patches`` being the actual input's patch count.

The clustering runs batched on the model's device (``ops.clustering``), with scikit-learn's partitions.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..core import Geometry, Need, Param, ReductionMethod, Site, TokenState, register_method
from ..core.params import boolean, choice, fraction, layer_list
from ..ops.clustering import LINKAGES, agglomerative_clustering, cosine_distance
from ..ops.merge import with_prefix_slots
from ..ops.schedule import parse_r
from .state_ops import merge_state
from .tome import check_r, warn_clamped

#: The paper's reduction blocks for 12-block DeiT models.
DEFAULT_LOCATIONS = (3, 6, 9)


def check_optional_r(r: Any) -> Optional[str]:
    return None if r is None else check_r(r)


def keep_rate_clusters(keep_rate: float, step: int, num_patches: int) -> int:
    """Clusters left after the ``step``-th location (0-based): ``int(num_patches * keep_rate ** (step + 1))`` (the
    official code's expression in Python floats), at least 1. ``num_patches`` is the patch count of the actual
    input, so the schedule follows ``dynamic_img_size``."""
    return max(1, int(num_patches * keep_rate ** (step + 1)))


@register_method
class ATC(ReductionMethod):
    name = "atc"
    site = Site.BLOCK_MID
    needs = frozenset({Need.KEYS})
    summary = "Agglomerative Token Clustering: hierarchical clustering of the keys, clusters merged by size"
    compilable = False  # the merge loop is data-dependent: reduce runs outside a compiled graph
    params = {
        "r": Param(None, "tokens removed per block: int, [r, inflect] or per-block list (exclusive with "
                         "keep_ratio; neither = no reduction); clamped to leave one cluster", check_optional_r),
        "keep_ratio": Param(None, "fraction of the patch tokens kept after each of `layers`, compounding: "
                                  "int(patches * keep_ratio**(j+1)) after the j-th (upstream keep_rate)",
                            fraction(optional=True), aliases=("keep_rate",)),
        "layers": Param(None, "blocks that cluster with keep_ratio (default [3, 6, 9], the paper's DeiT setting; "
                              "upstream locations)", layer_list(), aliases=("locations",)),
        "linkage": Param("average", "cluster distance: average (UPGMA), complete (max) or single (min)",
                         choice(*LINKAGES)),
        "prop_attn": Param(True, "proportional attention: add log(size) to the attention logits", boolean),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        self.linkage: str = params["linkage"]
        r, keep_ratio, layers = params["r"], params["keep_ratio"], params["layers"]
        depth = geometry.num_blocks
        # Either tokens removed per block (the r schedule) or a compounding keep ratio at some blocks.
        self.remove: Optional[List[int]] = None
        self.keep_ratio: Optional[float] = None
        self.steps: Dict[int, int] = {}  # block -> its position among the keep_ratio blocks
        if keep_ratio is None:
            if layers is not None:
                raise ValueError("atc: layers only applies with keep_ratio; for per-block counts pass r as a list")
            self.remove = parse_r(0 if r is None else r, depth)
            if geometry.num_tokens is not None:
                n, limits = geometry.num_patches, []
                for removed in self.remove:
                    limits.append(max(n - 1, 0))
                    n -= min(removed, max(n - 1, 0))
                warn_clamped(self.name, self.remove, limits, "all but one of the non-prefix tokens")
            return
        if r is not None:
            raise ValueError("atc: give either r (tokens removed per block) or keep_ratio (with layers), not both")
        layers = list(DEFAULT_LOCATIONS if layers is None else layers)
        if layers[-1] >= depth:
            raise ValueError(f"atc: layers {layers} out of range for a model with {depth} blocks "
                             f"(valid: 0..{depth - 1})")
        self.keep_ratio = float(keep_ratio)
        self.steps = {layer: j for j, layer in enumerate(layers)}

    def acts_at(self, layer: int) -> bool:
        if self.remove is not None:
            return self.remove[layer] > 0
        return layer in self.steps

    def clusters_at(self, state: TokenState) -> int:
        """Clusters to form from the non-prefix tokens present (their number = no change).

        At least one cluster is left (the official code's clamp); the r schedule removes at most
        ``tokens - 1``, unlike ToMe's clamp to half. The keep_ratio schedule counts the patches of the actual
        input (the summed sizes), so it follows ``dynamic_img_size``.
        """
        t = state.num_tokens - state.num_prefix
        if self.remove is not None:
            return t - min(self.remove[state.layer], max(t - 1, 0))
        patches = int(round(float(state.size[0, state.num_prefix:].sum())))
        return min(keep_rate_clusters(self.keep_ratio, self.steps[state.layer], patches), t)

    def reduce(self, state: TokenState) -> TokenState:
        p = state.num_prefix
        k = self.clusters_at(state)
        if k >= state.num_tokens - p:
            return state
        with torch.no_grad():
            metric = state.keys[:, p:]
            if metric.dtype in (torch.float16, torch.bfloat16):
                metric = metric.float()  # half-precision distances would be riddled with exact ties
            labels = agglomerative_clustering(cosine_distance(metric), k, self.linkage)
        return merge_state(state, with_prefix_slots(labels, p), p + k)
