"""Where a patched model's time goes: the share of block time its reduction steps cost, and the ops inside them.

    prof = reduction_profile(patched_model, x)          # after tokenreduce.patch(...)
    prof.share                                           # reduction steps / time inside the blocks
    prof.ops                                             # [(aten op, seconds per forward), ...] inside the steps

A *reduction step* is everything tokenreduce adds at a reduction site: the analysis the method declared (keys
averaged over heads, the CLS attention row, attention probabilities), the method's ``reduce`` (matching, energy,
clustering, PageRank, ...), applying its result (merge / gather, source tracking) and, for a method acting at a
block's input, the preview pass that captures that block's q / k. It is timed by wrapping the adapter's host
(:class:`~tokenreduce.backbones.layer_host.LayerHost`) for the duration of the profile; block time comes from
forward hooks on the host layers. Everything is removed afterwards: the model is left exactly as it was.

Timings are wall clock, synchronised on CUDA around every step (so a GPU profile serialises the steps: read it
as an upper bound there). The op breakdown comes from one extra forward under :mod:`torch.profiler` and lists the
aten ops by their self time inside the steps.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .timing import clock_function, sync

STEP_LABEL = "tokenreduce::reduction_step"


@dataclass
class StepProfile:
    """One model's reduction cost, medians over the profiled forwards (seconds per forward)."""

    forward_s: float
    blocks_s: float
    reduction_s: float
    steps: int  # reduction steps per forward
    ops: List[Tuple[str, float]] = field(default_factory=list)  # (op, self seconds per forward), largest first
    ops_total_s: float = 0.0  # the reduction steps' time in the profiled forward (the ops' shares are of this)

    @property
    def share(self) -> float:
        """Reduction steps' share of the time spent inside the blocks (0 when nothing was timed)."""
        return self.reduction_s / self.blocks_s if self.blocks_s > 0 else 0.0

    def describe(self, top: int = 5) -> str:
        """``"3.1% of block time in 12 steps (4.2 ms/forward): aten::sort 30%, aten::bmm 22%, ..."``."""
        head = (f"{100 * self.share:.1f}% of block time in {self.steps} steps "
                f"({1e3 * self.reduction_s:.1f} ms per forward)")
        total = sum(t for _, t in self.ops)  # the profiler's own clock: shares of the steps' op time
        if not self.ops or total <= 0:
            return head
        parts = [f"{name.replace('aten::', '')} {100 * t / total:.0f}%" for name, t in self.ops[:top]]
        return head + ": " + ", ".join(parts)


def _host_of(model: nn.Module) -> Any:
    from ..api import _adapter_of, is_patched
    if not is_patched(model):
        raise ValueError("reduction_profile needs a model patched with tokenreduce.patch")
    host = getattr(_adapter_of(model), "host", None)
    if host is None or not hasattr(host, "_reduce"):
        raise ValueError(f"reduction_profile supports adapters with a layer host (timm ViT, HF CLIP); this model's "
                         f"adapter is {type(_adapter_of(model)).__name__}")
    return host


class _Timers:
    """Wraps a host's reduction entry points and hooks its layers; ``remove()`` restores everything."""

    def __init__(self, host: Any, device: torch.device, label: bool, now: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.host, self.device, self.label, self.now = host, device, label, now
        self.reduction = 0.0
        self.blocks = 0.0
        self.steps = 0
        self._depth = 0  # the preview entry point calls _reduce itself: time the outermost call only
        self._starts: Dict[int, float] = {}
        self._handles = []
        self._wrapped = []
        for name in ("_reduce", "_preview_and_reduce"):
            original = getattr(host, name)
            setattr(host, name, self._wrap(original))
            self._wrapped.append(name)
        for layer in host.layers:
            self._handles.append(layer.register_forward_pre_hook(self._block_start))
            self._handles.append(layer.register_forward_hook(self._block_end))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                sync(self.device)
                start = self.now()
                if self.label:
                    with torch.profiler.record_function(STEP_LABEL):
                        out = fn(*args, **kwargs)
                else:
                    out = fn(*args, **kwargs)
                sync(self.device)
            finally:
                self._depth -= 1
            self.reduction += self.now() - start
            self.steps += 1
            return out
        return timed

    def _block_start(self, module: nn.Module, args: Any) -> None:
        sync(self.device)
        self._starts[id(module)] = self.now()

    def _block_end(self, module: nn.Module, args: Any, output: Any) -> None:
        sync(self.device)
        self.blocks += self.now() - self._starts.pop(id(module))

    def reset(self) -> None:
        self.reduction, self.blocks, self.steps = 0.0, 0.0, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for name in self._wrapped:
            delattr(self.host, name)  # the instance attribute goes; the class's method shows through again


def _ops_inside_steps(prof: "torch.profiler.profile") -> List[Tuple[str, float]]:
    """Self CPU time of every op whose ancestors include a reduction-step range, summed by op name."""
    totals: Dict[str, float] = {}
    for event in prof.events():
        if event.name == STEP_LABEL:
            continue
        parent, inside = event.cpu_parent, False
        while parent is not None:
            if parent.name == STEP_LABEL:
                inside = True
                break
            parent = parent.cpu_parent
        if inside:
            totals[event.name] = totals.get(event.name, 0.0) + event.self_cpu_time_total * 1e-6
    return sorted(totals.items(), key=lambda kv: -kv[1])


def reduction_profile(model: nn.Module, x: torch.Tensor, *, repeats: int = 3, warmup: int = 1,
                      ops: bool = True, clock: str = "wall") -> StepProfile:
    """Profile a patched model's reduction steps on the input ``x`` (see the module docstring).

    Args:
        model: a model patched with ``tokenreduce.patch`` (timm ViT or another layer-host adapter).
        x: one batch.
        repeats: timed forwards; the medians are reported.
        warmup: untimed forwards first.
        ops: also run one forward under ``torch.profiler`` for the op breakdown (CPU self time).
        clock: ``"wall"`` or ``"cpu"`` (this process's CPU time; see :func:`~tokenreduce.evaluation.timing.time_forwards`).
    """
    host = _host_of(model)
    device = x.device
    now = clock_function(clock, device)
    forward, blocks, reduction, steps = [], [], [], 0
    timers = _Timers(host, device, label=False, now=now)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(max(1, repeats)):
                timers.reset()
                sync(device)
                start = now()
                model(x)
                sync(device)
                forward.append(now() - start)
                blocks.append(timers.blocks)
                reduction.append(timers.reduction)
                steps = timers.steps
    finally:
        timers.remove()
    breakdown: List[Tuple[str, float]] = []
    ops_total = 0.0
    if ops:
        timers = _Timers(host, device, label=True, now=now)
        try:
            with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                model(x)
        finally:
            timers.remove()
        breakdown, ops_total = _ops_inside_steps(p), timers.reduction
    return StepProfile(statistics.median(forward), statistics.median(blocks), statistics.median(reduction), steps,
                       breakdown, ops_total)


def format_profiles(profiles: List[Tuple[str, Optional[StepProfile]]], top: int = 5) -> str:
    """One line per ``(label, profile)``: the share of block time and the largest ops inside the steps."""
    lines = []
    for label, prof in profiles:
        lines.append(f"  {label}: " + ("-" if prof is None else prof.describe(top)))
    return "\n".join(lines)
