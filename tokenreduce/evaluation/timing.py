"""Timing that means something: synchronised, warmed up, interleaved, the median of repeats; and what ran it."""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from typing import List, Optional, Sequence

import torch

#: Autocast / model dtypes by their command-line names.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``"bf16"`` / ``"fp16"``, a null context for None."""
    if not amp:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


#: Clocks :func:`time_forwards` can read: wall time, or this process's CPU time (all its threads).
CLOCKS = ("wall", "cpu")


def clock_function(clock: str, device: torch.device):
    """``time.perf_counter`` (``"wall"``) or ``time.process_time`` (``"cpu"``: the CPU time of this process, steady on
    a CPU shared with other jobs when torch runs one thread; meaningless for a GPU, so refused there)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "cpu" and torch.device(device).type != "cpu":
        raise ValueError("the cpu clock measures host CPU time: use it for CPU runs only")
    return time.process_time if clock == "cpu" else time.perf_counter


def time_forwards(models: Sequence[torch.nn.Module], x: torch.Tensor, *, iters: int = 1, repeats: int = 5,
                  warmup: int = 2, amp: Optional[str] = None, clock: str = "wall") -> List[float]:
    """Median images per second of each model over ``repeats`` synchronised runs of ``iters`` forwards on ``x``.

    The models take turns within every repeat, so slow drifts of the machine (clocks, other load) hit all of them
    alike and the ratios stay fair. ``clock="cpu"`` times this process's CPU time instead of wall time: on a CPU
    shared with other jobs and with one torch thread, the time the scheduler gives to other processes is then not
    counted (with several threads it counts spinning workers too: use wall time there).
    """
    now = clock_function(clock, x.device)
    rates: List[List[float]] = [[] for _ in models]
    with torch.inference_mode(), autocast(x.device, amp):
        for model in models:
            for _ in range(warmup):
                model(x)
        sync(x.device)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = now()
                for _ in range(iters):
                    model(x)
                sync(x.device)
                rates[i].append(iters * x.shape[0] / (now() - start))
    return [statistics.median(r) for r in rates]


def device_description(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` or ``"x86_64 CPU, 1 thread"``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}"
