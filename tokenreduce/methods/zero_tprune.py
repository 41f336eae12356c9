"""Zero-TPrune: zero-shot token pruning from the attention graph (Wang, Dedhia, Jha, CVPR 2024, arXiv 2305.17328).

A pruning step runs between block l and block l+1 on block l's output tokens and block l's attention
probabilities ``A [B, H, N, N]``. Prefix tokens are always kept. In order:

1. I′: Weighted PageRank with one iteration, head filter, RMS over heads -> a pre-ranking used to partition.
2. S-stage: the less important half A of the non-prefix tokens is compared with the more important half B by
   cosine similarity of the block's keys; the ``r_sim`` tokens of A most similar to some token of B are dropped.
3. I-stage: Weighted PageRank with the layer's iteration count; the ``r_imp`` least important survivors are
   dropped.

There is no official code; every choice the paper leaves open is documented in docs/methods/zero_tprune.md and
switchable by a named option.
"""
from __future__ import annotations

import numbers
from typing import Any, FrozenSet, List, NamedTuple, Optional, Tuple

import torch

from ..core import Geometry, Need, Param, TokenState, register_method
from ..core.params import choice
from ..ops.pagerank import (DEFAULT_HEAD_FILTER, aggregate_heads, cls_sqrt_n_weight, initial_scores, subgraph,
                            weighted_pagerank, wpr_importance)
from ..ops.pruning import importance_keep, similarity_keep, split_drop
from .pruning import SCHEDULE_PARAMS, PruningMethod


def default_iterations(num_blocks: int) -> List[int]:
    """Zero-TPrune's iteration counts: 30 in the first three blocks, 1 in the last three, 5 elsewhere (the first
    rule wins in models shallower than six blocks)."""
    return [30 if i < 3 else 1 if i >= num_blocks - 3 else 5 for i in range(num_blocks)]


def check_fraction01(v: Any) -> Optional[str]:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0.0 <= v <= 1.0
    return None if ok else f"must be a number in [0, 1], got {v!r}"


def check_iterations(v: Any) -> Optional[str]:
    is_count = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1  # noqa: E731
    if v is None or is_count(v) or (isinstance(v, (list, tuple)) and all(is_count(x) for x in v)):
        return None
    return "iterations must be None (30 / 5 / 1 by depth), an int >= 1, or a list of ints >= 1, one per block"


def check_head_filter(v: Any) -> Optional[str]:
    if v is None:
        return None
    if (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v) and 0 <= v[0] <= v[1]):
        return None
    return "head_filter must be None or a (low, high) variance band with 0 <= low <= high"


class ZeroTPruneStages(NamedTuple):
    """One pruning step, stage by stage (everything is per sample).

    Attributes:
        index: ``[B, N - r_sim - r_imp]`` final selection into the step's input (prefix first, spatial order).
        similarity_index: ``[B, N - r_sim]`` selection after the S-stage.
        pre_importance: ``[B, N]`` I′ scores (None when the S-stage dropped nothing).
        importance: ``[B, N - r_sim]`` I-stage scores of the S-stage survivors (None when it dropped nothing).
    """

    index: torch.Tensor
    similarity_index: torch.Tensor
    pre_importance: Optional[torch.Tensor]
    importance: Optional[torch.Tensor]


def zero_tprune_select(attn: torch.Tensor, keys: torch.Tensor, num_prefix: int, r_sim: int, r_imp: int, *,
                       iterations: int, cls_token: bool = True, cls_init: str = "sqrt_n",
                       head_filter: Optional[Tuple[float, float]] = DEFAULT_HEAD_FILTER,
                       importance_graph: str = "full") -> ZeroTPruneStages:
    """One Zero-TPrune step as a pure function.

    Args:
        attn: ``[B, H, N, N]`` the block's attention probabilities (rows are queries).
        keys: ``[B, N, C]`` the block's keys (heads concatenated or averaged).
        num_prefix: p protected leading tokens.
        r_sim: tokens the S-stage drops (``<= (N - p) // 2``).
        r_imp: tokens the I-stage drops afterwards.
        iterations: PageRank iterations of the I-stage.
        cls_token: whether token 0 is a CLS token.
        cls_init: ``"sqrt_n"`` or ``"uniform"`` start of PageRank.
        head_filter: variance band of the head filter, or None.
        importance_graph: ``"full"`` ranks survivors by PageRank on the block's whole graph; ``"survivors"``
            reruns PageRank on the survivors' sub-graph with renormalised rows.

    Returns:
        :class:`ZeroTPruneStages`.
    """
    b, _, n, _ = attn.shape
    attn = attn.to(torch.float64 if attn.dtype == torch.float64 else torch.float32)
    weight = cls_sqrt_n_weight(n) if (cls_token and cls_init == "sqrt_n") else None
    per_head = weighted_pagerank(attn, 1, initial_scores(n, weight, dtype=attn.dtype, device=attn.device))

    selection = torch.arange(n, device=attn.device).expand(b, n)
    pre = None
    if r_sim > 0:
        pre = aggregate_heads(per_head, head_filter)
        selection = similarity_keep(keys, pre, num_prefix, r_sim)
    after_sim = selection

    importance = None
    if r_imp > 0:
        if importance_graph == "full":
            # The I-stage's first iteration is the I′ iteration: continue from it instead of starting over.
            importance = aggregate_heads(weighted_pagerank(attn, iterations - 1, per_head), head_filter)
            importance = importance.gather(1, selection)
        else:
            importance = wpr_importance(subgraph(attn, selection), iterations, cls_token=cls_token,
                                        cls_init=cls_init, head_filter=head_filter)
        selection = importance_keep(importance, selection, num_prefix, r_imp)
    return ZeroTPruneStages(selection, after_sim, pre, importance)


