#!/usr/bin/env python3
"""Throughput of unpatched timm vs patched models (see `python tools/benchmark.py --help`)."""
from tokenreduce.benchmark import main

if __name__ == "__main__":
    main()
