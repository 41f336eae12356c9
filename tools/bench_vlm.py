#!/usr/bin/env python3
"""Prefill time, time to first token, decode speed and peak memory of a vision-language model, unpatched vs each
method at the papers' budgets, on random models shaped like the real ones (token and layer counts) at reduced width.

    python tools/bench_vlm.py --backbone qwen2.5-vl                          # Qwen2.5-VL-7B-shaped, CPU
    python tools/bench_vlm.py --backbone qwen3-vl --threads 1 --clock cpu --out docs/benchmarks/qwen3_vl_cpu.md
    python tools/bench_vlm.py --backbone qwen2.5-vl --width full --device cuda --dtype bfloat16   # real widths
    python tools/bench_vlm.py --backbone qwen2.5-vl --methods fastervlm:keep=128 dart:budget=128

Backbones (``BACKBONES``): ``qwen2.5-vl`` (Qwen2.5-VL-7B: 32-block windowed tower, full attention in blocks 7/15/23/31,
patch 14, 2×2 merger; 28-layer Qwen2 LM with M-RoPE) and ``qwen3-vl`` (Qwen3-VL-8B: 27-block tower, patch 16,
deepstack from blocks 8/16/24; 36-layer Qwen3 LM), each with one ``--image`` (default 672×896 px: 768 merged tokens
on Qwen2.5-VL, 588 on Qwen3-VL); ``llava-next`` (LLaVA-NeXT-7B: CLIP-L/336 tower of 24 layers, anyres crops, 32-layer
Vicuna; default image 672×672 px: base + 2×2 crops, 2 928 visual tokens) and ``llava-onevision`` (LLaVA-OV-7B:
26-layer SigLIP/384 without CLS, anyres-max-9 crops, 28-layer Qwen2; default 768×768 px: base + 2×2 crops, 3 699
visual tokens), each with its papers' budgets (``DEFAULT_METHODS``); the image between ``--prefix`` and ``--suffix``
text tokens, ``--batch`` copies. Another backbone is one entry: a builder and a prompt maker.

Columns: ``visual tokens`` — visual tokens per prompt in the language model's last layer; ``prefill`` — one
``model(**inputs, use_cache=True)`` (tower, merger, LLM prefill); ``vision`` — ``get_image_features`` alone (the tower
and the method's selection; ``prefill − vision`` is the language model's share); ``TTFT`` — from the ``generate`` call
to the first token's logits (tower, merger, prefill: a logits processor stamps every step); ``decode`` — tokens/s of
the later steps, ``batch·(N−1)`` over the time from the first to the last step's logits (N = ``--new-tokens``);
``peak`` — memory above the loaded model during one N-token generate (CUDA: ``max_memory_allocated``; CPU: the peak
resident set of a fresh process per method minus its size before the call). Times are medians over ``--repeats`` after
a warm-up.
"""
from __future__ import annotations

import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

import tokenreduce
from tokenreduce.cli.common import parse_run

#: The papers' budgets on a 768-token image: 192 / 128 / 64 visual tokens (LLaVA-1.5's three settings as counts;
#: VisionZip's dominant:contextual split 54:10 scaled), DART's "128" / "192", FastV K=2.
PAPER_METHODS = [
    "visionzip:dominant=162,contextual=30", "visionzip:dominant=108,contextual=20",
    "visionzip:dominant=54,contextual=10",
    "fastervlm:keep=192", "fastervlm:keep=64",
    "vispruner:keep=192", "vispruner:keep=64",
    "divprune:keep=192", "divprune:keep=64",
    "pool:keep=192", "pool:keep=64",
    "random:keep=64",
    "dart:budget=192", "dart:budget=128",
    "fastv:layer=2,keep=192", "fastv:layer=2,keep=64",
]

WIDTHS = {
    # reduced width: the real block / layer / head-group counts, narrow layers
    "reduced": dict(vision=dict(hidden_size=128, intermediate_size=256, num_heads=4),
                    text=dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2,
                              vocab_size=2048)),
}


