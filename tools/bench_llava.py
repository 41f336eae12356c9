#!/usr/bin/env python3
"""Prefill time, generate time and image tokens of LLaVA, unpatched vs each method at the paper budgets.

    python tools/bench_llava.py                                  # tiny random LLaVA-1.5-shaped model, CPU
    python tools/bench_llava.py --geometry llava-1.5-7b --device cuda --dtype bfloat16   # real size, random weights
    python tools/bench_llava.py --model /path/to/llava-1.5-7b-hf --device cuda --dtype float16
    python tools/bench_llava.py --methods visionzip:dominant=54,contextual=10 dart:budget=128 --out table.md

Every model gets a LLaVA-1.5 prompt: BOS + text, one image's image-token run (576 tokens at 336 px / patch 14), a
question; ``--batch`` copies with left padding. ``prefill`` is one ``model(...)`` call with ``use_cache=True`` (vision
tower, projector and LLM prefill), ``generate`` the whole greedy ``model.generate(max_new_tokens=...)``; both are
medians over ``--repeats`` after one warm-up. ``LLM tokens`` is the prefill length the language model sees in its last
layer and ``image tokens`` the image tokens among them (VisionZip / ToMe shrink the run before the LLM; DART prunes
inside it after layer K).
"""
from __future__ import annotations

import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
import argparse
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch

import tokenreduce
from tokenreduce.cli.common import parse_run

PAPER_METHODS = [
    "visionzip:dominant=54,contextual=10", "visionzip:dominant=108,contextual=20",
    "visionzip:dominant=162,contextual=30",
    "dart:budget=128", "dart:budget=192",
    "tome:r=23", "tome:r=20", "tome:r=17",
]

GEOMETRIES: Dict[str, Dict[str, Any]] = {
    # LLaVA-1.5 token counts (576 patches, 24 vision layers, features from layer -2) in miniature widths.
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=24, num_attention_heads=4),
                 text=dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8)),
    # Real LLaVA-1.5-7B: CLIP ViT-L/14-336 and Vicuna-7B (random weights).
    "llava-1.5-7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16),
                         text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32)),
}


def build_model(args) -> torch.nn.Module:
    import transformers
    if args.model:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation=args.attn)
    else:
        geo = GEOMETRIES[args.geometry]
        cfg = transformers.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", image_size=336, patch_size=14, hidden_act="quick_gelu",
                               projection_dim=768, **geo["vision"]),
            text_config=dict(model_type="llama", max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, **geo["text"]),
            image_token_index=geo["text"]["vocab_size"] - 1, vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_seq_length=576)
        cfg._attn_implementation = args.attn
        torch.manual_seed(0)
        with torch.device(args.device):
            model = transformers.LlavaForConditionalGeneration(cfg)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def make_inputs(model, args) -> Dict[str, torch.Tensor]:
    cfg = model.config
    vision = cfg.vision_config
    n_img = (vision.image_size // vision.patch_size) ** 2
    vocab = cfg.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(3, min(vocab, 30000) - 2, (args.prefix,), generator=g)
    pre[0] = 1
    post = torch.randint(3, min(vocab, 30000) - 2, (args.suffix,), generator=g)
    row = torch.cat([pre, torch.full((n_img,), cfg.image_token_id), post])
    ids = row.repeat(args.batch, 1)
    mask = torch.ones_like(ids)
    pixels = torch.randn(args.batch, 3, vision.image_size, vision.image_size, generator=g)
    return dict(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                pixel_values=pixels.to(args.device, getattr(torch, args.dtype)))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, clock: str = "wall") -> Tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up. ``clock="cpu"`` counts this process's CPU
    time (all its threads) instead of wall time: steadier on a CPU shared with other jobs."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = now()
        out = fn()
        _sync(device)
        times.append(now() - t0)
    return statistics.median(times), out


def run(model, inputs, spec: str, args) -> Dict[str, Any]:
    name, params = parse_run(spec) if spec != "unpatched" else ("unpatched", {})
    if name != "unpatched":
        tokenreduce.patch(model, name, **params)
    try:
        with torch.inference_mode():
            prefill, out = timed(lambda: model(**inputs, use_cache=True), args.device, args.repeats, args.clock)
            last = out.past_key_values.layers[-1].keys.shape[-2]
            ids = inputs["input_ids"][0]
            text_tokens = int((ids != model.config.image_token_id).sum())
            image_tokens = last - text_tokens
            gen, _ = timed(lambda: model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                                                  min_new_tokens=args.new_tokens), args.device, args.repeats,
                            args.clock)
    finally:
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)
    return dict(method=spec, prefill=prefill, generate=gen, llm_tokens=last, image_tokens=image_tokens)


def table(rows: List[Dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| method | image tokens | LLM tokens | prefill (s) | speedup | generate (s) | speedup |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['image_tokens']} | {r['llm_tokens']} | {r['prefill']:.3f} | "
                     f"{base['prefill'] / r['prefill']:.2f}x | {r['generate']:.3f} | "
                     f"{base['generate'] / r['generate']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a LlavaForConditionalGeneration checkpoint (path or hub id); default: random")
    ap.add_argument("--geometry", default="tiny", choices=sorted(GEOMETRIES), help="random model shape")
    ap.add_argument("--methods", nargs="*", default=PAPER_METHODS, help="name:k=v,... (default: paper budgets)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=35, help="text tokens before the image (BOS included)")
    ap.add_argument("--suffix", type=int, default=40, help="text tokens after the image")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall time, or this process's CPU time (steadier on a shared CPU; use with --threads 1)")
    ap.add_argument("--out", help="also write the table (with the settings) to this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    model = build_model(args)
    inputs = make_inputs(model, args)
    rows = []
    for spec in ["unpatched"] + list(args.methods):
        rows.append(run(model, inputs, spec, args))
        print(f"{spec}: prefill {rows[-1]['prefill']:.3f}s, generate {rows[-1]['generate']:.3f}s, "
              f"{rows[-1]['image_tokens']} image tokens", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    header = (f"{args.model or 'random ' + args.geometry} | {device}, {torch.get_num_threads()} threads | "
              f"{args.dtype}, {args.attn} | batch {args.batch} | prompt {inputs['input_ids'].shape[1]} tokens | "
              f"{args.new_tokens} new tokens | median of {args.repeats}, {args.clock} clock | "
              f"torch {torch.__version__}, transformers {transformers.__version__}")
    text = header + "\n\n" + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
