"""``tokenreduce bench``: throughput of unpatched timm models (SDPA) against patched ones, with the FLOP-implied
speedup beside it.

    tokenreduce bench --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --device cuda \\
        --run tome:r=13 --run tome:r=16 --run "tome:r=[16,-1.0]"
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..evaluation.benchmark import Row, benchmark, format_profile_lines, format_table
from ..evaluation.report import write_rows
from ..evaluation.timing import DTYPES, device_description
from .common import guarded, parse_run


def build_parser(prog: str = "tokenreduce bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="+", default=["vit_small_patch16_224"], help="timm model name(s)")
    p.add_argument("--run", action="append", metavar="METHOD[:k=v,...]",
                   help="a method and its parameters, e.g. tome:r=16 (repeatable; default: tome with r=8, 13, 16)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model and input dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (downloads); default random")
    p.add_argument("--iters", type=int, default=3, help="forwards per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first")
    p.add_argument("--compile", action="store_true", help="torch.compile each model before timing")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile ('eager': Dynamo traces only, for a quick check)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (CPU runs: steady on a shared machine with --threads 1)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each method's reduction steps (eager, after the timing): their share of block "
                        "time and the ops inside them")
    p.add_argument("--json", dest="json_path", help="write the rows as JSON (and CSV beside it)")
    return p


@guarded
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    runs = [parse_run(s) for s in (args.run or ["tome:r=8", "tome:r=13", "tome:r=16"])]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device: {device_description(device)}; torch {torch.__version__}")
    rows: List[Row] = []
    for name in args.model:
        rows += benchmark(name, runs, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                          img_size=args.img_size, pretrained=args.pretrained, iters=args.iters,
                          repeats=args.repeats, warmup=args.warmup, compile=args.compile, profile=args.profile,
                          compile_backend=args.compile_backend, clock=args.clock)
    print(format_table(rows))
    if args.profile:
        print("reduction steps (analysis, the method's reduce, merge/gather, preview), share of the time inside the "
              "blocks:")
        print(format_profile_lines(rows))
    print("GFLOPs as the papers count them (analytic multiply-accumulates per image, fvcore convention); "
          "efficiency = measured speedup / FLOP-implied speedup")
    if args.json_path:
        json_path, csv_path = write_rows(Path(args.json_path), rows, {"device": device_description(device),
                                                                      "torch": torch.__version__})
        print(f"wrote {json_path} and {csv_path}")
    return 0