def _qwen25(width: str) -> Any:
    import transformers
    if width == "full":
        vision = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
        text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                    vocab_size=152064, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                            mrope_section=[16, 24, 24]))
    else:
        w = WIDTHS[width]
        vision = dict(w["vision"], out_hidden_size=w["text"]["hidden_size"])
        head = w["text"]["hidden_size"] // w["text"]["num_attention_heads"]
        text = dict(w["text"], rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                    mrope_section=[head // 8, head * 3 // 16, head * 3 // 16]))
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=32, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu", **vision),
        text_config=dict(num_hidden_layers=28, max_position_embeddings=32768, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **text),
        image_token_id=text["vocab_size"] - 4, video_token_id=text["vocab_size"] - 3,
        vision_start_token_id=text["vocab_size"] - 2, vision_end_token_id=text["vocab_size"] - 1)
    return cfg, transformers.Qwen2_5_VLForConditionalGeneration


def _qwen3(width: str) -> Any:
    import transformers
    if width == "full":
        vision = dict(hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096)
        text = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, vocab_size=151936,
                    rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                         mrope_interleaved=True))
    else:
        w = WIDTHS[width]
        vision = dict(w["vision"], out_hidden_size=w["text"]["hidden_size"])
        head = w["text"]["hidden_size"] // w["text"]["num_attention_heads"]
        text = dict(w["text"], head_dim=head,
                    rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_interleaved=True,
                                         mrope_section=[head * 3 // 8, head * 5 // 16, head * 5 // 16]))
    cfg = transformers.Qwen3VLConfig(
        vision_config=dict(depth=27, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24], **vision),
        text_config=dict(num_hidden_layers=36, max_position_embeddings=32768, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **text),
        image_token_id=text["vocab_size"] - 4, video_token_id=text["vocab_size"] - 3,
        vision_start_token_id=text["vocab_size"] - 2, vision_end_token_id=text["vocab_size"] - 1)
    return cfg, transformers.Qwen3VLForConditionalGeneration


def _qwen_inputs(model, args) -> Dict[str, torch.Tensor]:
    """One image of ``args.image`` pixels (sides rounded to the merger's multiple) between text, ``batch`` copies."""
    cfg, vc = model.config, model.config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    h_px, w_px = (int(v) for v in args.image.split("x"))
    grid = (1, round(h_px / unit) * vc.spatial_merge_size, round(w_px / unit) * vc.spatial_merge_size)
    merged = grid[1] * grid[2] // vc.spatial_merge_size ** 2
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(3, cfg.text_config.vocab_size - 8, (n,), generator=g)  # noqa: E731
    row = torch.cat([text(args.prefix), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((merged,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                     text(args.suffix)])
    ids = row.repeat(args.batch, 1)
    dtype = getattr(torch, args.dtype)
    per_patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.randn(args.batch * grid[0] * grid[1] * grid[2], per_patch, generator=g)
    return dict(input_ids=ids.to(args.device), attention_mask=torch.ones_like(ids).to(args.device),
                mm_token_type_ids=(ids == cfg.image_token_id).int().to(args.device),
                pixel_values=pixels.to(args.device, dtype),
                image_grid_thw=torch.tensor([grid] * args.batch).to(args.device))


#: LLaVA-NeXT's papers' budgets (VisionZip / DART tables: 640 / 320 / 160 visual tokens) on a 2x2-crop image: 128 /
#: 64 / 32 per tower row (base image and each crop, as the official VisionZip LLaVA-NeXT code), FastV and DART over
#: the whole image.
NEXT_METHODS = [
    "visionzip:dominant=108,contextual=20", "visionzip:dominant=54,contextual=10",
    "visionzip:dominant=27,contextual=5",
    "fastervlm:keep=128", "fastervlm:keep=32",
    "vispruner:keep=128", "vispruner:keep=32",
    "divprune:keep=128", "divprune:keep=32",
    "pool:keep=128", "pool:keep=32",
    "random:keep=32",
    "tome:r=20",
    "dart:budget=640", "dart:budget=320", "dart:budget=160",
    "fastv:layer=2,keep=640", "fastv:layer=2,keep=160",
]
#: LLaVA-OneVision: no paper with official code gives its budgets; LLaVA-1.5's per-image settings (192 / 128 / 64)
#: per tower row, and the in-LLM methods at the same totals on a 2x2-crop image (5 rows).
OV_METHODS = [
    "visionzip:dominant=162,contextual=30", "visionzip:dominant=108,contextual=20",
    "visionzip:dominant=54,contextual=10",
    "fastervlm:keep=192", "fastervlm:keep=64",
    "vispruner:keep=192", "vispruner:keep=64",
    "divprune:keep=192", "divprune:keep=64",
    "pool:keep=192", "pool:keep=64",
    "random:keep=64",
    "tome:r=20",
    "dart:budget=960", "dart:budget=320",
    "fastv:layer=2,keep=960", "fastv:layer=2,keep=320",
]


def _llava_next(width: str) -> Any:
    """LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): CLIP ViT-L/14-336 (24 layers, features from -2, CLS dropped), anyres
    crops of 336 px (1x2 .. 2x2, 1x3, 3x1), Vicuna-7B (32 layers, MHA)."""
    import transformers
    if width == "full":
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    vocab_size=32064)
    else:
        w = WIDTHS[width]
        vision = dict(hidden_size=w["vision"]["hidden_size"], intermediate_size=w["vision"]["intermediate_size"],
                      num_attention_heads=w["vision"]["num_heads"])
        text = dict(w["text"], num_key_value_heads=w["text"]["num_attention_heads"])  # Vicuna: no GQA
    cfg = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", num_hidden_layers=24, image_size=336, patch_size=14,
                           hidden_act="quick_gelu", projection_dim=768, **vision),
        text_config=dict(model_type="llama", num_hidden_layers=32, max_position_embeddings=8192, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **text),
        image_token_index=text["vocab_size"] - 1, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return cfg, transformers.LlavaNextForConditionalGeneration


def _llava_ov(width: str) -> Any:
    """LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov): SigLIP-so400m/14-384 without its last layer (26 layers, no
    CLS, features of the last, all kept), anyres-max-9 crops of 384 px, Qwen2-7B (28 layers, GQA 28/4)."""
    import transformers
    if width == "full":
        vision = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16)
        text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                    vocab_size=152000)
    else:
        w = WIDTHS[width]
        vision = dict(hidden_size=w["vision"]["hidden_size"], intermediate_size=w["vision"]["intermediate_size"],
                      num_attention_heads=w["vision"]["num_heads"])
        text = dict(w["text"])
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", num_hidden_layers=26, image_size=384, patch_size=14,
                           vision_use_head=False, **vision),
        text_config=dict(model_type="qwen2", num_hidden_layers=28, max_position_embeddings=32768, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **text),
        image_token_index=text["vocab_size"] - 2, video_token_index=text["vocab_size"] - 1)
    return cfg, transformers.LlavaOnevisionForConditionalGeneration


