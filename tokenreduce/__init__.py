"""tokenreduce: token merging and pruning for vision transformers and vision-language models, faithful to the
papers and fast.

    import timm, tokenreduce
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tokenreduce.patch(model, "tome", r=16)
    logits = model(images)
    tokenreduce.info(model).macs

The public names are imported on first use, so ``import tokenreduce.core`` (the contracts) registers nothing.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_PUBLIC = {
    "patch": "api", "unpatch": "api", "info": "api", "is_patched": "api", "list_methods": "api",
    "method_params": "api", "get_method": "api", "build_method": "api", "method_of": "api",
    "describe_params": "api", "count_macs": "api", "check": "api", "instructions": "api",
    "register_method": "core", "Param": "core", "ReductionMethod": "core", "Site": "core", "Need": "core",
    "Geometry": "core", "TokenState": "core", "ReductionInfo": "core",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
        if _PUBLIC[name] == "core":
            importlib.import_module(".api", __name__)  # the built-in methods register with the first public use
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenreduce' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))
