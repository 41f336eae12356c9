"""Qwen2.5-VL and Qwen3-VL (``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``): one adapter
for both, the tower-output site on the patch merger's tokens, the M-RoPE prompt bookkeeping, and the visual-token
counts a server needs (:mod:`.counts`)."""
from .adapter import Qwen2_5_VLAdapter, Qwen3VLAdapter, QwenVLAdapter
from .counts import image_grid, merged_tokens, reduced_tokens, tower_geometry

__all__ = ["QwenVLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter", "image_grid", "merged_tokens", "reduced_tokens",
           "tower_geometry"]
