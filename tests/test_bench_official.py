"""tools/bench_official.py: recognising the official checkouts, translating settings, and one end-to-end run against
a stand-in checkout (the real ones are never downloaded by the tests)."""
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_official", ROOT / "tools" / "bench_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


def fake_tome_checkout(root: Path) -> Path:
    """A directory laid out like facebookresearch/ToMe whose ``tome.patch.timm`` patches with tokenreduce when
    ``model.r`` is set (ToMe's protocol), so its logits must equal tokenreduce's exactly."""
    (root / "tome" / "patch").mkdir(parents=True)
    (root / "tome" / "__init__.py").write_text("from . import patch\n")
    (root / "tome" / "patch" / "__init__.py").write_text("from .timm import apply_patch as timm\n")
    (root / "tome" / "patch" / "timm.py").write_text(textwrap.dedent("""
        def apply_patch(model, trace_source=False, prop_attn=True):
            import tokenreduce
            base = type(model)

            class StandIn(base):
                def __setattr__(self, name, value):
                    if name == "r":
                        tokenreduce.patch(self, "tome", r=value, prop_attn=prop_attn)
                    super().__setattr__(name, value)

            model.__class__ = StandIn
    """))
    return root


def test_detect_reads_the_layout(tool, tmp_path):
    for method, rel in tool.LAYOUTS.items():
        root = tmp_path / method
        (root / rel).parent.mkdir(parents=True)
        (root / rel).write_text("")
        assert tool.detect(str(root)) == method
    with pytest.raises(ValueError, match="not a checkout"):
        tool.detect(str(tmp_path))


def test_settings_translate_to_the_official_knobs(tool):
    assert tool.default_setting("tome", 384) == {"r": 13} and tool.default_setting("tome", 768) == {"r": 16}
    # ATC's off-the-shelf patch removes R - 1 tokens per block with a class token: same removal, R = r + 1.
    assert tool.official_setting("atc", {"r": 13, "linkage": "average"}, 12)["r"] == 14
    assert tool.official_setting("atc", {"r": [2, 3]}, 2)["r"] == [3, 4]
    assert tool.official_setting("pitome", {"ratio": 0.925}, 12) == {"ratio": 0.925}
    diffrate = tool.official_setting("diffrate", tool.default_setting("diffrate", 384), 12)
    assert len(diffrate["prune_kept"]) == len(diffrate["merge_kept"]) == 12 and diffrate["prune_kept"][0] == 197
    with pytest.raises(ValueError, match="no released DiffRate table"):
        tool.default_setting("diffrate", 100)


@pytest.mark.slow
@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker"])
def test_end_to_end_against_a_stand_in(tool, tmp_path, capsys, isolate):
    checkout = fake_tome_checkout(tmp_path / "ToMe")
    out = tmp_path / "side_by_side.md"
    argv = ["--official", str(checkout), "--model", "vit_tiny_patch16_224", "--batch-size", "2", "--threads", "1",
            "--repeats", "1", "--warmup", "0", "--pause", "0", "--setting", "tome:r=4", "--out", str(out)]
    try:
        assert tool.main(argv + (["--isolate"] if isolate else [])) == 0
    finally:
        sys.modules.pop("tome", None), sys.modules.pop("tome.patch", None), sys.modules.pop("tome.patch.timm", None)
        if str(checkout.resolve()) in sys.path:
            sys.path.remove(str(checkout.resolve()))
    printed = capsys.readouterr().out
    assert "max |diff| 0.00e+00" in printed  # the stand-in is tokenreduce: identical logits
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["method"], r["params"], r["official_setting"]) for r in rows] == [("tome", "r=4", "r=4 prop_attn=true")]
    assert rows[0]["max_diff"] == 0.0 and rows[0]["ratio"] > 0 and rows[0]["flop_speedup"] > 1
    assert "| vit_tiny_patch16_224 | tome | r=4 |" in out.read_text()
