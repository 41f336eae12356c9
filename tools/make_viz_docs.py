#!/usr/bin/env python3
"""Regenerate the pictures in docs/assets/viz/ and the gallery in docs/visualization.md.

For every registered method that runs on a timm ViT (the registry is read at run time, so new methods appear
automatically), on each photo in docs/assets/, draw the token set after every block where it changed
(``tokenreduce.viz.visualize``) and write ``docs/assets/viz/<method>_<photo>.png``. Methods that act elsewhere
(e.g. inside LLaVA's language model) are listed with the reason. The gallery section of docs/visualization.md
(between the ``gallery:start`` / ``gallery:end`` markers) is rewritten to match.

    python tools/make_viz_docs.py                              # random-weight vit_small_patch16_224
    python tools/make_viz_docs.py --model deit_small_patch16_224 --checkpoint deit_small.safetensors
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenreduce  # noqa: E402
from tokenreduce import viz  # noqa: E402
from tokenreduce.methods import get_method  # noqa: E402

#: Settings that reduce tokens visibly on a 12-block ViT-S/16 (a method's defaults may reduce nothing). A method
#: not listed here is drawn with its defaults.
DEMO_PARAMS: Dict[str, Dict[str, Any]] = {
    "tome": {"r": 13},
    "pitome": {"ratio": 0.9},
    "atc": {"keep_rate": 0.7},
    "diffrate": {"rates": "deit_small@2.9"},
    "zero_tprune": {"keep_ratio": 0.7},
    "topk_attn": {"keep_ratio": 0.7},
    "random": {"keep_ratio": 0.7},
    "visionzip": {"dominant": 54, "contextual": 10},
}
PHOTOS = ("chelsea", "coffee")
START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="timm architecture (default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="weights (default: random, seeded)")
    p.add_argument("--photos", nargs="+", default=list(PHOTOS), help="stems of docs/assets/*.jpg")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all registered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--max-panels", type=int, default=8)
    args = p.parse_args(argv)

    docs = Path(args.docs)
    out_dir = docs / "assets" / "viz"
    torch.manual_seed(args.seed)
    model = viz.build_model(args.model, args.checkpoint)
    weights = f"weights {Path(args.checkpoint).name}" if args.checkpoint else f"random weights (seed {args.seed})"
    methods = args.methods or tokenreduce.list_methods()
    skipped: Dict[str, str] = {}
    for method in methods:
        params = DEMO_PARAMS.get(method, {})
        for photo in args.photos:
            started = time.perf_counter()
            try:
                fig, records = viz.visualize(model, docs / "assets" / f"{photo}.jpg", method,
                                             max_panels=args.max_panels, note=f"{args.model} · {weights}", **params)
            except (ValueError, TypeError) as e:
                skipped[method] = str(e).split("\n")[0]
                break
            path = viz.save_png(fig, out_dir / f"{method}_{photo}.png", dpi=90, colors=256)
            last = records[-1]
            print(f"{path.relative_to(ROOT)}: {last.tokens} tokens at the end, "
                  f"{int((last.labels < 0).sum())} patches dropped ({time.perf_counter() - started:.1f}s)")
    # Methods that do not run in timm blocks: try them on LLaVA's vision side (a small random LLaVA whose CLIP
    # tower has ViT-S/16 geometry), e.g. VisionZip at the tower output.
    llava_note = ""
    if skipped:
        llava = small_llava(args.seed)
        if llava is not None:
            llava_note = "LLaVA (random CLIP tower, ViT-S/16 geometry, 1-layer LM)"
            for method in list(skipped):
                params = DEMO_PARAMS.get(method, {})
                for photo in args.photos:
                    try:
                        fig, records = viz.visualize(llava, docs / "assets" / f"{photo}.jpg", method,
                                                     max_panels=args.max_panels,
                                                     note=f"{llava_note} · random weights (seed {args.seed})",
                                                     **params)
                    except (ValueError, TypeError) as e:
                        skipped[method] = str(e).split("\n")[0]
                        break
                    path = viz.save_png(fig, out_dir / f"{method}_{photo}.png", dpi=90, colors=256)
                    print(f"{path.relative_to(ROOT)}: {records[-1].tokens} tokens at the end (LLaVA)")
                else:
                    del skipped[method]
                    LLAVA_DRAWN.add(method)
    for method, reason in skipped.items():
        print(f"{method}: not drawn: {reason}")
    write_gallery(docs, skipped, args.model, weights)
    return 0


#: Methods drawn on the small LLaVA instead of the timm ViT (filled by main, read by write_gallery).
LLAVA_DRAWN: set = set()
#: Why a method without pictures has none, by site.
SITE_NOTES = {
    "llm_layer": "prunes image tokens inside LLaVA's language model, where which ones survive depends on the "
                 "prompt; `visualize` does not draw it",
    "tower_out": "acts at LLaVA's vision-tower output; draw it with `viz.visualize` on a LLaVA model",
}


def small_llava(seed: int):
    """A random LlavaForConditionalGeneration with a ViT-S/16-shaped CLIP tower, or None without transformers."""
    try:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    except ImportError:
        return None
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                          image_size=224, patch_size=16)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=128)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=127,
                                                     vision_feature_layer=-2)).eval()


def write_gallery(docs: Path, skipped: Dict[str, str], model: str, weights: str) -> None:
    """Rewrite the gallery of docs/visualization.md from the pictures present, for every registered method."""
    page, out_dir = docs / "visualization.md", docs / "assets" / "viz"
    photos = {p.stem for p in (docs / "assets").glob("*.jpg")}
    lines = [START, "", f"Model: `{model}`, {weights}. Regenerate with `python tools/make_viz_docs.py`.", ""]
    not_drawn = []
    for method in tokenreduce.list_methods():
        files = sorted(f for f in out_dir.glob(f"{method}_*.png") if f.stem[len(method) + 1:] in photos)
        site = get_method(method).site.value
        if not files:
            not_drawn.append((method, SITE_NOTES.get(site) or skipped.get(method) or f"acts at '{site}'"))
            continue
        params = ", ".join(f"{k}={v}" for k, v in DEMO_PARAMS.get(method, {}).items()) or "defaults"
        lines += [f"### {method}", "", f"{get_method(method).summary}. Setting: `{params}`.", ""]
        if site == "tower_out":
            lines += ["Drawn on a small random-weight LLaVA whose CLIP tower has ViT-S/16 geometry (the method "
                      "acts at the tower's output, not in timm blocks). Only the kept tokens are reported "
                      "(`info(model).kept`), not a `source`: patches merged into the contextual tokens are drawn "
                      "as dropped (\"merges not traced\").", ""]
        for f in files:
            lines += [f"![{method} on {f.stem[len(method) + 1:]}](assets/viz/{f.name})", ""]
    if not_drawn:
        lines += ["### Not drawn on a timm ViT", ""]
        lines += [f"- `{method}`: {reason}" for method, reason in not_drawn]
        lines.append("")
    lines.append(END)
    text = page.read_text() if page.is_file() else ""
    block = "\n".join(lines)
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Gallery\n\n" + block + "\n"
    page.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
