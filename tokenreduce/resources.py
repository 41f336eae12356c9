"""Where the repository's data folders (``configs/``, ``checkpoints/``) are, from a checkout or an installed wheel.

setup.cfg installs them as the data-only packages ``tokenreduce._configs`` and ``tokenreduce._checkpoints``, so
published configs and the reference model work after ``pip install`` as well as in an editable checkout.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def data_dir(name: str) -> Path:
    """The folder ``name`` (``"configs"`` or ``"checkpoints"``)."""
    try:
        spec = importlib.util.find_spec(f"tokenreduce._{name}")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[1] / name