def _anyres_inputs(model, args) -> Dict[str, torch.Tensor]:
    """One image of ``args.image`` pixels as the processor gives it (base image + anyres crops; its placeholder count
    from ``tokenreduce.backbones.llava.anyres.full_image_tokens``) between text, ``batch`` copies."""
    from tokenreduce.backbones.llava.anyres import full_image_tokens, tower_rows
    cfg, vc = model.config, model.config.vision_config
    size = tuple(int(v) for v in args.image.split("x"))
    side = vc.image_size // vc.patch_size
    aspect = getattr(cfg, "vision_aspect_ratio", None)
    # per row the patches: CLIP's CLS is dropped by the "default" strategy, SigLIP has none
    n_img = full_image_tokens(size, cfg.image_grid_pinpoints, vc.image_size, (side, side), side * side, True,
                              int(aspect.replace("anyres_max_", "")) if aspect else None)
    rows = tower_rows(size, cfg.image_grid_pinpoints, vc.image_size)
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(3, cfg.text_config.vocab_size - 8, (n,), generator=g)  # noqa: E731
    row = torch.cat([text(args.prefix), torch.full((n_img,), cfg.image_token_id), text(args.suffix)])
    ids = row.repeat(args.batch, 1)
    pixels = torch.randn(args.batch, rows, 3, vc.image_size, vc.image_size, generator=g)
    return dict(input_ids=ids.to(args.device), attention_mask=torch.ones_like(ids).to(args.device),
                pixel_values=pixels.to(args.device, getattr(torch, args.dtype)),
                image_sizes=torch.tensor([size] * args.batch).to(args.device))


