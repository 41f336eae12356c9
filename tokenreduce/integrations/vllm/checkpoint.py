"""Write a random LLaVA-1.5-style checkpoint to disk that vLLM can serve: config, weights, tokenizer, processor.

Used by the plugin's tests (a tiny model, built in seconds) and by ``tools/bench_vllm.py`` (a real-shaped one).
Nothing is downloaded: the tokenizer is a word-level ``tokenizers`` model over a made-up vocabulary and the image
processor is a ``CLIPImageProcessor`` configured here. Imports transformers and tokenizers, never vLLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Shape:
    """The shape of a random LLaVA. ``tiny()`` for tests, ``llava15_7b()`` for a real-shaped benchmark model."""

    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 56
    patch_size: int = 7
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 2  # head_dim 32: vLLM's CPU attention backend needs head sizes 32, 64, 80, ...
    text_kv_heads: int = 1
    vocab_words: int = 59  # plus the 4 specials and <image>: a 64-token vocabulary
    max_position: int = 2048

    @staticmethod
    def tiny() -> "Shape":
        return Shape()

    @staticmethod
    def llava15_7b(text_layers: int = 32, vision_layers: int = 24) -> "Shape":
        """LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336: 576 patches; Vicuna-7B), random weights."""
        return Shape(vision_hidden=1024, vision_intermediate=4096, vision_layers=vision_layers, vision_heads=16,
                     image_size=336, patch_size=14, text_hidden=4096, text_intermediate=11008,
                     text_layers=text_layers, text_heads=32, text_kv_heads=32, vocab_words=32000 - 5,
                     max_position=4096)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + self.vocab_words + 1


def words(shape: Shape) -> List[str]:
    """The vocabulary's words (``w0``, ``w1``, ...), in id order after the specials."""
    return [f"w{i}" for i in range(shape.vocab_words)]


def llava_config(shape: Shape) -> Any:
    """A ``transformers.LlavaConfig``: features from layer -2 with the CLS token dropped (LLaVA-1.5's choice)."""
    import transformers

    image_token_id = shape.vocab_size - 1
    return transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=shape.vision_hidden,
                           intermediate_size=shape.vision_intermediate, num_hidden_layers=shape.vision_layers,
                           num_attention_heads=shape.vision_heads, image_size=shape.image_size,
                           patch_size=shape.patch_size, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", vocab_size=shape.vocab_size, hidden_size=shape.text_hidden,
                         intermediate_size=shape.text_intermediate, num_hidden_layers=shape.text_layers,
                         num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_kv_heads,
                         max_position_embeddings=shape.max_position, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False),
        image_token_index=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=shape.num_patches, architectures=["LlavaForConditionalGeneration"],
        pad_token_id=0)


def random_llava(shape: Shape, seed: int = 0, noise: float = 0.05,
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random ``LlavaForConditionalGeneration`` in eval mode (float32 by default). Extra weight noise keeps
    attention far from uniform, so selections are far from ties and float32 kernels agree on them."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(llava_config(shape))
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    return model.to(dtype).eval()


def vllm_weight_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename HF-v5 vision-tower keys for vLLM: transformers saves ``model.vision_tower.embeddings.*`` (its
    ``CLIPVisionModel`` without the ``vision_model`` level), vLLM's loader expects ``...vision_tower.vision_model.*``."""
    out = {}
    prefix = "model.vision_tower."
    for name, tensor in state.items():
        if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
            name = prefix + "vision_model." + name[len(prefix):]
        out[name] = tensor.contiguous()
    return out


def build_tokenizer(shape: Shape) -> Any:
    """A word-level fast tokenizer: specials, ``w0..wN``, then ``<image>`` (the model's image token id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + words(shape) + [IMAGE_TOKEN])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_processor(shape: Shape, tokenizer: Any) -> Any:
    """``LlavaProcessor`` with a ``CLIPImageProcessor`` that resizes and center-crops to the tower's input size."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": shape.image_size},
                                         crop_size={"height": shape.image_size, "width": shape.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def write_checkpoint(path: Path, shape: Optional[Shape] = None, seed: int = 0,
                     model: Optional[torch.nn.Module] = None, dtype: torch.dtype = torch.float32,
                     noise: float = 0.05) -> torch.nn.Module:
    """Write a servable checkpoint to ``path`` and return the HF model whose weights it holds.

    ``path`` gets ``config.json``, ``model.safetensors`` (vision keys renamed for vLLM), the tokenizer files and the
    processor config. The returned model is the in-memory HF reference with exactly those weights.
    """
    from safetensors.torch import save_file

    shape = shape or Shape.tiny()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else random_llava(shape, seed, noise, dtype)
    model.config.dtype = dtype  # vLLM's dtype="auto" follows it
    model.config.save_pretrained(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_file(vllm_weight_names(state), str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = build_tokenizer(shape)
    processor = build_processor(shape, tokenizer)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                             "pad_token_id": 0}))
    return model
