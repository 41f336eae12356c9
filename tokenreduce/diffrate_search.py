"""Moved: DiffRate's rate search is :mod:`tokenreduce.train.rate_search`, run by the shared trainer
(:mod:`tokenreduce.train.trainer`). This module re-exports its names for one release."""
import warnings

from .train.rate_search import (FLOPS_WEIGHT, FlopCost, RateSearch, SearchConfig, add_arguments, diffrate_method,
                                export_rates, flop_cost, main, rate_flops, search_rates)
from .train.trainer import SyntheticImages, training_data as _dataset  # noqa: F401  (the old private name)

warnings.warn("tokenreduce.diffrate_search moved to tokenreduce.train.rate_search", DeprecationWarning, stacklevel=2)

__all__ = ["FLOPS_WEIGHT", "FlopCost", "RateSearch", "SearchConfig", "SyntheticImages", "add_arguments",
           "diffrate_method", "export_rates", "flop_cost", "main", "rate_flops", "search_rates"]
