"""Data only: the repository's configs/ folder, installed as tokenreduce._configs (see tokenreduce.resources)."""
