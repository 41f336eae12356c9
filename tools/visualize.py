#!/usr/bin/env python3
"""Draw which patches a method merged or dropped (see `python tools/visualize.py --help`)."""
import sys

from tokenreduce.viz import visualize_main

if __name__ == "__main__":
    sys.exit(visualize_main(prog="tools/visualize.py"))
