"""Load any Hugging Face VLM from a checkpoint folder or hub id, the family read from its config.

Which class to build is data, not a table of ours: the checkpoint's ``config.json`` names it in
``architectures`` (the class it was saved from), and transformers' ``AutoModelForImageTextToText`` maps its
``model_type`` otherwise. So a family works here as soon as transformers knows it, and tokenreduce can reduce it
as soon as its adapter lands (``tokenreduce.patch`` says which families it supports when it cannot).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float64": torch.float64, "double": torch.float64}


@dataclass
class LoadedVLM:
    """A model with its processor, on its device, in eval mode.

    Attributes:
        model: the ``...ForConditionalGeneration`` module.
        processor: its ``AutoProcessor`` (tokenizer padding on the left, as batched generation needs).
        pretrained: what it was loaded from.
        family: the config's ``model_type`` (``llava``, ``llava_next``, ``qwen2_5_vl``, ...).
    """

    model: Any
    processor: Any
    pretrained: str
    family: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def to_model(self, inputs: Any) -> dict:
        """Processor outputs as model inputs: tensors on the model's device, floats in its dtype."""
        device, dtype = self.device, self.dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                for k, v in dict(inputs).items() if isinstance(v, torch.Tensor)}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Union[str, torch.dtype]:
    """``"auto"`` / None (the checkpoint's dtype) or a torch dtype from a name such as ``"bfloat16"``."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return "auto" if dtype is None else dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of: {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[key]


def resolve_device(device: Optional[str]) -> torch.device:
    """The device to run on: as given, else ``cuda`` when available, else ``cpu``."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_class(config: Any) -> type:
    """The transformers class to build for ``config``.

    The class named first in ``config.architectures`` when transformers has it (what the checkpoint was saved
    as), else ``AutoModelForImageTextToText``'s class for the ``model_type``. ValueError when neither knows it.
    """
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    from transformers import AutoModelForImageTextToText
    try:
        return AutoModelForImageTextToText._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers {transformers.__version__} has no image-text-to-text model for "
                         f"model_type {config.model_type!r} (architectures: {config.architectures}); is it a VLM "
                         "checkpoint, and is transformers new enough for it?") from None


def load_vlm(pretrained: str, *, device: Optional[str] = None, dtype: Union[str, torch.dtype, None] = "auto",
             attn_implementation: Optional[str] = None, revision: Optional[str] = None,
             trust_remote_code: bool = False) -> LoadedVLM:
    """Load model and processor from ``pretrained`` (a folder or a hub id already in the local cache).

    Args:
        pretrained: checkpoint folder or hub id.
        device: ``cuda``, ``cuda:1``, ``cpu``; default: cuda when available.
        dtype: ``auto`` (the checkpoint's), ``bfloat16``, ``float16``, ``float32``, ``float64``.
        attn_implementation: ``sdpa`` (transformers' default), ``eager``, ``flash_attention_2``.
    """
    from transformers import AutoConfig, AutoProcessor

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(pretrained, **kwargs)
    cls = model_class(config)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = cls.from_pretrained(pretrained, dtype=resolve_dtype(dtype), **kwargs, **extra)
    model.to(resolve_device(device)).eval()
    processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last real token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedVLM(model=model, processor=processor, pretrained=str(pretrained), family=config.model_type)


__all__ = ["LoadedVLM", "load_vlm", "model_class", "resolve_device", "resolve_dtype"]
