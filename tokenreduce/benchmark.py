"""Throughput benchmark: unpatched timm (SDPA) against patched models, with the FLOP-implied speedup beside it.

    python tools/benchmark.py --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --device cuda \\
        --run tome:r=13 --run tome:r=16 --run "tome:r=[16,-1.0]"

Every configuration is warmed up, then the configurations take turns for ``--repeats`` rounds of ``--iters``
synchronised forwards each; the median round of each is reported. Also importable: :func:`benchmark`.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from . import api

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def parse_run(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"tome:r=16,prop_attn=false"`` -> ``("tome", {"r": 16, "prop_attn": False})``; values are YAML."""
    method, _, rest = spec.partition(":")
    params: Dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad parameter {item!r} in {spec!r}: use key=value")
        params[key.strip()] = yaml.safe_load(value)
    return method.strip(), params


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside brackets (so ``r=[16,-1.0]`` stays whole)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in (s.strip() for s in parts) if p]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forwards(models: Sequence[torch.nn.Module], x: torch.Tensor, iters: int, repeats: int,
                  warmup: int) -> List[float]:
    """Median images per second of each model over ``repeats`` synchronised runs of ``iters`` forwards.

    The models take turns within every repeat, so slow drifts of the machine (clocks, other load) hit all of
    them alike and the ratios stay fair.
    """
    rates: List[List[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            for _ in range(warmup):
                model(x)
        _sync(x.device)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                for _ in range(iters):
                    model(x)
                _sync(x.device)
                rates[i].append(iters * x.shape[0] / (time.perf_counter() - start))
    return [statistics.median(r) for r in rates]


def analytic_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs per image of the model as it stands (a patched model reports its own; an unpatched one is measured
    by a zero-reduction patch that is removed again)."""
    patched_here = not api.is_patched(model)
    if patched_here:
        api.patch(model, "tome", r=0)
    try:
        with torch.inference_mode():
            model(x[:1])
        return int(api.info(model).flops)
    finally:
        if patched_here:
            api.unpatch(model)


def benchmark(model_name: str, runs: Sequence[Tuple[str, Dict[str, Any]]], *, batch_size: int = 32,
              dtype: str = "fp32", device: str = "cpu", img_size: Optional[int] = None, pretrained: bool = False,
              iters: int = 3, repeats: int = 5, warmup: int = 2, compile: bool = False) -> List[Row]:
    """Time the unpatched model, then each ``(method, params)`` on the same model and input."""
    import timm

    dev = torch.device(device)
    kwargs = {"img_size": img_size} if img_size else {}
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs).to(dev, DTYPES[dtype]).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    hw = img_size or size[-1]
    x = torch.randn(batch_size, size[0], hw, hw, device=dev, dtype=DTYPES[dtype])

    variants = [model]
    for method, params in runs:
        variants.append(api.patch(copy.deepcopy(model), method, **params))
    macs = [analytic_macs(m, x) for m in variants]
    timed = [torch.compile(m) for m in variants] if compile else variants
    rates = time_forwards(timed, x, iters, repeats, warmup)
    rows = []
    for (method, params), rate, mac in zip([("none", {})] + list(runs), rates, macs):
        speedup, flop_speedup = rate / rates[0], macs[0] / mac
        rows.append(Row(model_name, method, _fmt_params(params), batch_size, dtype, str(dev), rate, mac / 1e9,
                        speedup, flop_speedup, speedup / flop_speedup))
    return rows


def _fmt_params(params: Dict[str, Any]) -> str:
    return ",".join(f"{k}={json.dumps(v)}" for k, v in params.items())


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_table(rows: Sequence[Row]) -> str:
    head = ["model", "method", "params", "batch", "dtype", "img/s", "GFLOPs", "speedup", "FLOP speedup",
            "efficiency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.model} | {r.method} | {r.params or '-'} | {r.batch_size} | {r.dtype} | "
                     f"{r.img_per_s:.1f} | {r.gflops:.2f} | {r.speedup:.2f}x | {r.flop_speedup:.2f}x | "
                     f"{r.efficiency:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenreduce bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["vit_small_patch16_224"], help="timm model name(s)")
    p.add_argument("--run", action="append", metavar="METHOD[:k=v,...]",
                   help="a method and its parameters, e.g. tome:r=16 (repeatable; default: tome with r=8,13,16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (downloads); default random")
    p.add_argument("--iters", type=int, default=3, help="forwards per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile each model before timing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", dest="json_path", help="write the rows as JSON")
    p.add_argument("--csv", dest="csv_path", help="write the rows as CSV")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    args = build_parser().parse_args(argv)
    runs = [parse_run(s) for s in (args.run or ["tome:r=8", "tome:r=13", "tome:r=16"])]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}")
    rows: List[Row] = []
    for name in args.model:
        rows += benchmark(name, runs, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                          img_size=args.img_size, pretrained=args.pretrained, iters=args.iters,
                          repeats=args.repeats, warmup=args.warmup, compile=args.compile)
    print(format_table(rows))
    print("GFLOPs as the papers count them (analytic multiply-adds per image, fvcore convention); "
          "efficiency = measured speedup / FLOP-implied speedup")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"device": device_name(args.device), "torch": torch.__version__,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    if args.csv_path:
        with open(args.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return rows


if __name__ == "__main__":
    main()
