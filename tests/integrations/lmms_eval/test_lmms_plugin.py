"""The ``tokenreduce`` lmms-eval model on a tiny random LLaVA and the five-sample local tasks, all offline.

Runs complete unpatched and patched, batch 2 answers what batch 1 answers, the unpatched answers equal
lmms-eval's own ``llava_hf`` model's, visual tokens are recorded per sample, and errors fail.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import tokenreduce

from .lmms_helpers import METHODS, SMOKE, cli_results, evaluate, model_args, read_records, responses, run_cli

pytestmark = pytest.mark.lmms

REGISTERED = [m for m in METHODS if m[0] in tokenreduce.list_methods()]
RUNS = [(None, {}, 64)] + REGISTERED


def _id(run) -> str:
    return run[0] or "unpatched"


def test_importing_tokenreduce_imports_no_lmms_eval():
    code = ("import sys, tokenreduce, tokenreduce.integrations.lmms_eval as m; "
            "assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'; print(m.MODEL_NAME)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "tokenreduce", done.stderr


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model, list_available_models

    from tokenreduce.integrations.lmms_eval.model import TokenReduceLMM
    assert "tokenreduce" in list_available_models(), (
        "no 'tokenreduce' model: install tokenreduce with the lmms_eval.models entry point (pip install -e .)")
    assert get_model("tokenreduce") is TokenReduceLMM


@pytest.mark.parametrize("run", RUNS, ids=_id)
def test_runs_complete_and_record_visual_tokens(run, smoke_runs):
    method, params, visual = run
    out, records = smoke_runs(method, params, 1)
    gen = responses(out, "tr_smoke_gen")
    assert len(gen) == 5 and all(isinstance(t, str) and t for t in gen.values()), gen
    mc = responses(out, "tr_smoke_mc")
    assert len(mc) == 5 and all(len(choices) == 4 for choices in mc.values())
    # negative log-likelihoods (multiple choice takes the argmin), finite and positive
    assert all(math.isfinite(nll) and nll > 0 for choices in mc.values() for nll, _ in choices)
    assert len(records) == 5 + 20  # one per generation, one per (sample, option)
    prunes_in_llm = method in (None, "dart", "fastv")
    assert {r["visual_in"] for r in records} == ({64} if prunes_in_llm else {visual})
    assert {r["visual_kept"] for r in records} == {visual}
    assert all(r["prefill_s"] > 0 and r["method"] == (method or "unpatched") for r in records)


@pytest.mark.parametrize("run", RUNS, ids=_id)
def test_batch_two_equals_batch_one(run, smoke_runs):
    method, params, _ = run
    (out1, rec1), (out2, rec2) = smoke_runs(method, params, 1), smoke_runs(method, params, 2)
    assert responses(out2, "tr_smoke_gen") == responses(out1, "tr_smoke_gen")
    mc1, mc2 = responses(out1, "tr_smoke_mc"), responses(out2, "tr_smoke_mc")
    for doc in mc1:
        for (nll1, greedy1), (nll2, greedy2) in zip(mc1[doc], mc2[doc]):
            assert nll2 == pytest.approx(nll1, rel=1e-9, abs=1e-9) and greedy1 == greedy2
    assert {r["batch_size"] for r in rec2} == {1, 2}  # 5 generations: batches of 2, 2, 1
    key = lambda r: (r["task"], r["doc_id"], r["request"])
    assert sorted((key(r), r["visual_kept"]) for r in rec2) == sorted((key(r), r["visual_kept"]) for r in rec1)


def test_unpatched_answers_equal_llava_hf(tiny_checkpoint, task_manager, smoke_runs):
    ours, _ = smoke_runs(None, {}, 1)
    theirs = evaluate("llava_hf", task_manager, tasks=["tr_smoke_gen"],
                      args=f"pretrained={tiny_checkpoint},device_map=cpu,dtype=float64")
    assert responses(ours, "tr_smoke_gen") == responses(theirs, "tr_smoke_gen")
    assert ours["results"]["tr_smoke_gen"]["exact_match,none"] == theirs["results"]["tr_smoke_gen"]["exact_match,none"]


def test_loglikelihood_is_the_continuation_nll(tiny_checkpoint, task_manager, smoke_runs):
    """Against transformers' own loss: the mean NLL of the continuation tokens, the prompt masked out."""
    from lmms_eval.tasks import get_task_dict

    from tokenreduce.integrations.lmms_eval.prompting import continuation_length, render

    out, _ = smoke_runs(None, {}, 1)
    doc = next(s for s in out["samples"]["tr_smoke_mc"] if s["doc_id"] == 3)
    task = get_task_dict(["tr_smoke_mc"], task_manager)["tr_smoke_mc"]
    data = task.test_docs()[3]
    context, options = task.doc_to_text(data), task.doc_to_choice(data)
    loaded = lm_loaded(tiny_checkpoint)
    image = data["image"].convert("RGB")
    for option, (nll, _) in zip(options, doc["filtered_resps"]):
        prompt = render(loaded.processor, context, 1)
        full = render(loaded.processor, context, 1, " " + option)
        n = continuation_length(loaded.tokenizer, prompt, full)
        inputs = loaded.to_model(loaded.processor(text=[full], images=[image], return_tensors="pt"))
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -n:] = inputs["input_ids"][:, -n:]
        with torch.no_grad():
            loss = loaded.model(**inputs, labels=labels).loss
        assert nll == pytest.approx(float(loss), rel=1e-6)  # transformers computes its loss in float32
    chosen = min(range(4), key=lambda i: doc["filtered_resps"][i][0])
    assert out["results"]["tr_smoke_mc"]["acc,none"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert doc["acc"] == float(chosen == data["label"])


def lm_loaded(checkpoint: str):
    from tokenreduce.integrations.lmms_eval.loading import load_vlm
    return load_vlm(checkpoint, device="cpu", dtype="float64")


def test_llava_next_is_loaded_from_its_config_and_runs(tiny_next_checkpoint, task_manager, tmp_path):
    """A second family, found from config.json alone: runs, batch 2 = batch 1, answers equal llava_hf's."""
    outs = {}
    for bs in (1, 2):
        path = tmp_path / f"records_b{bs}.jsonl"
        outs[bs] = evaluate("tokenreduce", task_manager, args=model_args(tiny_next_checkpoint, records=path),
                            tasks=["tr_smoke_gen"], batch_size=bs)
        # 56x56 smoke images: base image 64 + one 56 px crop 64 + 8 image-newline tokens
        assert {(r["visual_in"], r["visual_kept"]) for r in read_records(path)} == {(136, 136)}
    assert responses(outs[2], "tr_smoke_gen") == responses(outs[1], "tr_smoke_gen")
    theirs = evaluate("llava_hf", task_manager, tasks=["tr_smoke_gen"],
                      args=f"pretrained={tiny_next_checkpoint},device_map=cpu,dtype=float64")
    assert responses(theirs, "tr_smoke_gen") == responses(outs[1], "tr_smoke_gen")


def test_llava_next_patched(tiny_next_checkpoint, task_manager, tmp_path):
    """VisionZip on LLaVA-NeXT, as soon as tokenreduce has its adapter (until then patch refuses the class)."""
    from tokenreduce.integrations.lmms_eval.loading import load_vlm

    try:
        tokenreduce.patch(load_vlm(tiny_next_checkpoint, device="cpu").model, "visionzip", dominant=10,
                          contextual=4)
    except ValueError as e:
        if "does not support" not in str(e):
            raise
        pytest.skip(f"no LLaVA-NeXT adapter in this tokenreduce yet: {str(e)[:100]}")
    outs, kept = {}, {}
    for bs in (1, 2):
        path = tmp_path / f"records_b{bs}.jsonl"
        args = model_args(tiny_next_checkpoint, "visionzip", dict(dominant=10, contextual=4), records=path)
        outs[bs] = evaluate("tokenreduce", task_manager, args=args, tasks=["tr_smoke_gen"], batch_size=bs)
        kept[bs] = sorted(r["visual_kept"] for r in read_records(path))
    assert kept[1] == kept[2] and max(kept[1]) < 136
    assert responses(outs[2], "tr_smoke_gen") == responses(outs[1], "tr_smoke_gen")


def test_config_argument_and_yaml_values(tiny_checkpoint, task_manager, tmp_path):
    """``config=`` takes method and parameters from a config file; an explicit parameter overrides it."""
    path = tmp_path / "records.jsonl"
    args = model_args(tiny_checkpoint, records=path, config="vlm/smoke/visionzip_16", contextual=1)
    evaluate("tokenreduce", task_manager, args=args, tasks=["tr_smoke_gen"])
    assert {r["visual_kept"] for r in read_records(path)} == {13 + 1}


def test_cli_entry_point_run(tiny_checkpoint, tmp_path):
    """``lmms-eval --model tokenreduce --model_args ...`` end to end, through the entry point."""
    from tokenreduce.integrations.lmms_eval.smoke import smoke_task_dir

    args = model_args(tiny_checkpoint, "visionzip", dict(dominant=10, contextual=4))
    done = run_cli(["--model", "tokenreduce", "--model_args", args, "--tasks", ",".join(SMOKE), "--batch_size",
                    "2", "--include_path", str(smoke_task_dir()), "--output_path", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = cli_results(tmp_path / "out")["results"]
    assert set(SMOKE) <= set(results)


def test_cli_errors_fail(tiny_checkpoint, tmp_path, monkeypatch):
    """lmms-eval 0.7.3's command line logs an evaluation error and carries on (exit status 0): a bad parameter
    leaves no results file, which the helpers turn into a failure; with --verbosity DEBUG it raises.

    In process (same code path as the command, without paying its start-up twice)."""
    from lmms_eval.__main__ import cli_evaluate

    from tokenreduce.integrations.lmms_eval.smoke import smoke_task_dir

    args = model_args(tiny_checkpoint, "visionzip", dict(dominant=10, contextual=4, typo=1))
    argv = ["lmms-eval", "--model", "tokenreduce", "--model_args", args, "--tasks", "tr_smoke_gen",
            "--include_path", str(smoke_task_dir()), "--output_path", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv + ["--verbosity", "ERROR"])
    cli_evaluate()  # returns normally although the model could not be built
    with pytest.raises(AssertionError, match="no results file"):
        cli_results(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", argv + ["--verbosity", "DEBUG"])
    with pytest.raises(TypeError, match="typo"):
        cli_evaluate()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="nope"), ValueError, "unknown method 'nope'"),
    (dict(method="visionzip", typo=3), TypeError, r"visionzip has no parameter\(s\) \['typo'\]"),
    (dict(dominant=3), TypeError, "without method= or config="),
    (dict(method="visionzip", dominant=-1), ValueError, "dominant"),
    (dict(method="tome", config="vlm/smoke/visionzip_8"), ValueError, "contradicts config"),
    (dict(loglikelihood="max"), ValueError, "loglikelihood="),
    (dict(batch_size="auto"), ValueError, "batch_size must be a positive integer"),
])
def test_bad_model_args_are_clear_errors(kwargs, error, match, tiny_checkpoint):
    from tokenreduce.integrations.lmms_eval.model import TokenReduceLMM
    with pytest.raises(error, match=match):
        TokenReduceLMM(pretrained=tiny_checkpoint, device="cpu", **kwargs)


def test_errors_during_evaluation_propagate(tiny_checkpoint, task_manager):
    """A failure inside a request reaches the caller of the Python API (nothing is swallowed into '')."""
    from tokenreduce.integrations.lmms_eval.model import TokenReduceLMM

    lm = TokenReduceLMM(pretrained=tiny_checkpoint, device="cpu", dtype="float64")

    def broken(*args, **kwargs):
        raise RuntimeError("boom in generate")

    lm.model.generate = broken
    with pytest.raises(RuntimeError, match="boom in generate"):
        evaluate(lm, task_manager, tasks=["tr_smoke_gen"])


def test_model_args_lists_are_read_as_yaml():
    from tokenreduce.integrations.lmms_eval.patching import coerce
    assert coerce("[2,6,15]") == [2, 6, 15] and coerce("{a: 1}") == {"a": 1} and coerce("null") is None
    assert coerce("upstream") == "upstream" and coerce(3) == 3
