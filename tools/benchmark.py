#!/usr/bin/env python3
"""Throughput of unpatched timm vs patched models (see `python tools/benchmark.py --help`)."""
import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
from tokenreduce.cli.bench import main

if __name__ == "__main__":
    main()