#: backbone -> (config builder(width) -> (config, model class), prompt maker(model, args) -> inputs)
BACKBONES: Dict[str, Tuple[Callable, Callable]] = {
    "qwen2.5-vl": (_qwen25, _qwen_inputs),
    "qwen3-vl": (_qwen3, _qwen_inputs),
    "llava-next": (_llava_next, _anyres_inputs),
    "llava-onevision": (_llava_ov, _anyres_inputs),
}
#: backbone -> its default methods (the papers' budgets on it); PAPER_METHODS otherwise
DEFAULT_METHODS: Dict[str, List[str]] = {"llava-next": NEXT_METHODS, "llava-onevision": OV_METHODS}
#: backbone -> its default image (height x width px) when --image is not given
DEFAULT_IMAGES: Dict[str, str] = {"llava-next": "672x672", "llava-onevision": "768x768"}


def build(args) -> Tuple[torch.nn.Module, Dict[str, torch.Tensor]]:
    make_config, make_inputs = BACKBONES[args.backbone]
    cfg, cls = make_config(args.width)
    cfg._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):
        model = cls(cfg)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    return model, make_inputs(model, args)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, clock: str = "wall") -> Tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (``clock="cpu"``: this process's CPU time,
    steadier on a shared CPU)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = now()
        out = fn()
        _sync(device)
        times.append(now() - t0)
    return statistics.median(times), out


