#!/usr/bin/env python3
"""Serving throughput with and without token reduction: vLLM + the tokenreduce plugin on a random LLaVA.

Builds a random-weight LLaVA-1.5 checkpoint on disk (``--shape llava15-7b``: CLIP ViT-L/14-336 with 576 patches and
a Vicuna-7B-shaped language model; ``--shape tiny`` for a CPU smoke run), then for the unreduced model and each
method spec runs the same requests through ``vllm.LLM`` and reports requests/s, output tokens/s, the prompt length
vLLM schedules, and time to first token (mean and p50/p90 over requests, from vLLM's per-request stats).

    python tools/bench_vllm.py --shape llava15-7b --requests 256 --max-tokens 64          # on a GPU
    python tools/bench_vllm.py --shape tiny --requests 8 --max-tokens 4 --dtype float32   # CPU smoke run

Specs are ``name`` (the method's defaults) or ``name:key=value,key=value`` (values parsed as JSON when they parse):
``visionzip:dominant=54,contextual=10``, ``tome:r=16``. The table goes to stdout, the rows to ``--out`` as JSON.
Needs a venv with vLLM and tokenreduce (docs/serving.md); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_SPECS = ["none", "visionzip:dominant=54,contextual=10", "visionzip:dominant=108,contextual=20",
                 "tome:r=16", "random:keep=64,layers=[0]", "fastervlm:keep=64"]
TINY_SPECS = ["none", "visionzip:dominant=10,contextual=4", "tome:r=8", "random:keep=16,layers=[0]"]


def parse_spec(text: str) -> Optional[Dict[str, Any]]:
    """``"tome:r=16"`` -> ``{"method": "tome", "r": 16}``; ``"none"`` -> None. Lists may be written ``[0,1]``."""
    if text == "none":
        return None
    name, _, rest = text.partition(":")
    spec: Dict[str, Any] = {"method": name}
    for part in _split_top(rest):
        key, _, value = part.partition("=")
        try:
            spec[key] = json.loads(value)
        except json.JSONDecodeError:
            spec[key] = value
    return spec


def _split_top(text: str) -> List[str]:
    """Split on commas outside brackets: ``"a=1,b=[0,1]"`` -> ``["a=1", "b=[0,1]"]``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p]


def build_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["llava15-7b", "tiny"], default="llava15-7b",
                   help="random model to build (default: LLaVA-1.5-7B's shapes)")
    p.add_argument("--text-layers", type=int, default=None, help="override the language model's layer count")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where to write the checkpoint (default: a temporary folder; reused when it holds one)")
    p.add_argument("--specs", nargs="+", default=None,
                   help=f"method specs; default for llava15-7b: {' '.join(DEFAULT_SPECS)}; for tiny: "
                        f"{' '.join(TINY_SPECS)}")
    p.add_argument("--requests", type=int, default=128, help="requests per spec (one image each)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--prompt-words", type=int, default=32, help="text words around the image per prompt")
    p.add_argument("--max-num-seqs", type=int, default=64, help="vLLM's concurrent sequences")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--eager", action="store_true", help="enforce_eager=True (no CUDA graphs / compile)")
    p.add_argument("--warmup", type=int, default=4, help="requests run before timing")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    return p


def make_requests(n: int, words: int, image_size: int, vocab_words: int, seed: int = 0) -> List[Dict[str, Any]]:
    """``n`` prompts with one random image each (text of ``words`` random words, the image in the middle)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        ws = [f"w{i}" for i in rng.randint(0, vocab_words, size=words)]
        text = " ".join(ws[: words // 2] + ["<image>"] + ws[words // 2:])
        image = Image.fromarray((rng.rand(image_size, image_size, 3) * 255).astype("uint8"))
        out.append({"prompt": text, "multi_modal_data": {"image": image}})
    return out


def run_spec(args: argparse.Namespace, model_dir: Path, spec: Optional[Dict[str, Any]],
             requests: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One engine: warm up, then time all requests. Returns the row."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, enforce_eager=args.eager,
              limit_mm_per_prompt={"image": 1}, disable_log_stats=False, seed=0,
              hf_overrides={"tokenreduce": spec} if spec else None,
              **({"gpu_memory_utilization": args.gpu_memory_utilization} if _has_gpu() else {}))
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    if args.warmup:
        llm.generate(requests[: args.warmup], sampling, use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(requests, sampling, use_tqdm=False)
    wall = time.perf_counter() - t
    ttft = [o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) is not None
            and getattr(o.metrics, "first_token_latency", 0.0) > 0]
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {"spec": json.dumps(spec) if spec else "none", "requests": len(outs), "wall_s": round(wall, 3),
           "requests_per_s": round(len(outs) / wall, 3), "output_tokens_per_s": round(generated / wall, 1),
           "prompt_len": len(outs[0].prompt_token_ids),
           "ttft_mean_ms": round(1e3 * statistics.fmean(ttft), 1) if ttft else None,
           "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1) if ttft else None,
           "ttft_p90_ms": round(1e3 * sorted(ttft)[int(0.9 * (len(ttft) - 1))], 1) if ttft else None}
    del llm
    gc.collect()
    with _suppress():
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    return row


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def environment() -> Dict[str, Any]:
    import platform

    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if _has_gpu() else f"CPU ({os.cpu_count()} threads)"
    return {"vllm": vllm.__version__, "torch": torch.__version__, "device": device, "python": platform.python_version()}


def print_table(rows: List[Dict[str, Any]]) -> None:
    cols = ["spec", "prompt_len", "requests_per_s", "output_tokens_per_s", "ttft_mean_ms", "ttft_p50_ms",
            "ttft_p90_ms", "wall_s"]
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c)).ljust(widths[c]) for c in cols))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_args().parse_args(argv)
    import torch

    from tokenreduce.integrations.vllm.checkpoint import Shape, write_checkpoint

    shape = Shape.tiny() if args.shape == "tiny" else Shape.llava15_7b(**(
        {"text_layers": args.text_layers} if args.text_layers else {}))
    if args.shape == "tiny" and args.text_layers:
        shape = Shape(**{**shape.__dict__, "text_layers": args.text_layers})
    specs = [parse_spec(s) for s in (args.specs or (TINY_SPECS if args.shape == "tiny" else DEFAULT_SPECS))]
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-")
        model_dir = Path(tmp.name)
    if not (model_dir / "model.safetensors").exists():
        t = time.perf_counter()
        big = args.shape != "tiny"  # bfloat16 weights, no extra noise: a 7B checkpoint in half the memory
        write_checkpoint(model_dir, shape, dtype=torch.bfloat16 if big else torch.float32, noise=0.0 if big else 0.05)
        print(f"wrote a random {args.shape} LLaVA to {model_dir} in {time.perf_counter() - t:.1f} s", flush=True)
    requests = make_requests(args.requests, args.prompt_words, shape.image_size, shape.vocab_words)
    rows = []
    for spec in specs:
        rows.append(run_spec(args, model_dir, spec, requests))
        print(json.dumps(rows[-1]), flush=True)
    env = environment()
    print(f"\n{env['device']}, vLLM {env['vllm']}, torch {env['torch']}, {args.shape}, dtype {args.dtype}, "
          f"TP {args.tensor_parallel_size}, {args.requests} requests x {args.max_tokens} tokens, "
          f"max_num_seqs {args.max_num_seqs}")
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":  # the guard vLLM's spawned workers need
    sys.exit(main())
