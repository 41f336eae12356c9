"""``tokenreduce visualize``: draw which patches a method merged or dropped, after every block where the token set
changed (PNG)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .. import api
from ..evaluation.models import build_model
from ..viz.capture import capture, load_image, visualize
from ..viz.render import render_overlay, save_png
from .common import USER_ERRORS, error, parse_params


def build_parser(prog: str = "tokenreduce visualize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw which patches a token-reduction method merged (same colour, borders between groups) "
                    "and which it dropped (greyed out), after every block where the token set changed.",
        epilog="""examples:
  tokenreduce visualize docs/assets/chelsea.jpg --model vit_small_patch16_224 --method tome --param r=13 --out tome.png
  tokenreduce visualize cat.jpg --model deit_small_patch16_224.fb_in1k --pretrained --method zero_tprune \\
      --param keep_ratio=0.7 --out ztp.png
  tokenreduce visualize a.jpg --model deit_small_patch16_224 --method diffrate --param rates=deit_small@2.9 --out d.png

Without --pretrained or --checkpoint the weights are random: merges then follow colour and position only.""")
    p.add_argument("image", help="an image file (any format PIL reads)")
    p.add_argument("--model", default=None,
                   help="timm model name (e.g. vit_small_patch16_224), or fmnist_reference; default: the config's "
                        "model, else the reference Fashion-MNIST ViT")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (downloads)")
    p.add_argument("--checkpoint", default=None, help="weights to load (.safetensors or a torch state dict)")
    p.add_argument("--method", default=None, help=f"a registered method ({', '.join(api.list_methods())})")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, value parsed as YAML (repeatable), e.g. --param r=13")
    p.add_argument("--config", default=None, help="a method config (configs/<method>/<setting>.yaml)")
    p.add_argument("--img-size", type=int, default=None, help="input size (dynamic_img_size models)")
    p.add_argument("--fill", choices=("mean", "palette", "none"), default="mean",
                   help="how merged groups are coloured (default: their mean colour, as in ToMe's figures)")
    p.add_argument("--max-panels", type=int, default=12, help="at most this many panels (default 12)")
    p.add_argument("--final-only", action="store_true", help="write only the final overlay, at --display-size")
    p.add_argument("--display-size", type=int, default=None,
                   help="pixel size of each panel (default 224; 448 with --final-only)")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution")
    p.add_argument("--colors", type=int, default=None,
                   help="store a palette PNG with this many colours (e.g. 256: several times smaller)")
    p.add_argument("--out", required=True, help="the PNG to write")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "tokenreduce visualize") -> int:
    """``tokenreduce visualize IMAGE --model ... --method ... [--param k=v] [--checkpoint PATH] --out OUT.png``."""
    args = build_parser(prog).parse_args(argv)
    try:
        params = parse_params(args.param)
    except ValueError as e:
        return error(str(e))
    if args.method is None and args.config is None:
        return error("name a method (--method) or a config (--config)")
    model_name = args.model
    model_kwargs: Dict[str, Any] = {}
    if args.config is not None and model_name is None:
        from ..configs import load_config
        cfg = load_config(args.config)
        model_name, model_kwargs = cfg.model, dict(cfg.model_kwargs)
    try:
        model = build_model(model_name, args.checkpoint, args.pretrained, **model_kwargs)
        if args.final_only:
            records, view = capture(model, args.image, args.method, config=args.config, img_size=args.img_size,
                                    **params)
            rows, cols = view.grid
            disp = args.display_size or 448
            crop = load_image(args.image, (disp, round(disp * cols / rows)), view.crop_pct)
            save_png(render_overlay(crop, records[-1].labels, fill=args.fill), args.out, colors=args.colors)
        else:
            weights = ("checkpoint " + Path(args.checkpoint).name if args.checkpoint else
                       "pretrained" if args.pretrained else
                       "reference Fashion-MNIST ViT" if model_name in (None, "fmnist_reference") else "random weights")
            fig, records = visualize(model, args.image, args.method, config=args.config, img_size=args.img_size,
                                     max_panels=args.max_panels, fill=args.fill,
                                     display_size=args.display_size or 224,
                                     note=f"{model_name or 'fmnist_reference'} · {weights}", **params)
            save_png(fig, args.out, dpi=args.dpi, colors=args.colors)
        last = records[-1]
    except USER_ERRORS as e:
        return error(str(e))
    groups = len(np.unique(last.labels[last.labels >= 0]))
    print(f"wrote {args.out}: {last.tokens} tokens after the last change, {groups} patch groups, "
          f"{int((last.labels < 0).sum())} patches dropped")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Command: tokenreduce plot
# ---------------------------------------------------------------------------------------------------------------
