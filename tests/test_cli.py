"""The `tokenreduce` command: help of every subcommand, `methods`, dispatch and errors."""
from __future__ import annotations

import json

import pytest

import tokenreduce
from tokenreduce import cli


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``tokenreduce ARGV``; argparse's SystemExit becomes the status."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_top_level_help_lists_commands(capsys):
    for argv in ([], ["--help"]):
        rc, out, _ = run(capsys, *argv)
        assert rc == 0
        for name in cli.COMMANDS:
            assert name in out


@pytest.mark.parametrize("command,expected", [
    ("eval", ["--data", "--model", "--pretrained", "--checkpoint", "--method", "--param", "--config", "--img-size",
              "--crop-pct", "--interpolation", "--batch-size", "--workers", "--amp", "--channels-last", "--compile",
              "--device", "--baseline", "--results-file", "dataset-fashion-mnist"]),
    ("bench", ["--model", "--run", "--batch-size"]),
    ("search-rates", ["--target-gflops", "--model"]),
    ("methods", ["--json", "NAME"]),
])
def test_subcommand_help(capsys, command, expected):
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0
    assert f"usage: tokenreduce {command}" in out
    for option in expected:
        assert option in out, option


def test_methods_lists_every_registered_method(capsys):
    rc, out, _ = run(capsys, "methods")
    assert rc == 0
    for name in tokenreduce.list_methods():
        assert f"\n{name}: " in "\n" + out
    assert "    r = 0" in out  # ToMe's parameter with its default
    rc, out, _ = run(capsys, "methods", "--json", "--common", "tome")
    listing = json.loads(out)
    assert [m["name"] for m in listing] == ["tome"]
    assert listing[0]["params"]["r"]["default"] == 0 and "trace_source" in listing[0]["params"]
    rc, _, err = run(capsys, "methods", "nope")
    assert rc == 2 and "unknown method" in err


def test_unknown_command(capsys):
    rc, _, err = run(capsys, "nope")
    assert rc == 2 and "invalid choice" in err


def test_unavailable_command_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "search-rates", ("tokenreduce._missing_module", "main", "x"))
    with pytest.raises(SystemExit, match="not available"):
        cli.main(["search-rates", "--help"])


def test_console_script_is_declared():
    from importlib.metadata import entry_points
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("tokenreduce") == "tokenreduce.cli:main"
