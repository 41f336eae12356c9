"""Integrations with serving and evaluation frameworks that live in their own environments (vLLM, lmms-eval).

Nothing here is imported by ``import tokenreduce``: each subpackage imports its framework itself, and only when the
framework loads it.
"""
