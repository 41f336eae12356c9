"""The base of the Hugging Face VLM adapters (the LLaVA family, Qwen-VL)."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch.nn as nn

from ..base import Adapter
from .shrink import check_transformers


class VlmAdapter(Adapter):
    """Claims exactly its ``model_class`` (not subclasses, whose forward may differ) and refuses a transformers
    older than the VLM backbones' floor before anything is built."""

    #: the ``...ForConditionalGeneration`` class this adapter claims
    model_class: ClassVar[Optional[type]] = None

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        return cls.model_class is not None and type(model) is cls.model_class

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        check_transformers()
