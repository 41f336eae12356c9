"""Applications of the library: evaluation (accuracy, GFLOPs, img/s; one process or many), throughput
benchmarks, the Fashion-MNIST data and reference model of the default job."""
from .evaluate import Metrics, accuracy_pass, evaluate, measure_throughput
from .distributed import ShardSampler, all_reduce_sum, init_distributed, is_distributed, make_loader, rank_and_world
from .timing import AMP_DTYPES, DTYPES, autocast, device_description, sync, time_forwards

__all__ = ["AMP_DTYPES", "DTYPES", "Metrics", "ShardSampler", "accuracy_pass", "all_reduce_sum", "autocast",
           "device_description", "evaluate", "init_distributed", "is_distributed", "make_loader",
           "measure_throughput", "rank_and_world", "sync", "time_forwards"]
