"""Deprecated: moved to :mod:`tokenreduce.evaluation` in 0.2 (this module goes away in 0.3)."""
import warnings

from .evaluation.distributed import (ShardSampler, all_reduce_sum, init_distributed, is_distributed,  # noqa: F401
                                     make_loader, rank_and_world)
from .evaluation.evaluate import Metrics, accuracy_pass, evaluate, measure_throughput  # noqa: F401
from .evaluation.timing import AMP_DTYPES  # noqa: F401

warnings.warn("tokenreduce.evaluate moved to tokenreduce.evaluation (e.g. from tokenreduce.evaluation import "
              "evaluate); the old module goes away in 0.3", DeprecationWarning, stacklevel=2)
