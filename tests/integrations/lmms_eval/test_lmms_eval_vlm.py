"""``tokenreduce eval-vlm``: the offline smoke job end to end, its table and plot, and clean argument errors."""
from __future__ import annotations

import csv
import json

import pytest

import tokenreduce
from tokenreduce.integrations.lmms_eval import eval_vlm

pytestmark = pytest.mark.lmms


@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory):
    """The default job restricted to two methods at one budget (the full default is 23 runs, 1-3 minutes)."""
    out = tmp_path_factory.mktemp("eval_vlm")
    rc = eval_vlm.main(["--out", str(out), "--methods", "visionzip,dart", "--budgets", "8"])
    return rc, out


def test_smoke_job_writes_the_table_and_plot(smoke_job, capsys):
    rc, out = smoke_job
    assert rc == 0
    for name in ("results.md", "results.csv", "results.json", "records.jsonl", "score_vs_tokens.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["unpatched", "dart_8", "visionzip_8"]
    assert rows["unpatched"]["visual kept"] == "64.0" and rows["unpatched"]["same %"] == "100.0"
    assert rows["visionzip_8"]["visual kept"] == "8.0"  # 6 dominant + 2 contextual, measured at prefill
    assert rows["dart_8"]["visual kept"] == "10.0"      # 2 image pivots + 4 pivots x 2
    for row in rows.values():
        assert row["note"] == ""
        for task in ("tr_smoke_gen", "tr_smoke_mc"):
            assert 0.0 <= float(row[task]) <= 1.0
        assert float(row["prefill ms/sample"]) > 0
    dump = json.loads((out / "results.json").read_text())
    assert dump["meta"]["family"] == "llava" and dump["meta"]["tasks"] == ["tr_smoke_gen", "tr_smoke_mc"]
    assert {r["run"] for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())} == set(rows)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        eval_vlm.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(default: results/eval_vlm)" in text and "--suite" in text and "--budgets" in text


@pytest.mark.parametrize("argv,match", [
    (["--suite", "nope"], "unknown suite 'nope'; suites: llava15, llava_next, llava_onevision, smoke"),
    (["--budgets", "7"], "suite 'smoke' has no budget 7"),
    (["--methods", "tomato"], "suite 'smoke' has no method tomato"),
    (["--limit", "0"], "argument --limit: must be >= 1"),
    (["--model", "some/model"], "--tasks is required with --model"),
    (["--metric", "acc"], "--metric expects TASK=METRIC"),
    (["--config", "no/such/config"], "config 'no/such/config' not found"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_arguments_are_one_error_line(argv, match, capsys, tmp_path):
    assert eval_vlm.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_suite_configs_follow_the_naming_rule_and_validate():
    """Every suite file is <method>_<budget>.yaml and loads with tokenreduce's config loader."""
    from tokenreduce.configs import load_config

    for suite in eval_vlm.list_suites():
        paths = sorted(eval_vlm.suite_dir(suite).glob("*.yaml"))
        assert paths, suite
        for path in paths:
            method, _, budget = path.stem.rpartition("_")
            assert budget.isdigit(), path
            cfg = load_config(path, check_params=method in tokenreduce.list_methods())
            assert cfg.method == method, path
    budgets = {s: sorted({int(p.stem.rpartition("_")[2]) for p in eval_vlm.suite_dir(s).glob("*.yaml")})
               for s in ("llava15", "llava_next")}
    assert budgets == {"llava15": [64, 128, 192], "llava_next": [160, 320, 640]}


def test_a_failed_run_is_reported_and_fails_the_job(tmp_path, monkeypatch, capsys):
    """One run raising must not hide the others, and the exit status says something failed."""
    real = eval_vlm.evaluate_run

    def flaky(run, *args, **kwargs):
        if run.method == "visionzip":
            raise RuntimeError("boom")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(eval_vlm, "evaluate_run", flaky)
    rc = eval_vlm.main(["--out", str(tmp_path), "--methods", "visionzip", "--budgets", "8", "--no-plot"])
    assert rc == 1
    text = (tmp_path / "results.md").read_text()
    assert "RuntimeError: boom" in text and "| unpatched |" in text
    assert "run visionzip_8 failed" in capsys.readouterr().err


def test_a_refused_run_is_listed_and_does_not_fail_the_job(tmp_path, monkeypatch):
    """``tokenreduce.patch`` refusing a method on a model is a limitation, reported with its reason."""
    real = tokenreduce.patch

    def refuse(model, method=None, **params):
        if method == "visionzip":
            raise ValueError(f"visionzip: tokenreduce does not support {type(model).__name__} here")
        return real(model, method, **params)

    monkeypatch.setattr(tokenreduce, "patch", refuse)
    rc = eval_vlm.main(["--out", str(tmp_path), "--methods", "visionzip,dart", "--budgets", "8", "--no-plot"])
    assert rc == 0
    with open(tmp_path / "results.csv") as f:
        notes = {r["run"]: r["note"] for r in csv.DictReader(f)}
    assert notes["dart_8"] == "" and notes["visionzip_8"].startswith("refused: visionzip(dominant=6, contextual=2)")
    assert "does not support LlavaForConditionalGeneration" in notes["visionzip_8"]
