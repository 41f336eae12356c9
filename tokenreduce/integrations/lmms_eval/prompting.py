"""Turn an lmms-eval request into the model's prompt text, and score continuations.

The prompt follows the checkpoint: its processor's chat template when it has one (images as structured
``{"type": "image"}`` parts, which is what Qwen-VL and LLaVA-OneVision templates expect), else its tokenizer's
chat template (the image placeholder written into the text), else the LLaVA-1.5 conversation format that
lmms-eval's built-in LLaVA models also fall back to. A context that already contains the image placeholder is
used as is; otherwise one placeholder per image goes in front of it.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

#: LLaVA-1.5's system prompt (the ``vicuna_v1`` conversation), used when the checkpoint has no chat template
LLAVA15_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")


def image_placeholder(processor: Any) -> str:
    """The text the processor expands into an image's visual tokens (``<image>`` for LLaVA)."""
    token = getattr(processor, "image_token", None)
    return token if isinstance(token, str) and token else "<image>"


def with_placeholders(context: str, num_images: int, placeholder: str) -> str:
    """``context`` with one placeholder per image in front, unless it already places them itself."""
    if num_images == 0 or placeholder in context:
        return context
    return " ".join([placeholder] * num_images) + "\n" + context


def render(processor: Any, context: str, num_images: int, continuation: Optional[str] = None,
           chat_template: Optional[str] = None) -> str:
    """The prompt text for ``context`` with ``num_images`` images; with ``continuation``, the whole exchange
    (the assistant's answer and the template's end of turn), whose extra tokens are what gets scored."""
    tokenizer = getattr(processor, "tokenizer", processor)
    placeholder = image_placeholder(processor)
    template = chat_template or getattr(processor, "chat_template", None)
    if template and placeholder not in context:
        user = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
        return _apply(processor, [{"role": "user", "content": user}], continuation, template)
    text = with_placeholders(context, num_images, placeholder)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        return _apply(tokenizer, [{"role": "user", "content": text}], continuation, template)
    prompt = f"{LLAVA15_SYSTEM} USER: {text} ASSISTANT:"
    return prompt if continuation is None else f"{prompt} {continuation}{tokenizer.eos_token or ''}"


def _apply(owner: Any, messages: List[dict], continuation: Optional[str], template: str) -> str:
    if continuation is None:
        return owner.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    content: Any = continuation
    if isinstance(messages[0]["content"], list):
        content = [{"type": "text", "text": continuation}]
    messages = messages + [{"role": "assistant", "content": content}]
    return owner.apply_chat_template(messages, chat_template=template, tokenize=False,
                                     add_generation_prompt=False)


def continuation_length(tokenizer: Any, prompt: str, full: str) -> int:
    """Tokens ``full`` has beyond ``prompt`` (placeholders count one each on both sides, so the image expansion
    cancels). ValueError when the continuation adds nothing."""
    n = len(tokenizer(full).input_ids) - len(tokenizer(prompt).input_ids)
    if n <= 0:
        raise ValueError(f"the continuation adds no token to the prompt (prompt {prompt[-60:]!r}, "
                         f"full {full[-60:]!r})")
    return n


def score_tails(logits: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int]
                ) -> List[Tuple[float, int, bool]]:
    """Score the last ``lengths[b]`` tokens of each left-padded row.

    Args:
        logits: ``[B, S', V]``; ``S'`` may be shorter than ``S`` (a method shortened the visual part, or only
            the last positions were computed), but the tail — the text after the last image — is never touched,
            so it aligns with the end of each row.
        input_ids: ``[B, S]`` the tokens fed to the model (left padded, so every row ends at the last column).
        lengths: scored tokens per row.

    Returns:
        Per row ``(summed negative log-likelihood, number of tokens, whether greedy decoding gives the tail)``.
    """
    out = []
    tail = max(lengths) + 1
    if logits.shape[1] < tail:
        raise ValueError(f"logits cover {logits.shape[1]} positions, scoring needs the last {tail}")
    logp = torch.log_softmax(logits[:, -tail:].double(), dim=-1)  # only the tail: the vocabulary is large
    for b, n in enumerate(lengths):
        target = input_ids[b, -n:]
        pred = logp[b, -n - 1:-1]  # position t predicts token t + 1
        nll = -pred.gather(-1, target[:, None].to(pred.device)).sum()
        greedy = bool((pred.argmax(-1).cpu() == target.cpu()).all())
        out.append((float(nll), n, greedy))
    return out


__all__ = ["LLAVA15_SYSTEM", "continuation_length", "image_placeholder", "render", "score_tails",
           "with_placeholders"]
