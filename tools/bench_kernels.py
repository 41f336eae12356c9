#!/usr/bin/env python3
"""Fused Triton kernels vs their PyTorch references (``tokenreduce.ops``) on a CUDA GPU.

    python tools/bench_kernels.py                          # the full grid: N x B x dtype for every op
    python tools/bench_kernels.py --ops matching --n 577 --b 256 --dtypes bf16
    python tools/bench_kernels.py --out docs/benchmarks/h100-kernels.md

For every op, N in {197, 577, 1025, 4097}, B in {1, 64, 256} and fp16/bf16 it prints the median time of the kernel
and of the reference (``triton.testing.do_bench``, CUDA events; the first kernel call autotunes and is not timed),
the speedup, and the achieved bandwidth of each: the op's *compulsory* bytes (inputs read once, outputs written
once, the same count for both paths) divided by the time, so the reference's extra traffic shows up as a lower
figure. Matching and energy also report TFLOP/s. ``check`` is the largest difference between the two paths (for
matching, the fraction of rows whose index differs: near-ties only).

Workloads (d = 64 is the head dim, ToMe's metric width):
  matching  ToMe's parity split of a unit-norm ``[B, N, d]`` metric (strided views), CLS protected.
  merge     a ToMe assignment with r = round(0.08 N) (16 at N = 197) applied to ``x [B, N, C]``, C = --channels.
  energy    PiToMe's energy of ``[B, N, d]``.

Without a CUDA device the script stops with a message: interpreter timings say nothing about GPU speed.
"""
from __future__ import annotations

import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
import argparse
import math
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=["matching", "merge", "energy"], choices=["matching", "merge", "energy"])
    p.add_argument("--n", nargs="+", type=int, default=[197, 577, 1025, 4097], help="tokens N")
    p.add_argument("--b", nargs="+", type=int, default=[1, 64, 256], help="batch sizes B")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--d", type=int, default=64, help="metric width (head dim) for matching and energy")
    p.add_argument("--channels", type=int, default=768, help="token width C for merge (768: ViT-B)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--out", help="also write the table as Markdown to this file")
    p.add_argument("--smoke", action="store_true",
                   help="exercise the script on the CPU through the Triton interpreter (tiny shapes; the times it "
                        "prints are NOT GPU numbers and must not be reported as such)")
    return p.parse_args(argv)


def tome_r(n: int) -> int:
    return max(1, round(0.08 * n))


def make_case(op: str, n: int, b: int, dtype: torch.dtype, args, device: str) -> Dict:
    """Inputs, the two callables, and the op's compulsory bytes and FLOPs."""
    from tokenreduce.kernels import dispatch
    from tokenreduce.ops import matching, merge
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.finfo(dtype).bits // 8
    d = args.d
    if op == "matching":
        metric = torch.randn(b, n, d, device=device, generator=g)
        metric = (metric / metric.norm(dim=-1, keepdim=True)).to(dtype)
        a, bb = metric[:, ::2], metric[:, 1::2]
        na, nb = a.shape[1], bb.shape[1]
        kernel = lambda: dispatch.kernels("matching").best_match(a, bb, 1, 0)  # noqa: E731
        ref = lambda: matching.best_match(a, bb, 1, 0)  # noqa: E731
        bytes_ = b * (n * d * s + na * (s + 8))
        flops = 2.0 * b * na * nb * d
    elif op == "merge":
        c = args.channels
        with dispatch.override("off"):
            match = matching.bipartite_soft_matching(torch.randn(b, n, d, device=device, generator=g), tome_r(n), 1)
        x = torch.randn(b, n, c, device=device, generator=g).to(dtype)
        size = torch.ones(b, n, device=device, dtype=dtype)
        m = match.num_out
        kernel = lambda: dispatch.kernels("merge").merge_weighted(x, size, match.assign, m)  # noqa: E731
        ref = lambda: merge.merge_weighted(x, size, match.assign, m)  # noqa: E731
        bytes_ = b * (n * c * s + n * (s + 8) + m * c * s + m * s)
        flops = 2.0 * b * n * c
    else:
        from tokenreduce.ops import energy
        metric = torch.randn(b, n, d, device=device, generator=g).to(dtype)
        kernel = lambda: dispatch.kernels("energy").energy_score(metric, 0.375, 1.0)  # noqa: E731
        ref = lambda: energy.energy_score(metric, 0.375, 1.0)  # noqa: E731
        bytes_ = b * (n * d * s + n * s)
        flops = 2.0 * b * n * n * d
    return dict(kernel=kernel, ref=ref, bytes=bytes_, flops=flops)


