"""Throughput of unpatched timm models (SDPA) against patched ones, with the FLOP-implied speedup beside it.

    rows = benchmark("vit_base_patch16_224", [("tome", {"r": 13})], batch_size=256, dtype="bf16", device="cuda")

Every configuration is warmed up, then the configurations take turns for ``repeats`` rounds of ``iters``
synchronised forwards each (:func:`~tokenreduce.evaluation.timing.time_forwards`); the median round of each is
reported. The command line is ``tokenreduce bench`` (:mod:`tokenreduce.cli.bench`).

With ``profile=True`` every patched model is also profiled after the timed rounds
(:func:`~tokenreduce.evaluation.profile.reduction_profile`): the share of block time its reduction steps cost
(``Row.reduction_share``) and the ops inside them (``Row.reduction_ops``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import api
from .profile import reduction_profile
from .report import format_params, markdown_table
from .timing import DTYPES, time_forwards


@dataclass
class Row:
    model: str
    method: str
    params: str
    batch_size: int
    dtype: str
    device: str
    img_per_s: float
    gflops: float
    speedup: float
    flop_speedup: float
    efficiency: float  # speedup / flop_speedup: 1.0 means the reduction costs nothing
    reduction_share: Optional[float] = None  # reduction steps / block time (profile=True), None unpatched
    reduction_ms: Optional[float] = None  # reduction steps per forward, milliseconds (profile=True)
    reduction_ops: str = ""  # the largest ops inside the steps, "sort 30%, bmm 22%, ..." (profile=True)


def benchmark(model_name: str, runs: Sequence[Tuple[str, Dict[str, Any]]], *, batch_size: int = 32,
              dtype: str = "fp32", device: str = "cpu", img_size: Optional[int] = None, pretrained: bool = False,
              iters: int = 3, repeats: int = 5, warmup: int = 2, compile: bool = False,
              profile: bool = False, profile_repeats: int = 1, compile_backend: str = "inductor",
              clock: str = "wall") -> List[Row]:
    """Time the unpatched model, then each ``(method, params)`` on copies of the same model and input; with
    ``profile`` also the share of block time each method's reduction steps cost (eager, after the timing)."""
    import timm

    dev = torch.device(device)
    kwargs = {"img_size": img_size} if img_size else {}
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs).to(dev, DTYPES[dtype]).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    hw = img_size or size[-1]
    x = torch.randn(batch_size, size[0], hw, hw, device=dev, dtype=DTYPES[dtype])
    variants = [model] + [api.patch(copy.deepcopy(model), method, **params) for method, params in runs]
    macs = [api.count_macs(m, x) for m in variants]
    timed = [torch.compile(m, backend=compile_backend) for m in variants] if compile else variants
    rates = time_forwards(timed, x, iters=iters, repeats=repeats, warmup=warmup, clock=clock)
    rows = []
    for i, ((method, params), rate, mac) in enumerate(zip([("none", {})] + list(runs), rates, macs)):
        speedup, flop_speedup = rate / rates[0], macs[0] / mac
        row = Row(model_name, method, format_params(params), batch_size, dtype, str(dev), rate, mac / 1e9,
                  speedup, flop_speedup, speedup / flop_speedup)
        if profile and i > 0:
            prof = reduction_profile(variants[i], x, repeats=profile_repeats, warmup=0, clock=clock)
            row.reduction_share, row.reduction_ms = prof.share, 1e3 * prof.reduction_s
            row.reduction_ops = prof.describe(top=4).split(": ", 1)[-1] if prof.ops else ""
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table; the reduction-share column appears when any row was profiled."""
    head = ["model", "method", "params", "batch", "dtype", "img/s", "GFLOPs", "speedup", "FLOP speedup",
            "efficiency"]
    profiled = any(r.reduction_share is not None for r in rows)
    cells = []
    for r in rows:
        row = [r.model, r.method, r.params or "-", r.batch_size, r.dtype, f"{r.img_per_s:.1f}", f"{r.gflops:.2f}",
               f"{r.speedup:.2f}x", f"{r.flop_speedup:.2f}x", f"{r.efficiency:.2f}"]
        if profiled:
            row.append("-" if r.reduction_share is None else f"{100 * r.reduction_share:.1f}%")
        cells.append(row)
    return markdown_table(head + (["reduction share"] if profiled else []), cells)


def format_profile_lines(rows: Sequence[Row]) -> str:
    """Per profiled row: where its reduction steps spend their time (the largest ops)."""
    return "\n".join(f"  {r.model} {r.method} {r.params or '-'}: {100 * r.reduction_share:.1f}% of block time, "
                     f"{r.reduction_ms:.1f} ms per forward" + (f" ({r.reduction_ops})" if r.reduction_ops else "")
                     for r in rows if r.reduction_share is not None)
