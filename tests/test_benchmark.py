"""tools/benchmark.py: argument parsing and one tiny end-to-end run."""
import json

import pytest

from tokenreduce.benchmark import main, parse_run


def test_parse_run():
    assert parse_run("tome") == ("tome", {})
    assert parse_run("tome:r=16,prop_attn=false") == ("tome", {"r": 16, "prop_attn": False})
    assert parse_run("tome:r=[16,-1.0]") == ("tome", {"r": [16, -1.0]})
    with pytest.raises(ValueError, match="key=value"):
        parse_run("tome:16")


def test_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "2", "--iters", "1",
                 "--repeats", "1", "--warmup", "0", "--device", "cpu", "--run", "tome:r=2",
                 "--json", str(out), "--csv", str(tmp_path / "rows.csv")])
    assert [r.method for r in rows] == ["none", "tome"]
    assert rows[1].gflops < rows[0].gflops and rows[1].flop_speedup > 1
    assert json.loads(out.read_text())["rows"][1]["params"] == "r=2"
    assert "| tome | r=2 |" in capsys.readouterr().out
