"""Imported first by every tool: makes ``import tokenreduce`` work from a plain checkout, without installing."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
