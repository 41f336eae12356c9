"""The schedule JoakimHaurum/TokenReduction's clustering methods share (K-Medoids, DPC-KNN): before each of a few
blocks (``layers``, upstream ``reduction_loc``) the non-prefix tokens are clustered into a number of clusters that
either compounds from the patch count (``keep_ratio``, upstream ``keep_rate``: ``int(N_p · keep_ratio**(j+1))``
before the j-th of those blocks) or is given per stage (``keep``).

The clustering runs *before* block l, on the tokens block l would get, so a method acts at the ``BLOCK_OUT`` site
of block ``l - 1`` (where K-Medoids also reads block ``l - 1``'s attention); block 0 therefore cannot be one of
``layers``. ``N_p`` is the patch count of the actual input, taken at the first stage of every forward and carried
to the later ones (the method's ``carry``): 196 at 224 px with 16 px patches, as upstream's fixed
``patch_embed.num_patches``, and the right count at other sizes (``dynamic_img_size``).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

from ..core import Geometry, Param, ReductionMethod, Site, TokenState
from ..core.params import either, fraction, int_list, integer, layer_list

#: The blocks TokenReduction reduces before in a 12-block DeiT ("the 4th, 7th and 10th block", 0-based 3, 6, 9).
PAPER_LAYERS = (3, 6, 9)


def default_layers(num_blocks: int) -> List[int]:
    """``floor(d/4), floor(d/2), floor(3d/4)`` without block 0 and duplicates: 3, 6, 9 for 12 blocks (the paper's),
    6, 12, 18 for 24, 1, 2, 3 for 4; a 2- or 3-block model gets block 1."""
    layers = sorted({num_blocks * q // 4 for q in (1, 2, 3)} - {0})
    return [layer for layer in layers if layer < num_blocks] or ([1] if num_blocks >= 2 else [])


def compounded_clusters(num_patches: int, keep_ratio: float, stage: int) -> int:
    """``int(num_patches * keep_ratio ** (stage + 1))`` (upstream's Python-float expression), at least 1."""
    return max(1, int(num_patches * keep_ratio ** (stage + 1)))


#: The parameters both methods take.
STAGE_PARAMS: Dict[str, Param] = {
    "keep_ratio": Param(None, "fraction kept per stage, compounding from the patch count: "
                              "int(patches * keep_ratio**(j+1)) clusters before the j-th of `layers` "
                              "(upstream keep_rate); None with keep None: no reduction",
                        fraction(optional=True), aliases=("keep_rate",)),
    "keep": Param(None, "clusters (non-prefix tokens kept) before each of `layers`: one int, or one per layer "
                        "(exclusive with keep_ratio)",
                  either(integer(1, optional=True), int_list(1))),
    "layers": Param(None, "blocks (0-based, >= 1) before which the tokens are clustered; default floor(d/4), "
                          "floor(d/2), floor(3d/4) = 3, 6, 9 for 12 blocks (upstream reduction_loc)",
                    layer_list(), aliases=("reduction_loc",)),
}


class ClusterStages(ReductionMethod):
    """Base of the stage-scheduled clustering methods: resolves ``layers`` / ``keep_ratio`` / ``keep`` once and
    gives every stage its cluster count. Subclasses implement :meth:`cluster`."""

    site = Site.BLOCK_OUT

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        d = geometry.num_blocks
        keep_ratio, keep, layers = params.get("keep_ratio"), params.get("keep"), params.get("layers")
        if keep_ratio is not None and keep is not None:
            raise ValueError(f"{self.name}: give either keep_ratio (compounding fraction) or keep (cluster counts), "
                             "not both")
        self.keep_ratio: Optional[float] = float(keep_ratio) if keep_ratio is not None else None
        self.stages: Dict[int, int] = {}  # block the clustering runs before -> stage index
        self.counts: Optional[List[int]] = None
        if keep_ratio is None and keep is None:
            if layers is not None:
                raise ValueError(f"{self.name}: layers is set but nothing says how many clusters to keep: give "
                                 "keep_ratio or keep")
            return
        layers = list(default_layers(d) if layers is None else layers)
        bad = [layer for layer in layers if not 1 <= layer < d]
        if bad:
            raise ValueError(f"{self.name}: layers {bad} out of range: the clustering runs before a block and needs "
                             f"a block before it, so layers must lie in 1..{d - 1} for this {d}-block model")
        if keep is not None:
            counts = [keep] * len(layers) if isinstance(keep, int) else list(keep)
            if len(counts) != len(layers):
                raise ValueError(f"{self.name}: keep lists {len(counts)} counts but there are {len(layers)} layers "
                                 f"{layers}")
            self.counts = counts
        self.stages = {layer: j for j, layer in enumerate(layers)}
        self._warn_clamped(geometry)

    def planned_counts(self, num_patches: int) -> List[int]:
        """Clusters wanted before each of ``layers`` (in order) for ``num_patches`` patches, before clamping."""
        if self.counts is not None:
            return list(self.counts)
        return [int(num_patches * self.keep_ratio ** (j + 1)) for j in range(len(self.stages))]

    def _warn_clamped(self, geometry: Geometry) -> None:
        """Warn once when a stage cannot have the clusters asked for at the default input size."""
        if geometry.num_patches is None:
            return
        present = geometry.num_patches
        for layer, wanted in zip(sorted(self.stages), self.planned_counts(geometry.num_patches)):
            got = max(1, min(wanted, present))
            if got != wanted and (wanted < 1 or self.counts is not None):
                warnings.warn(f"{self.name}: {wanted} clusters before block {layer} is not possible with {present} "
                              f"non-prefix tokens there at the default input size; clamped to {got}", stacklevel=5)
                return
            present = got

    # -----------------------------------------------------------------------------------------------------------
    def acts_at(self, layer: int) -> bool:
        return layer + 1 in self.stages

    def clusters_at(self, state: TokenState) -> int:
        """Clusters for this stage from the non-prefix tokens present (at most that many, at least one)."""
        present = state.num_tokens - state.num_prefix
        j = self.stages[state.layer + 1]
        if self.counts is not None:
            return max(1, min(self.counts[j], present))
        # No carry: nothing was reduced yet in this forward, so the tokens present are all the patches.
        patches = present if state.carry is None else int(state.carry)
        return min(compounded_clusters(patches, self.keep_ratio, j), present)

    def cluster(self, state: TokenState, k: int) -> TokenState:  # pragma: no cover - abstract
        """``k`` clusters of the non-prefix tokens as a new state (prefix tokens first and unchanged)."""
        raise NotImplementedError

    def reduce(self, state: TokenState) -> TokenState:
        k = self.clusters_at(state)
        present = state.num_tokens - state.num_prefix
        if k >= present:
            return state
        patches = present if state.carry is None else state.carry
        out = self.cluster(state, k)
        return out.replace(carry=patches, kept=out.kept)
