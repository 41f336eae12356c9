"""The contracts between adapters and methods. Imports nothing else of the package and registers nothing.

- :class:`TokenState` — the tokens at a reduction site; :class:`ReductionInfo` — what ``info()`` reports;
- :class:`ForwardRecord` — the per-forward record every adapter keeps;
- :class:`Site`, :class:`Need` — where a method acts and what it reads;
- :class:`Geometry` — what a method knows of the model; :class:`Param` and the shared validators;
- :class:`ReductionMethod` — the base of every method; the method and adapter registries;
- :class:`AttentionMap` — probabilities a method gives a layer in place of its softmax.
"""
from . import params
from .attention_map import AttentionMap, DenseMap
from .geometry import CostModel, Geometry
from .method import ReductionMethod, all_needs, candidate_sites, run_begin, run_reduce
from .params import Param
from .record import ForwardRecord, LayerRecord, Status, Taps
from .registry import (COMMON_PARAMS, adapters, get_method, list_methods, method_params, register_adapter,
                       register_method, resolve_params)
from .requirements import ATTENTION_NEEDS, NEEDS, Need, Site
from .state import ReductionInfo, TokenState

__all__ = ["ATTENTION_NEEDS", "AttentionMap", "COMMON_PARAMS", "CostModel", "DenseMap", "ForwardRecord", "Geometry",
           "LayerRecord", "NEEDS", "Need", "Param", "ReductionInfo", "ReductionMethod", "Site", "Status", "Taps",
           "TokenState", "adapters", "all_needs", "candidate_sites", "get_method", "list_methods", "method_params",
           "params", "register_adapter", "register_method", "resolve_params", "run_begin", "run_reduce"]
