#!/usr/bin/env python3
"""Accuracy vs GFLOPs and vs img/s from `tokenreduce eval` results files (see `python tools/plot.py --help`)."""
import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
import sys

from tokenreduce.cli.plot import main as plot_main

if __name__ == "__main__":
    sys.exit(plot_main(prog="tools/plot.py"))
