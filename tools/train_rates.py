#!/usr/bin/env python3
"""DiffRate rate search: learn per-block kept counts (prune_kept / merge_kept) for a FLOPs target.

One process:       python tools/train_rates.py --model deit_small_patch16_224 --pretrained \
                       --data /path/to/imagenet --target-gflops 2.9 --output results/deit_s_2.9
Several processes: torchrun --nproc_per_node 4 tools/train_rates.py ...   (DDP: nccl on GPU, gloo on CPU)
Smoke test on CPU: python tools/train_rates.py --model vit_tiny_patch16_224 --synthetic --target-gflops 0.6 \
                       --epochs 1 --batch-size 8

Writes <output>/rates.yaml (load with tokenreduce.patch(model, "diffrate", rates="<output>/rates.yaml")),
<output>/checkpoint.pt (--resume continues from it), summary.json and history.json. Options: --help.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tokenreduce.diffrate_search import main  # noqa: E402

if __name__ == "__main__":
    main()
