#!/usr/bin/env python3
"""Micro-benchmark: ATC's clustering step, batched on the device (tokenreduce.ops.clustering) vs the per-image
scikit-learn loop the official code runs.

    python tools/bench_clustering.py                       # CPU, B in {1, 8, 32}, N = 197, key width 64 (ViT-S)
    python tools/bench_clustering.py --device cuda --out docs/benchmarks/clustering_cuda.md

Both sides get the same float32 cosine-distance matrix ``[B, N, N]`` of random head-averaged keys and must return
the cluster label of every token. The scikit-learn side does what upstream does per image: copy the image's
matrix to the host as float64 numpy, ``AgglomerativeClustering(n_clusters=K, metric="precomputed",
linkage=...).fit``, labels back to a tensor on the device. Times are medians over rounds in which the two
contenders take turns (fair under drifting load); CPU time (process time, all threads) is printed beside wall
time because a shared machine inflates wall time. Partitions are checked to agree.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenreduce.ops.clustering import LINKAGES, agglomerative_clustering, cosine_distance  # noqa: E402


def sklearn_loop(dist: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """The official code's step: one scikit-learn call per image on the host."""
    from sklearn.cluster import AgglomerativeClustering
    labels = []
    for d in dist:
        model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
        labels.append(torch.as_tensor(model.fit(d.double().cpu().numpy()).labels_))
    return torch.stack(labels).to(dist.device)


def same_partitions(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two label tensors ``[B, N]`` describe the same partition in every row."""
    for x, y in zip(a.tolist(), b.tolist()):
        if len(set(x)) != len(set(y)) or len(set(zip(x, y))) != len(set(x)):
            return False
    return True


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench(batch: int, tokens: int, width: int, k: int, linkage: str, rounds: int, device: torch.device,
          seed: int) -> Dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    dist = cosine_distance(torch.randn(batch, tokens, width, generator=g)).to(device)
    ours = lambda: agglomerative_clustering(dist, k, linkage)  # noqa: E731
    theirs = lambda: sklearn_loop(dist, k, linkage)  # noqa: E731
    ours(), theirs()  # warm-up (allocator, scikit-learn imports)
    times: Dict[str, List[Tuple[float, float]]] = {"ours": [], "sklearn": []}
    agree = True
    for i in range(rounds):
        order = [("ours", ours), ("sklearn", theirs)]
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            wall, cpu, out = timed(fn, device)
            times[name].append((wall, cpu))
            if name == "ours":
                mine = out
            else:
                ref = out
        agree &= same_partitions(mine.cpu(), ref.cpu())
    med = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
           for name, t in times.items()}
    return {"ours_ms": 1e3 * med["ours"][0], "ours_cpu_ms": 1e3 * med["ours"][1],
            "sk_ms": 1e3 * med["sklearn"][0], "sk_cpu_ms": 1e3 * med["sklearn"][1],
            "speedup": med["sklearn"][0] / med["ours"][0], "agree": agree}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=197, help="N, tokens clustered per image")
    ap.add_argument("--width", type=int, default=64, help="key width (ViT-S head dim: 64)")
    ap.add_argument("--clusters", type=int, nargs="+", default=[181, 138, 99],
                    help="K: 181 = r 16 per block; 138 and 99 about keep rates 0.7 and 0.5")
    ap.add_argument("--linkage", nargs="+", default=list(LINKAGES), choices=LINKAGES)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import sklearn
    env = (f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
           + f"; CPU {cpu_name}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}; "
           f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, scikit-learn {sklearn.__version__}; "
           f"distances float32 [B, {args.tokens}, {args.tokens}] from random keys of width {args.width}; "
           "linkage computed in float64 on both sides; median of "
           f"{args.rounds} alternating rounds")
    header = ("| B | K | linkage | batched wall ms | batched CPU ms | sklearn loop wall ms | sklearn CPU ms | "
              "speedup (wall) | same partitions |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    print(env)
    print(header)
    print(lines[1])
    for batch in args.batch:
        for k in args.clusters:
            for linkage in args.linkage:
                r = bench(batch, args.tokens, args.width, k, linkage, args.rounds, device, args.seed)
                line = (f"| {batch} | {k} | {linkage} | {r['ours_ms']:.2f} | {r['ours_cpu_ms']:.2f} | "
                        f"{r['sk_ms']:.2f} | {r['sk_cpu_ms']:.2f} | {r['speedup']:.1f}x | "
                        f"{'yes' if r['agree'] else 'NO'} |")
                print(line, flush=True)
                lines.append(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(env + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
