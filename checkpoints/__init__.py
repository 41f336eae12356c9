"""Data only: the repository's checkpoints/ folder, installed as tokenreduce._checkpoints (see tokenreduce.resources)."""
