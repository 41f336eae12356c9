#!/usr/bin/env python3
"""Regenerate the pictures in docs/assets/viz/ and the gallery in docs/visualization.md.

For every registered method (read from the registry at run time, so new methods appear automatically), on each
photo in docs/assets/, draw the token set after every block where it changed (``tokenreduce.viz.visualize``).
Pictures are grouped in sets, one folder each under docs/assets/viz/:

- ``vit_small_random``: timm ``vit_small_patch16_224`` with random weights (seeded);
- ``fmnist_reference``: the trained reference ViT (Fashion-MNIST, 14×14 patches like ViT-S/16), when its
  checkpoint exists (``checkpoints/fmnist_vit_reference.safetensors`` or ``$TOKENREDUCE_REFERENCE``);
- ``llava_random``: methods that do not run in timm blocks (VisionZip at the vision-tower output), on a small
  random LLaVA whose CLIP tower has ViT-S/16 geometry.

Methods that act elsewhere (inside LLaVA's language model) are listed with the reason. The gallery section of
docs/visualization.md (between the ``gallery:start`` / ``gallery:end`` markers) is rewritten from the pictures
present, with one tab per set.

    python tools/make_viz_docs.py                                   # every set that can be drawn here
    python tools/make_viz_docs.py --set vit_small_random --methods tome pitome
    python tools/make_viz_docs.py --gallery-only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenreduce  # noqa: E402
from tokenreduce import viz  # noqa: E402
from tokenreduce.methods import Site, get_method  # noqa: E402

#: Settings that reduce tokens visibly on a 12-block ViT with 196 patches (a method's defaults may reduce
#: nothing). A method not listed here is drawn with its defaults.
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
TIMM_SITES = (Site.BLOCK_MID, Site.BLOCK_OUT)
#: Why a method without pictures has none, by site.
SITE_NOTES = {
    "llm_layer": "prunes image tokens inside LLaVA's language model, where which ones survive depends on the "
                 "prompt; `visualize` does not draw it",
    "tower_out": "acts at LLaVA's vision-tower output; draw it with `viz.visualize` on a LLaVA model",
}


def reference_checkpoint() -> Optional[Path]:
    from tokenreduce.evaluation.reference import REFERENCE_CHECKPOINT
    path = Path(os.environ.get("TOKENREDUCE_REFERENCE", REFERENCE_CHECKPOINT))
    return path if path.is_file() else None


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


def picture_sets(seed: int, checkpoint: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """Set name -> how to build its model, a description, and which methods it draws."""
    ref = Path(checkpoint) if checkpoint else reference_checkpoint()

    def vit_small():
        torch.manual_seed(seed)
        return viz.build_model("vit_small_patch16_224")

    sets: Dict[str, Dict[str, Any]] = {
        "vit_small_random": {
            "build": vit_small, "title": "ViT-S/16, random weights",
            "describe": f"timm `vit_small_patch16_224` with random weights (seed {seed})",
            "accepts": lambda cls: cls.site in TIMM_SITES},
        "llava_random": {
            "build": lambda: small_llava(seed), "title": "LLaVA vision tower, random weights",
            "describe": f"a small LLaVA with random weights (seed {seed}): CLIP tower with ViT-S/16 geometry "
                        "(224 px, 16 px patches, 12 layers), 1-layer language model",
            "accepts": lambda cls: cls.site == Site.TOWER_OUT},
    }
    if ref is not None:
        sets["fmnist_reference"] = {
            "build": lambda: viz.build_model("fmnist_reference", str(ref)),
            "title": "trained reference (Fashion-MNIST)",
            "describe": f"the reference ViT trained on Fashion-MNIST (`{ref.name}`): 12 blocks, 14×14 patches of a "
                        "28×28 grey image, so the photo is seen in grey at 28×28 and drawn at full resolution",
            "accepts": lambda cls: cls.site in TIMM_SITES}
    return sets


def draw_set(name: str, spec: Dict[str, Any], methods: List[str], photos: List[str], docs: Path,
             max_panels: int) -> None:
    todo = [m for m in methods if spec["accepts"](get_method(m))]
    if not todo:
        return
    model = spec["build"]()
    if model is None:
        print(f"{name}: skipped (its model cannot be built here)")
        return
    out_dir = docs / "assets" / "viz" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update(title=spec["title"], describe=spec["describe"])
    meta.setdefault("params", {})
    for method in todo:
        params = DEMO_PARAMS.get(method, {})
        for photo in photos:
            started = time.perf_counter()
            try:
                fig, records = viz.visualize(model, docs / "assets" / f"{photo}.jpg", method,
                                             max_panels=max_panels, note=spec["title"], **params)
            except (ValueError, TypeError) as e:
                print(f"{name}/{method}: not drawn: {str(e).splitlines()[0]}")
                break
            path = viz.save_png(fig, out_dir / f"{method}_{photo}.png", dpi=90, colors=256)
            last = records[-1]
            print(f"{path.relative_to(docs)}: {last.tokens} tokens at the end, "
                  f"{int((last.labels < 0).sum())} patches dropped ({time.perf_counter() - started:.1f}s)")
            meta["params"][method] = params
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def write_gallery(docs: Path, order: List[str]) -> None:
    """Rewrite the gallery of docs/visualization.md from the pictures present, for every registered method."""
    page, viz_dir = docs / "visualization.md", docs / "assets" / "viz"
    photos = {p.stem for p in (docs / "assets").glob("*.jpg")}
    sets = [d for d in sorted(viz_dir.iterdir(), key=lambda d: (order.index(d.name) if d.name in order else 99,
                                                                   d.name))
            if d.is_dir() and (d / "meta.json").is_file()] if viz_dir.is_dir() else []
    metas = {d.name: json.loads((d / "meta.json").read_text()) for d in sets}
    lines = [START, "", "Regenerate with `python tools/make_viz_docs.py`. Models:", ""]
    lines += [f"- **{metas[d.name]['title']}**: {metas[d.name]['describe']}." for d in sets]
    lines.append("")
    not_drawn = []
    for method in tokenreduce.list_methods():
        cls = get_method(method)
        found = []
        for d in sets:
            files = sorted(f for f in d.glob(f"{method}_*.png") if f.stem[len(method) + 1:] in photos)
            if files:
                found.append((d, files))
        if not found:
            not_drawn.append((method, SITE_NOTES.get(cls.site.value) or "no picture yet"))
            continue
        params = ", ".join(f"{k}={v}" for k, v in DEMO_PARAMS.get(method, {}).items()) or "defaults"
        lines += [f"### {method}", "", f"{cls.summary}. Setting: `{params}`.", ""]
        if cls.site == Site.TOWER_OUT:
            lines += ["It acts at the vision tower's output, not in timm blocks, so it is drawn on LLaVA's vision "
                      "side. It reports the kept tokens (`info(model).kept`) but no `source`: the patches merged "
                      "into its contextual tokens are drawn as dropped (\"merges not traced\").", ""]
        tabs = len(found) > 1
        for d, files in found:
            indent = "    " if tabs else ""
            if tabs:
                lines += [f'=== "{metas[d.name]["title"]}"', ""]
            for f in files:
                rel = f.relative_to(docs)
                lines += [f"{indent}![{method} on {f.stem[len(method) + 1:]}, {metas[d.name]['title']}]({rel})", ""]
    if not_drawn:
        lines += ["### Not drawn", ""]
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


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", dest="sets", nargs="+", default=None,
                   help="only these picture sets (vit_small_random, fmnist_reference, llava_random)")
    p.add_argument("--checkpoint", default=None, help="reference checkpoint (default: the committed one)")
    p.add_argument("--photos", nargs="+", default=list(PHOTOS), help="stems of docs/assets/*.jpg")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all registered)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--max-panels", type=int, default=8)
    p.add_argument("--gallery-only", action="store_true", help="only rewrite the gallery from the pictures present")
    args = p.parse_args(argv)
    docs = Path(args.docs)
    sets = picture_sets(args.seed, args.checkpoint)
    order = ["fmnist_reference", "vit_small_random", "llava_random"]
    if not args.gallery_only:
        methods = args.methods or tokenreduce.list_methods()
        for name in args.sets or list(sets):
            if name not in sets:
                print(f"{name}: unknown set or its model is missing here (sets: {', '.join(sets)})")
                continue
            draw_set(name, sets[name], methods, args.photos, docs, args.max_panels)
    write_gallery(docs, order)
    return 0


if __name__ == "__main__":
    sys.exit(main())
