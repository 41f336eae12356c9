#!/usr/bin/env python3
"""Draw which patches a method merged or dropped (see `python tools/visualize.py --help`)."""
import _checkout  # noqa: F401,I001  (run from a plain checkout: puts the repository on sys.path)
import sys

from tokenreduce.cli.visualize import main as visualize_main

if __name__ == "__main__":
    sys.exit(visualize_main(prog="tools/visualize.py"))
