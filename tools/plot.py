#!/usr/bin/env python3
"""Accuracy vs GFLOPs and vs img/s from `tokenreduce eval` results files (see `python tools/plot.py --help`)."""
import sys

from tokenreduce.viz import plot_main

if __name__ == "__main__":
    sys.exit(plot_main(prog="tools/plot.py"))
