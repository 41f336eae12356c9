"""Print the README's methods × backbones table from what ``tokenreduce.check`` says on tiny random models.

    python tools/backbone_table.py            # markdown: ✓, or — with the first clause of patch's reason

Every registered method is checked on a tiny timm ViT, LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and
Qwen3-VL (the test suite's builders, random weights, nothing downloaded). A method whose defaults do not fit a
3-layer language model (PyramidDrop, SparseVLM) is checked at the layers the backbone tests use, and CDPruner with a
tiny CLIP text encoder, so a ``—`` is a refusal of the method on that backbone, never of a tiny model's size.
``✓`` means ``patch`` accepts it; the backbone tests show each accepted pair batched equal to each sample alone.
"""
import re
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenreduce  # noqa: E402

#: parameters for a 3-layer language model, where a method's defaults name deeper layers
SMALL_MODEL_PARAMS = {"pdrop": dict(layers=[1, 2], keep_ratio=[0.5, 0.25]), "sparsevlm": dict(layers=[0, 1], counts=[24, 10])}


def backbones():
    from tests.backbones._anyres import tiny_next, tiny_onevision
    from tests.conftest import tiny_vit
    from tests.llava_helpers import tiny_llava
    from tests.qwen_vl_helpers import tiny_qwen
    return {"timm ViT": tiny_vit(), "LLaVA-1.5": tiny_llava(), "LLaVA-NeXT": tiny_next(),
            "LLaVA-OneVision": tiny_onevision(), "Qwen2.5-VL": tiny_qwen("qwen2.5"), "Qwen3-VL": tiny_qwen("qwen3")}


def verdict(model, method: str, params) -> str:
    """``"✓"`` when ``patch`` would accept the method, else ``"— <patch's reason, its first clause>"``."""
    try:
        tokenreduce.check(model, method, **params)
    except (ValueError, TypeError) as error:
        reason = re.split(r"; | \(it |: ", str(error))[0]
        return "— " + (reason if len(reason) <= 100 else reason[:99] + "…")
    return "✓"


def main() -> int:
    warnings.filterwarnings("ignore")
    from tests.backbones._anyres import tiny_clip_dir
    models = backbones()
    with tempfile.TemporaryDirectory() as tmp:
        extra = dict(SMALL_MODEL_PARAMS, cdpruner=dict(text_encoder=tiny_clip_dir(Path(tmp) / "clip")))
        print("| method | " + " | ".join(models) + " |")
        print("|---" * (len(models) + 1) + "|")
        for method in tokenreduce.list_methods():
            cells = [verdict(model, method, extra.get(method, {})) for model in models.values()]
            print(f"| `{method}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
