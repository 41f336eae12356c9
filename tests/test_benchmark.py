"""tools/benchmark.py: argument parsing and one tiny end-to-end run."""
import json

import pytest

from tokenreduce.cli.bench import main
from tokenreduce.cli.common import parse_run


def test_parse_run():
    assert parse_run("tome") == ("tome", {})
    assert parse_run("tome:r=16,prop_attn=false") == ("tome", {"r": 16, "prop_attn": False})
    assert parse_run("tome:r=[16,-1.0]") == ("tome", {"r": [16, -1.0]})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_run("tome:16")


def test_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch-size", "2", "--iters", "1",
                 "--repeats", "1", "--warmup", "0", "--device", "cpu", "--run", "tome:r=2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "tome"]
    assert rows[1]["gflops"] < rows[0]["gflops"] and rows[1]["flop_speedup"] > 1
    assert rows[1]["params"] == "r=2"
    assert (tmp_path / "rows.csv").read_text().splitlines()[0].startswith("model,method,params")
    assert "| tome | r=2 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [(["--run", "tome:16"], "KEY=VALUE"),
                                          (["--run", "nosuch"], "unknown method 'nosuch'"),
                                          (["--run", "tome:q=1"], "unknown parameter")])
def test_errors_are_one_line(argv, message, capsys):
    assert main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "1", "--repeats", "1",
                 "--iters", "1", "--warmup", "0", "--device", "cpu"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "(default: 8)" in capsys.readouterr().out
