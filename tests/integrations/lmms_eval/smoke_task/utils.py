"""Document functions of the tokenreduce smoke tasks (loaded by lmms-eval from the task YAML's folder)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional


def doc_to_visual(doc: Dict[str, Any]) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text_gen(doc: Dict[str, Any], lmms_eval_specific_kwargs: Optional[dict] = None) -> str:
    return f"{doc['question']}\nAnswer with one word ."


def doc_to_text_mc(doc: Dict[str, Any], lmms_eval_specific_kwargs: Optional[dict] = None) -> str:
    return f"{doc['question']}\nAnswer with one word :"


def doc_to_choice(doc: Dict[str, Any]) -> List[str]:
    return json.loads(doc["options"])


def process_results_gen(doc: Dict[str, Any], results: List[str]) -> Dict[str, float]:
    words = results[0].strip().lower().split()
    return {"exact_match": float(bool(words) and words[0].strip(".") == doc["answer"])}