class Stamps:
    """A logits processor that records the clock at every generation step (after that step's forward)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.times: List[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(self.now())
        return scores


def stamped_generate(model, inputs, n: int, device: str, repeats: int, clock: str) -> Tuple[float, float]:
    """Median ``(time to first token, seconds per later step)`` of greedy ``n``-token generates after a warm-up."""
    from transformers import LogitsProcessorList
    now = time.process_time if clock == "cpu" else time.perf_counter
    first, step = [], []
    for r in range(repeats + 1):
        stamps = Stamps(lambda: (_sync(device), now())[1])
        _sync(device)
        t0 = now()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]))
        if r:
            first.append(stamps.times[0] - t0)
            step.append((stamps.times[-1] - stamps.times[0]) / max(1, len(stamps.times) - 1))
    return statistics.median(first), statistics.median(step)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(model, inputs, spec: str, args) -> Dict[str, Any]:
    name, params = parse_run(spec) if spec != "unpatched" else ("unpatched", {})
    if name != "unpatched":
        tokenreduce.patch(model, name, **params)
    n = args.new_tokens
    gen = lambda k: model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False)  # noqa: E731
    try:
        with torch.inference_mode():
            # peak first, on a fresh process / fresh CUDA peak counter
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                gen(n)
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            else:
                base = _rss_mib()
                gen(n)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
            prefill, out = timed(lambda: model(**inputs, use_cache=True), args.device, args.repeats, args.clock)
            last = out.cache.layers[-1].keys.shape[-2]
            cfg = model.config
            ids = inputs["input_ids"][0]
            video = getattr(cfg, "video_token_id", None)
            text_tokens = int(((ids != cfg.image_token_id) & (ids != (-1 if video is None else video))).sum())
            vision_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
            vision, _ = timed(lambda: model.get_image_features(**vision_inputs), args.device, args.repeats,
                              args.clock)
            ttft, per_step = stamped_generate(model, inputs, n, args.device, args.repeats, args.clock)
    finally:
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)
    decode = args.batch / per_step
    return dict(method=spec, visual_tokens=last - text_tokens, llm_tokens=last, prefill=prefill, vision=vision,
                ttft=ttft, decode=decode, peak=peak)


def table(rows: List[Dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| method | visual tokens | LLM tokens | prefill (s) | speedup | vision (s) | TTFT (s) | speedup | "
             "decode (tok/s) | peak (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['visual_tokens']} | {r['llm_tokens']} | {r['prefill']:.3f} | "
                     f"{base['prefill'] / r['prefill']:.2f}x | {r['vision']:.3f} | {r['ttft']:.3f} | "
                     f"{base['ttft'] / r['ttft']:.2f}x | {r['decode']:.1f} | {r['peak']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="qwen2.5-vl", choices=sorted(BACKBONES))
    ap.add_argument("--width", default="reduced", choices=["reduced", "full"], help="layer widths (random weights)")
    ap.add_argument("--methods", nargs="*", default=None, help="name:k=v,... (default: the backbone's paper budgets)")
    ap.add_argument("--image", default=None, help="image height x width in pixels (default: 672x896; LLaVA-NeXT "
                                                  "672x672, LLaVA-OneVision 768x768: 2x2 crops + base)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=35, help="text tokens before the image")
    ap.add_argument("--suffix", type=int, default=40, help="text tokens after the image")
    ap.add_argument("--new-tokens", type=int, default=17, help="tokens per generate (>= 2: decode speed is timed "
                                                               "between the first and the last)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print JSON (a fresh process)
    ap.add_argument("--out", help="also write the table (with the settings) to this markdown file")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the decode speed is timed from the first new token to the last)")
    if args.methods is None:
        args.methods = DEFAULT_METHODS.get(args.backbone, PAPER_METHODS)
    if args.image is None:
        args.image = DEFAULT_IMAGES.get(args.backbone, "672x896")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    if args.one:
        model, inputs = build(args)
        print(json.dumps(measure(model, inputs, args.one, args)))
        return 0
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--methods" in passthrough:  # the child gets one method, not the list
        i = passthrough.index("--methods")
        j = i + 1
        while j < len(passthrough) and not passthrough[j].startswith("--"):
            j += 1
        passthrough = passthrough[:i] + passthrough[j:]
    if "--out" in passthrough:
        i = passthrough.index("--out")
        passthrough = passthrough[:i] + passthrough[i + 2:]
    for spec in ["unpatched"] + list(args.methods):
        # each method in a fresh process: its peak memory is its own
        done = subprocess.run([sys.executable, __file__, *passthrough, "--one", spec], capture_output=True, text=True)
        if done.returncode:
            print(f"{spec}: failed\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{spec}: {r['visual_tokens']} visual tokens, prefill {r['prefill']:.3f}s, vision {r['vision']:.3f}s, "
              f"TTFT {r['ttft']:.3f}s, "
              f"decode {r['decode']:.1f} tok/s, peak {r['peak']:.0f} MiB", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    model, inputs = build(args)
    header = (f"random {args.backbone} ({args.width} width) | {device}, {torch.get_num_threads()} threads | "
              f"{args.dtype}, {args.attn} | batch {args.batch} | image {args.image} px, prompt "
              f"{inputs['input_ids'].shape[1]} tokens | {args.new_tokens} new tokens | median of {args.repeats}, "
              f"{args.clock} clock | torch {torch.__version__}, transformers {transformers.__version__}")
    text = header + "\n\n" + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
