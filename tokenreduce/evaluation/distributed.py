"""One process or many under ``torchrun``: the process group, this rank's shard, and sums over ranks."""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` of a dataset: every index exactly once over all ranks.

    ``DistributedSampler`` pads the last shard with duplicates so ranks have equal lengths, which would count some
    images twice; for evaluation each rank simply runs its (at most one shorter) shard.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def init_distributed(device: str) -> torch.device:
    """Join the process group when launched by ``torchrun`` (nccl on CUDA, gloo on CPU); returns this rank's
    device. A plain single-process run returns ``device`` unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world > 1 and not is_distributed():
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list:
    """Sum a few numbers over ranks (float64, so image counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64,
                     device=device if device.type == "cuda" else torch.device("cpu"))
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0, device: Optional[torch.device] = None
                ) -> DataLoader:
    """An ordered evaluation loader over this rank's shard of ``dataset``."""
    rank, world = rank_and_world()
    pin = device is not None and device.type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                      num_workers=workers, pin_memory=pin, persistent_workers=False)
