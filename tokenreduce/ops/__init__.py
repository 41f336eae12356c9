"""Pure tensor functions: no nn.Module, no model or method knowledge. The Triton kernels use these as references."""
from .matching import BipartiteMatch, best_match, bipartite_soft_matching, clamp_r
from .merge import gather_tokens, merge_mean, merge_source, merge_weighted, with_prefix_slots
from .schedule import parse_r

__all__ = [
    "BipartiteMatch", "best_match", "bipartite_soft_matching", "clamp_r", "gather_tokens", "merge_mean",
    "merge_source", "merge_weighted", "parse_r", "with_prefix_slots",
]