def difference(op: str, got, want) -> str:
    if op == "matching":
        return f"{(got[1] != want[1]).float().mean().item():.1e} idx"
    if op == "merge":
        got, want = got[0], want[0]
    return f"{(got.float() - want.float()).abs().max().item():.1e}"


def timer(smoke: bool) -> Callable[[Callable], float]:
    if smoke:
        def once(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return once
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=ARGS.warmup, rep=ARGS.rep, return_mode="median")
    return bench


def fmt_rate(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


def run(args) -> List[Dict]:
    from tokenreduce.kernels import dispatch
    device = "cpu" if args.smoke else "cuda"
    measure = timer(args.smoke)
    rows = []
    for op in args.ops:
        for dname in args.dtypes:
            for n in args.n:
                for b in args.b:
                    row = dict(op=op, dtype=dname, N=n, B=b)
                    try:
                        case = make_case(op, n, b, DTYPES[dname], args, device)
                        with torch.no_grad(), dispatch.override("off"):
                            want = case["ref"]()
                            got = case["kernel"]()  # autotunes on first use
                            row["check"] = difference(op, got, want)
                            row["t_kernel"] = measure(case["kernel"])
                            row["t_ref"] = measure(case["ref"])
                    except torch.cuda.OutOfMemoryError:
                        row["check"] = "OOM"
                        torch.cuda.empty_cache()
                    if "t_kernel" in row and not args.smoke:  # interpreter times: no rates, no speedups
                        row["speedup"] = row["t_ref"] / row["t_kernel"]
                        row["gbs_kernel"] = case["bytes"] / row["t_kernel"] / 1e6
                        row["gbs_ref"] = case["bytes"] / row["t_ref"] / 1e6
                        row["tflops_kernel"] = case["flops"] / row["t_kernel"] / 1e9
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


HEADER = ["op", "dtype", "N", "B", "kernel ms", "torch ms", "speedup", "kernel GB/s", "torch GB/s",
          "kernel TFLOP/s", "check"]


def cells(row: Dict) -> List[str]:
    t_k, t_r = row.get("t_kernel"), row.get("t_ref")
    return [row["op"], row["dtype"], str(row["N"]), str(row["B"]),
            f"{t_k:.4f}" if t_k is not None else "-", f"{t_r:.4f}" if t_r is not None else "-",
            f"{row['speedup']:.2f}x" if "speedup" in row else "-",
            fmt_rate(row.get("gbs_kernel", math.nan)), fmt_rate(row.get("gbs_ref", math.nan)),
            f"{row['tflops_kernel']:.2f}" if row["op"] != "merge" and "tflops_kernel" in row else "-",
            row.get("check", "-")]


WIDTHS = [9, 5, 5, 4, 10, 10, 8, 12, 11, 14, 12]


def format_row(row: Dict) -> str:
    return " ".join(c.rjust(w) for c, w in zip(cells(row), WIDTHS))


def markdown(rows: List[Dict], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    global ARGS
    ARGS = args = parse_args(argv)
    if args.smoke:
        import os
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
        args.n, args.b = [n for n in args.n if n <= 65] or [33], [b for b in args.b if b <= 2] or [1]
        args.channels = min(args.channels, 48)
        title = "Kernel smoke run on the CPU through the Triton interpreter (timings are NOT GPU measurements)"
    else:
        if not torch.cuda.is_available():
            print("bench_kernels.py measures the Triton kernels on a CUDA GPU, and no CUDA device is available "
                  "here. Nothing was measured. (Use --smoke to exercise the script through the CPU interpreter; "
                  "its times are not GPU numbers.)", file=sys.stderr)
            return 1
        try:
            import triton  # noqa: F401
        except ImportError:
            print("bench_kernels.py needs triton (pip install 'tokenreduce[kernels]').", file=sys.stderr)
            return 1
        props = torch.cuda.get_device_properties(0)
        title = f"Kernel benchmark on {props.name} (torch {torch.__version__}, triton {triton.__version__})"
    print(title)
    print(" ".join(h.rjust(w) for h, w in zip(HEADER, WIDTHS)))
    rows = run(args)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(markdown(rows, title))
        print(f"wrote {args.out}")
    return 0


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
