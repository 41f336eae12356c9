#!/usr/bin/env python3
"""Selection cost per image of the tower-output methods (FasterVLM, VisPruner, DivPrune, CDPruner, pool, random) at
LLaVA-1.5-7B widths, without the model: ``method.reduce`` on a synthetic token state shaped like CLIP-L/14-336's
feature layer (577 tokens, width 1024, 16 heads) with projected features of width 4096. CDPruner gets a random
CLIP-L-shaped text tower (12 layers x 768, written once to ``--clip-dir``) and a 16-token instruction.

    python tools/bench_tower_selection.py --threads 1                 # CPU, float32
    python tools/bench_tower_selection.py --device cuda --dtype bfloat16

Prints a markdown table: median milliseconds of ``reduce`` per image over ``--repeats`` runs after a warm-up (CPU time
of this process with ``--clock cpu``), and the projector's time on the 576 tokens for scale.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import tokenreduce
from tokenreduce.backbones.layer_host import attention_probs
from tokenreduce.core import Geometry, Site, TokenState

METHODS = ("fastervlm", "vispruner", "divprune", "cdpruner", "pool", "random")


def random_clip(path: str) -> str:
    """A random CLIPModel with CLIP-L/14-336's text tower and a 1024-wide (one-layer) vision side."""
    import transformers
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77),
            vision_config=dict(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
                               image_size=336, patch_size=14),
            projection_dim=768)
        torch.manual_seed(0)
        transformers.CLIPModel(cfg).save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--keeps", type=int, nargs="*", default=[64, 128, 192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", default="cpu", choices=["wall", "cpu"])
    ap.add_argument("--clip-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tokenreduce_clip_l_random"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    now = time.process_time if args.clock == "cpu" else time.perf_counter

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)
    b, n, c, h, d, width = 1, 577, 1024, 16, 64, 4096
    x = torch.randn(b, n, c, generator=g).to(dev, dtype)
    q, k = (torch.randn(b, h, n, d, generator=g).to(dev, dtype) for _ in range(2))
    projector = torch.nn.Sequential(torch.nn.Linear(c, width), torch.nn.GELU(), torch.nn.Linear(width, width))
    projector = projector.to(dev, dtype)
    with torch.no_grad():
        projector(x[:, 1:])
        sync()
        t0 = now()
        projected = projector(x[:, 1:])
        sync()
        t_proj = now() - t0
    cls_attn = attention_probs(q[:, :, :1], k, d ** -0.5, None)[:, :, 0].mean(1)
    instruction = [tuple([49406] + list(range(400, 414)) + [49407])]
    geo = Geometry(num_blocks=23, num_prefix=1, num_patches=576, dim=c, num_heads=h, grid=(24, 24),
                   site=Site.TOWER_OUT)
    clip = random_clip(args.clip_dir)
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{device}, {torch.get_num_threads()} threads | {args.dtype} | 1 image, 576 patches, width 1024, projector "
          f"width 4096 | median of {args.repeats}, {args.clock} clock | projector on 576 tokens: "
          f"{1e3 * t_proj:.1f} ms\n")
    print("| method | keep | selection (ms / image) |\n|---|---:|---:|")
    for name in METHODS:
        extra = {"text_encoder": clip} if name == "cdpruner" else {}
        for keep in args.keeps:
            method = tokenreduce.build_method(name, geo, keep=keep, **extra)
            times = []
            with torch.no_grad():
                for _ in range(args.repeats + 1):
                    state = TokenState(x=x, size=torch.ones(b, n, device=dev, dtype=dtype), num_prefix=1,
                                       cls_attn=cls_attn, projected=projected, grid=(24, 24), instruction=instruction)
                    sync()
                    t0 = now()
                    method.reduce(state)
                    sync()
                    times.append(now() - t0)
            print(f"| {name} | {keep} | {1e3 * statistics.median(times[1:]):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
