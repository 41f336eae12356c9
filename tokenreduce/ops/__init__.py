"""Pure tensor functions: no nn.Module, no model knowledge. The Triton kernels use these as references."""
from .flops import attention_macs, mlp_macs, vit_macs
from .matching import BipartiteMatch, best_match, bipartite_soft_matching, clamp_r
from .merge import gather_tokens, merge_mean, merge_source, merge_weighted
from .schedule import parse_r

__all__ = [
    "BipartiteMatch", "attention_macs", "best_match", "bipartite_soft_matching", "clamp_r", "gather_tokens",
    "merge_mean", "merge_source", "merge_weighted", "mlp_macs", "parse_r", "vit_macs",
]
