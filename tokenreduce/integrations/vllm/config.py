"""The one ``hf_overrides`` key that turns the plugin on, and reading it from a model config (no vLLM import)."""
from __future__ import annotations

from typing import Any, Optional

#: ``LLM(model, hf_overrides={SPEC_KEY: {"method": "visionzip", "dominant": 54, "contextual": 10}})``
SPEC_KEY = "tokenreduce"


def spec_of(hf_config: Any) -> Optional[Any]:
    """The ``tokenreduce`` spec vLLM copied from ``hf_overrides`` onto the config (a dict, or JSON text), or None."""
    spec = getattr(hf_config, SPEC_KEY, None)
    return None if spec is None or spec == {} else spec
