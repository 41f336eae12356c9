"""Offline assets of the smoke job: a tiny random LLaVA-1.5 checkpoint and the small local tasks.

Nothing here downloads. :func:`build_tiny_llava` writes a complete Hugging Face checkpoint folder (model weights,
a word-level tokenizer built with ``tokenizers``, a CLIP image processor and the LLaVA processor), which
``from_pretrained`` — ours and lmms-eval's own ``llava_hf`` — loads like any hub checkpoint. The tasks
(``tr_smoke_gen``: short answers by generation; ``tr_smoke_mc``: multiple choice by log-likelihood) are five
samples in a parquet file with their lmms-eval YAML, shipped with the tests under
``tests/integrations/lmms_eval/smoke_task/`` (:func:`smoke_task_dir`).

The model is LLaVA-1.5 in miniature: a 3-layer CLIP tower (features from layer -2, CLS dropped, 56 px images in
7 px patches = 64 visual tokens per image) and a 3-layer Llama with GQA. Weights are random, so its answers are
meaningless; what the smoke job checks is that every method runs end to end and how far each one moves the
answers away from the unpatched model's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple, Union

#: Visual tokens per image of the tiny model: (56 / 7) ** 2
TINY_VISUAL_TOKENS = 64
TINY_IMAGE_SIZE = 56
TINY_PATCH = 7

SMOKE_TASKS = ("tr_smoke_gen", "tr_smoke_mc")

# Every word the smoke prompts use (the LLaVA-1.5 conversation format and the questions), so nothing maps to
# <unk> and the random model's answers are real words. Split the way the Whitespace pre-tokenizer splits.
_WORDS = """
A a chat between curious user and an artificial intelligence assistant . The the assistant gives helpful , detailed
polite answers to ' s questions USER : ASSISTANT What what colour color is shape shown in this image ? Answer with
one word Which of these options describes it best B C D Options red green blue yellow black white grey square circle
triangle cross stripe dot large small top left right bottom centre center picture there yes no Is of or it here
""".split()
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


def _vocab() -> Dict[str, int]:
    words = list(dict.fromkeys(_SPECIALS + _WORDS))
    return {w: i for i, w in enumerate(words)}


def build_tokenizer():
    """A ``PreTrainedTokenizerFast``: word level, BOS added like LLaMA's, ``<image>`` a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces and keeps punctuation readable
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


#: LLaVA-NeXT's anyres grids in miniature: 1×2, 2×1 and 2×2 crops of 56 px, plus the base image
TINY_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def _tower_and_lm(vocab: Dict[str, int]) -> Tuple[dict, dict]:
    """The CLIP tower and Llama configs both tiny families share."""
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, hidden_act="quick_gelu")
    text = dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    return vision, text


def build_tiny_llava(path: Union[str, Path], *, family: str = "llava", seed: int = 0) -> Path:
    """Write a tiny random checkpoint (float32) with its processor to ``path``; returns the folder.

    Args:
        family: ``llava`` (``LlavaForConditionalGeneration``, 64 visual tokens per image) or ``llava_next``
            (``LlavaNextForConditionalGeneration``: anyres crops of the same tower plus the base image, with
            image-newline tokens; a smoke-task image, 56×56, gives 136 visual tokens).

    Building takes about a second; nothing is downloaded.
    """
    import torch
    import transformers

    if family not in ("llava", "llava_next"):
        raise ValueError(f"family must be llava or llava_next, got {family!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    vision, text = _tower_and_lm(vocab)
    common = dict(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=TINY_VISUAL_TOKENS)
    size = dict(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    if family == "llava":
        cfg = transformers.LlavaConfig(**common)
        model_cls, processor_cls = transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor
        image_processor = transformers.CLIPImageProcessor(**size)
    else:
        cfg = transformers.LlavaNextConfig(**common, image_grid_pinpoints=TINY_NEXT_PINPOINTS)
        model_cls, processor_cls = transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextProcessor
        image_processor = transformers.LlavaNextImageProcessor(**size, image_grid_pinpoints=TINY_NEXT_PINPOINTS)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():  # extra noise: attention far from uniform, so selections are far from ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(path)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    processor.save_pretrained(path)
    return path


def smoke_task_dir() -> Path:
    """The folder of the shipped smoke tasks (YAML + parquet), in a source checkout.

    Raises FileNotFoundError with what to do when tokenreduce runs from an installed wheel (the tasks ship with
    the tests, not the package).
    """
    root = Path(__file__).resolve().parents[3]
    folder = root / "tests" / "integrations" / "lmms_eval" / "smoke_task"
    if not (folder / "tr_smoke_gen.yaml").is_file():
        raise FileNotFoundError(
            f"the smoke tasks are not at {folder}: the default job needs a source checkout of tokenreduce "
            "(they ship with its tests); otherwise pass --model PATH and --tasks NAMES")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# The five samples (used by tests/integrations/lmms_eval/smoke_task/build_parquet.py to write the shipped file)
# ---------------------------------------------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "white": (250, 250, 250)}
SHAPES = ("square", "circle", "triangle", "cross", "stripe")
# Different lengths, so batches are padded and a batch of two must still give what each sample gives alone.
QUESTIONS = ("What colour is the shape shown in this image ?", "What colour is it ?",
             "Which colour is the shape in the picture ?", "What is the colour of the shape here ?",
             "Is the shape red , green , blue , yellow or white ?")


def smoke_samples() -> List[dict]:
    """Five documents: a coloured shape on a grey background, a question, a short answer, four options.

    Images are 56×56 PNG bytes (the parquet stores them as ``{"bytes": ...}`` so ``datasets`` decodes them to
    PIL images).
    """
    colours = list(COLOURS)
    docs = []
    for i, (colour, shape) in enumerate(zip(colours, SHAPES)):
        options = [colours[(i + k) % len(colours)] for k in range(4)]
        shift = i % len(options)  # the answer is option A, B, C, D, A in turn
        order = options[len(options) - shift:] + options[:len(options) - shift]
        docs.append({"id": i, "image": {"bytes": _png(colour, shape), "path": None},
                     "question": QUESTIONS[i], "answer": colour,
                     "shape": shape, "options": json.dumps(order), "label": order.index(colour)})
    return docs


def _png(colour: str, shape: str) -> bytes:
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    fill, box = COLOURS[colour], (12, 12, 44, 44)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(28, 10), (46, 46), (10, 46)], fill=fill)
    elif shape == "cross":
        draw.rectangle((24, 8, 32, 48), fill=fill)
        draw.rectangle((8, 24, 48, 32), fill=fill)
    elif shape == "stripe":
        draw.rectangle((4, 22, 52, 34), fill=fill)
    else:
        draw.rectangle(box, fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


__all__ = ["SMOKE_TASKS", "TINY_NEXT_PINPOINTS", "TINY_VISUAL_TOKENS", "build_tiny_llava", "build_tokenizer", "smoke_samples",
           "smoke_task_dir"]
