"""Rebuild smoke.parquet (five samples) from tokenreduce's smoke assets: `python build_parquet.py`.

The file is committed so the task works as shipped; this script documents how it was made. Needs `datasets`
(present wherever lmms-eval is installed).
"""
from __future__ import annotations

from pathlib import Path

from datasets import Dataset, Features, Image, Value

from tokenreduce.integrations.lmms_eval.smoke import smoke_samples

FEATURES = Features({"id": Value("int64"), "image": Image(), "question": Value("string"),
                     "answer": Value("string"), "shape": Value("string"), "options": Value("string"),
                     "label": Value("int64")})


def build(path: Path) -> Path:
    Dataset.from_list(smoke_samples(), features=FEATURES).to_parquet(str(path))
    return path


if __name__ == "__main__":
    print(build(Path(__file__).with_name("smoke.parquet")))
