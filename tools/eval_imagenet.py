#!/usr/bin/env python3
"""Evaluate a timm ViT on ImageNet (or any ImageFolder) unpatched and with token reduction, timm validate.py style.

    python tools/eval_imagenet.py --data /data/imagenet/val --config configs/tome/vit_s16_augreg_r13.yaml --baseline
    torchrun --nproc_per_node 8 tools/eval_imagenet.py --data /data/imagenet/val --model deit_small_patch16_224.fb_in1k \
        --pretrained --method tome --param r=13 --amp bf16 --device cuda --results-file results/deit_s_tome.json

With no arguments: the offline default job (Fashion-MNIST + the reference ViT), as `tokenreduce eval`.
All options: `python tools/eval_imagenet.py --help` (the same as `tokenreduce eval --help`).
"""
import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
import sys

from tokenreduce.cli.eval import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/eval_imagenet.py"))
