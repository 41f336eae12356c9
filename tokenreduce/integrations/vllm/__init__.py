"""tokenreduce's vLLM plugin: serve LLaVA with a vision-side token-reduction method chosen per run.

    from vllm import LLM
    llm = LLM(model=path, hf_overrides={"tokenreduce": {"method": "visionzip", "dominant": 54, "contextual": 10}})

    vllm serve PATH --hf-overrides '{"tokenreduce": {"method": "tome", "r": 8}}'

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point ``tokenreduce`` and calls it in every
process it starts (front end, engine core, each worker). It registers classes by ``"module:Class"`` strings only:
nothing here imports vLLM or torch until vLLM resolves an architecture, and ``import tokenreduce`` never imports
this package. See docs/serving.md.
"""
from __future__ import annotations

import os

from .config import SPEC_KEY

#: vLLM architecture -> the plugin's class that vLLM should build for it.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "tokenreduce.integrations.vllm.llava:TokenReduceLlavaForConditionalGeneration",
}

__all__ = ["ARCHITECTURES", "SPEC_KEY", "register"]


def _architectures() -> dict:
    from .refused import REFUSED

    refused = {arch: f"tokenreduce.integrations.vllm.refused:{name}" for name, (_, _, arch, _) in REFUSED.items()}
    return {**refused, **ARCHITECTURES}


def register() -> None:
    """Register the plugin's architectures with vLLM (idempotent: vLLM calls it once per process, tests again).

    Without a ``tokenreduce`` key in ``hf_overrides`` every registered class behaves exactly like vLLM's own. Set
    ``TOKENREDUCE_VLLM_TRACE=/some/file`` to have each process that loads the plugin append its pid there.
    """
    from vllm import ModelRegistry

    for arch, target in _architectures().items():
        ModelRegistry.register_model(arch, target)
    trace = os.environ.get("TOKENREDUCE_VLLM_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(f"{os.getpid()}\n")
