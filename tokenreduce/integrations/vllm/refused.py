"""vLLM architectures the plugin does not reduce yet: with a ``tokenreduce`` key they refuse to load, with the
reason, instead of silently serving the unreduced model. Without the key each is exactly vLLM's class.

The classes are made on first access (module ``__getattr__``), so resolving one imports only its vLLM module.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

from .config import spec_of

_NEXT = ("its anyres crops and image-newline tokens give each image a count that depends on the image size, and "
         "the per-crop budget with a consistent newline layout is not implemented in the plugin yet")
_QWEN = ("Qwen-VL places image tokens with 3-D M-RoPE positions from the image grid, so a shorter placeholder run "
         "needs vLLM's multimodal-pruning position recompute (SupportsMultiModalPruning.recompute_mrope_positions), "
         "which vLLM 0.32 turns on only for its own video pruning (--video-pruning-rate) and never on the CPU "
         "runner; and the count depends on the image resolution")

#: class name here -> (vLLM module, vLLM class, architecture name, why it is refused)
REFUSED: Dict[str, Tuple[str, str, str, str]] = {
    "RefusingLlavaNext": ("vllm.model_executor.models.llava_next", "LlavaNextForConditionalGeneration",
                          "LlavaNextForConditionalGeneration", _NEXT),
    "RefusingLlavaOnevision": ("vllm.model_executor.models.llava_onevision", "LlavaOnevisionForConditionalGeneration",
                               "LlavaOnevisionForConditionalGeneration", _NEXT),
    "RefusingQwen2VL": ("vllm.model_executor.models.qwen2_vl", "Qwen2VLForConditionalGeneration",
                        "Qwen2VLForConditionalGeneration", _QWEN),
    "RefusingQwen2_5_VL": ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                           "Qwen2_5_VLForConditionalGeneration", _QWEN),
    "RefusingQwen3VL": ("vllm.model_executor.models.qwen3_vl", "Qwen3VLForConditionalGeneration",
                        "Qwen3VLForConditionalGeneration", _QWEN),
}


def refusal(arch: str, reason: str) -> str:
    return (f"tokenreduce cannot reduce {arch} in vLLM yet: {reason}. Remove 'tokenreduce' from hf_overrides to "
            "serve it unreduced, or serve a LLaVA-1.5 model (LlavaForConditionalGeneration); see docs/serving.md")


def _make(name: str) -> type:
    module, base_name, arch, reason = REFUSED[name]
    base = getattr(importlib.import_module(module), base_name)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        if spec_of(vllm_config.model_config.hf_config) is not None:
            from ._bridge import Unsupported

            raise Unsupported(refusal(arch, reason))
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"vLLM's {base_name}; refuses a tokenreduce spec ({reason})."})
    globals()[name] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name in REFUSED:
        return _make(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
