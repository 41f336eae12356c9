"""Accuracy, FLOPs and throughput of a (patched) model on a labelled dataset, on one process or many.

    metrics = evaluate(model, loader, device="cuda", amp="bf16")
    metrics.top1, metrics.top5, metrics.gflops, metrics.img_per_s

Conventions (those of timm's validate.py, so published numbers can be reproduced):

- top-1 / top-5 are percentages over every image of the dataset exactly once. Under ``torchrun`` each rank reads
  a disjoint shard (:class:`ShardSampler`: no padding duplicates, unlike ``DistributedSampler``'s default) and the
  correct/total counts are summed across ranks, so 1 process and N processes give identical numbers.
- GFLOPs per image are analytic multiply-accumulates (the convention of the papers and fvcore) from
  ``tokenreduce.info(model).macs``, averaged over the evaluated batches (input-dependent methods vary).
- img/s is measured in a separate, synchronised timing pass on one fixed batch (warm-up, then the median of
  several timed runs), never from the accuracy pass, whose time includes data loading.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import api
from .distributed import all_reduce_sum, is_distributed, rank_and_world
from .timing import autocast, time_forwards


@dataclass
class Metrics:
    """Result of :func:`evaluate` (identical on every rank)."""

    top1: float
    top5: float
    images: int
    gflops: float
    img_per_s: Optional[float]

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def _prepare(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _unpatched_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per image of an unpatched model: its adapter's analytic model (the convention of a patched run, so the
    two compare), or, for a model tokenreduce does not support, torch's FLOP counter."""
    try:
        return float(api.count_macs(model, x))
    except (ValueError, TypeError, NotImplementedError):
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x[:1])
        return counter.get_total_flops() / 2.0


@torch.inference_mode()
def accuracy_pass(model: nn.Module, loader: DataLoader, *, device: torch.device, amp: Optional[str] = None,
                  channels_last: bool = False, runner: Optional[nn.Module] = None, progress: bool = True,
                  desc: str = "eval") -> Tuple[float, float, float, float]:
    """``(top-1 correct, top-5 correct, images, MACs summed over images)`` on this rank's shard.

    ``runner`` is what is called (e.g. a ``torch.compile`` wrapper); ``model`` is what ``info`` is asked.
    """
    runner = runner or model
    patched = api.is_patched(model)
    correct1 = correct5 = count = macs = 0.0
    bar = _progress(loader, progress, desc)
    for images, target in bar:
        images, target = _prepare(images, device, channels_last), target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = runner(images)
        k = min(5, logits.shape[-1])
        top = logits.float().topk(k, dim=-1).indices
        hit = top == target[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=-1).sum().item()
        n = images.shape[0]
        count += n
        if patched:
            macs += api.info(model).macs * n
        if progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(top1=f"{100.0 * correct1 / count:.2f}")
    return correct1, correct5, count, macs


def measure_throughput(runner: nn.Module, batch: torch.Tensor, *, device: torch.device, amp: Optional[str] = None,
                       warmup: int = 2, repeats: int = 5, iters: int = 1) -> float:
    """Images per second of forwards on one fixed batch, on this process: ``warmup`` untimed forwards, then the
    median of ``repeats`` synchronised runs of ``iters`` forwards."""
    return time_forwards([runner], batch.to(device), iters=iters, repeats=repeats, warmup=warmup, amp=amp)[0]


def evaluate(model: nn.Module, loader: DataLoader, *, device: Any = "cpu", amp: Optional[str] = None,
             channels_last: bool = False, compile: bool = False, timing: bool = True, timing_warmup: int = 2,
             timing_repeats: int = 5, progress: bool = True, desc: str = "eval") -> Metrics:
    """Top-1, top-5, analytic GFLOPs per image and img/s of ``model`` (patched or not) on ``loader``.

    The loader should iterate this rank's shard (:func:`make_loader`); counts are summed over ranks, so the
    returned metrics cover the whole dataset and are identical on every rank.

    Args:
        model: an ``eval()`` model already on ``device`` (patch it first to evaluate a method).
        loader: yields ``(images, labels)``.
        amp: ``"bf16"`` / ``"fp16"`` autocast, or None for the model's own dtype.
        channels_last: feed NHWC images (and expect the caller to have converted the model).
        compile: run a ``torch.compile`` wrapper of the model (patch before compiling: schedules are static).
        timing: also measure img/s on the first batch (False leaves ``img_per_s`` None).
    """
    device = torch.device(device)
    runner = torch.compile(model) if compile else model
    c1, c5, n, macs = accuracy_pass(model, loader, device=device, amp=amp, channels_last=channels_last,
                                    runner=runner, progress=progress, desc=desc)
    c1, c5, n, macs = all_reduce_sum([c1, c5, n, macs], device)
    if n == 0:
        raise ValueError("the dataset is empty: nothing was evaluated")
    first = _prepare(next(iter(loader))[0], device, channels_last) if len(loader) else None
    if api.is_patched(model):
        gmacs = macs / n / 1e9
    else:
        probe = first if first is not None else _prepare(next(iter(loader.dataset))[0][None], device, channels_last)
        gmacs = _unpatched_macs(model, probe) / 1e9
    rate = None
    if timing:
        # Under torchrun every rank times its own first batch at the same time (after a barrier) and the rates
        # are summed: the throughput of the whole job. A rank with an empty shard contributes 0.
        if is_distributed():
            dist.barrier()
        local = 0.0
        if first is not None:
            local = measure_throughput(runner, first, device=device, amp=amp, warmup=timing_warmup,
                                       repeats=timing_repeats)
        rate = all_reduce_sum([local], device)[0]
    return Metrics(top1=100.0 * c1 / n, top5=100.0 * c5 / n, images=int(n), gflops=gmacs, img_per_s=rate)


def _progress(loader: DataLoader, enabled: bool, desc: str):
    """A tqdm bar on rank 0 (plain iteration elsewhere or when disabled)."""
    if not enabled or rank_and_world()[0] != 0:
        return loader
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but evaluation must not need it
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, unit="batch")


__all__ = ["Metrics", "accuracy_pass", "evaluate", "measure_throughput"]