def block_keys(state: TokenState, mode: str) -> torch.Tensor:
    """``[B, N, C]`` keys for the S-stage: heads concatenated (``[B, H, N, d] -> [B, N, H·d]``) or averaged."""
    if mode == "mean":
        return state.keys
    k = state.keys_per_head
    b, h, n, d = k.shape
    return k.transpose(1, 2).reshape(b, n, h * d)


@register_method
class ZeroTPrune(PruningMethod):
    name = "zero_tprune"
    needs = frozenset({Need.ATTN, Need.KEYS_PER_HEAD, Need.KEYS})
    summary = ("Zero-TPrune: Weighted PageRank on the attention graph + similarity stage; zero-shot pruning "
               "between blocks")
    params = {
        **SCHEDULE_PARAMS,
        "sim_fraction": Param(0.5, "share of each step's drop removed by the similarity (S) stage", check_fraction01),
        "iterations": Param(None, "PageRank iterations per block: None (30 in the first three, 1 in the last "
                                  "three, 5 elsewhere), an int, or a list with one int per block", check_iterations),
        "head_filter": Param(DEFAULT_HEAD_FILTER, "(low, high) band of the per-head variance of N·s kept by the "
                                                  "head filter; None uses every head", check_head_filter),
        "cls_init": Param("sqrt_n", "'sqrt_n': CLS starts with sqrt(N) times the weight of other tokens; "
                                    "'uniform'", choice("sqrt_n", "uniform")),
        "similarity_keys": Param("concat", "keys for the S-stage similarity: 'concat' over heads or 'mean' over "
                                           "heads", choice("concat", "mean"), aliases=("keys",)),
        "importance_graph": Param("full", "I-stage graph: 'full' (block's whole graph) or 'survivors' (rerun on "
                                          "the S-stage survivors' renormalised sub-graph)",
                                  choice("full", "survivors")),
    }

    def __init__(self, geometry: Geometry, **params: Any) -> None:
        super().__init__(geometry, **params)
        d = geometry.num_blocks
        it = params.get("iterations")
        if it is None:
            self.iterations = default_iterations(d)
        elif isinstance(it, (list, tuple)):
            if len(it) != d:
                raise ValueError(f"iterations lists {len(it)} values but the model has {d} blocks")
            self.iterations = [int(v) for v in it]
        else:
            self.iterations = [int(it)] * d
        self.sim_fraction = float(params.get("sim_fraction", 0.5))
        hf = params.get("head_filter", DEFAULT_HEAD_FILTER)
        self.head_filter = (float(hf[0]), float(hf[1])) if hf is not None else None
        self.cls_init = params.get("cls_init", "sqrt_n")
        self.key_mode = params.get("similarity_keys", "concat")
        self.importance_graph = params.get("importance_graph", "full")
        self._needs = frozenset({Need.ATTN, Need.KEYS if self.key_mode == "mean" else Need.KEYS_PER_HEAD})

    def needs_at(self, layer: int, training: bool = False) -> FrozenSet[str]:
        return self._needs if self.acts_at(layer) else frozenset()

    def select(self, state: TokenState, k: int) -> torch.Tensor:
        present = state.num_tokens - state.num_prefix
        r_sim, r_imp = split_drop(present, present - k, self.sim_fraction)
        keys = block_keys(state, self.key_mode) if r_sim > 0 else state.x
        return zero_tprune_select(
            state.attn, keys, state.num_prefix, r_sim, r_imp, iterations=self.iterations[state.layer],
            cls_token=self.geometry.has_class_token, cls_init=self.cls_init, head_filter=self.head_filter,
            importance_graph=self.importance_graph).index
