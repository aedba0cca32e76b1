"""Distillation as an experiment step: recipe checks, held-out windows, the pipeline on a tiny model (pruned and
quantized students), and interrupt + resume through the CLI worker."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from core import data
from core.distill.log import read_log
from core.distill.step import recovered_fraction
from core.errors import RecipeError
from core.paths import REPO_ROOT
from core.pipeline import run_experiment
from core.recipe import parse_experiment, parse_step

QUICK = {"eval_windows": 3, "window_len": 32, "latency": False, "samples": False}
DISTILL = {"method": "distill", "max_steps": 8, "micro_batch": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 4,
           "val_windows": 2, "data": {"windows": 16, "window_len": 32}}


def _exp(model, corpus, steps):
    return parse_experiment({"model": str(model), "steps": steps, "measure": {**QUICK, "corpus": str(corpus)}})


@pytest.mark.parametrize("steps, message", [
    ([{"method": "distill"}], "needs a student that differs"),
    ([{"method": "bnb"}, {"method": "distill"}], "bitsandbytes model cannot be distilled"),
    ([{"method": "rtn"}, {"method": "distill", "student_layers": 2}], "must come first"),
    ([{"method": "rtn"}, {"method": "distill", "kl": 0}], "at least one loss weight"),
    ([{"method": "rtn"}, {"method": "distill", "max_steps": 5, "warmup_steps": 6}], "warmup_steps"),
    ([{"method": "rtn"}, {"method": "distill", "lr": 0}], "lr"),
])
def test_recipe_refuses_bad_distillation(steps, message):
    with pytest.raises(RecipeError, match=message):
        parse_experiment({"steps": steps})


def test_cli_step_syntax_and_label():
    exp = parse_experiment({"steps": [parse_step("wanda:sparsity=0.5"),
                                      parse_step("distill:max_steps=30,ce=0.5,data.windows=64,nproc=2")]})
    d = exp.steps[1]
    assert (d.max_steps, d.ce, d.data.windows, d.nproc) == (30, 0.5, 64, 2)
    assert exp.label() == "Wanda 50% + Distil (KL+CE, 30 steps, 2 procs)"


def test_recovered_fraction():
    assert recovered_fraction(130.0, 85.0, 40.0) == pytest.approx(0.5)
    assert recovered_fraction(40.0, 39.0, 41.0) is None  # no gap to recover


def test_validation_windows_are_held_out_and_disjoint_from_measurement(tiny_model_dir, corpus_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    measured = data.eval_windows(tok, str(corpus_file), 16, 5)
    val = data.validation_windows(tok, str(corpus_file), 16, 4, 5)
    assert val.shape == (4, 16)
    assert not {tuple(v.tolist()) for v in val} & {tuple(m.tolist()) for m in measured} or \
        len({tuple(m.tolist()) for m in measured}) < 5  # repeated text can repeat a window's tokens
    # every window index is either measured or available; asking for all windows leaves none
    n = data.eval_windows(tok, str(corpus_file), 16, 10**6).shape[0]
    with pytest.raises(Exception, match="none is left"):
        data.validation_windows(tok, str(corpus_file), 16, 2, n)


def test_pruned_student_keeps_its_zeros_and_reports(tiny_model_dir, corpus_file, tmp_path):
    m = run_experiment(_exp(tiny_model_dir, corpus_file, [{"method": "magnitude", "sparsity": 0.5}, DISTILL]),
                       artifact_dir=tmp_path)
    (d,) = m["distill"]
    t = d["train"]
    assert t["steps"] == 8 and t["tokens"] == 8 * 2 * 32 and t["device"] == "cpu" and t["world_size"] == 1
    assert d["student"]["masked_linears"] > 0
    assert m["memory"]["sparsity"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)  # still pruned after training
    log = read_log(tmp_path / "distill-1" / "log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 4, 8]
    assert d["perplexity_after"] == pytest.approx(m["accuracy"]["perplexity"], rel=1e-5)  # distil is the last step


def test_quantized_student_is_repacked(tiny_model_dir, corpus_file):
    from core.quant.linear import QuantLinear  # noqa: F401  (the records say what the model holds)

    rtn = {"method": "rtn", "bits": 4, "group_size": 32}
    only = run_experiment(_exp(tiny_model_dir, corpus_file, [rtn]))
    m = run_experiment(_exp(tiny_model_dir, corpus_file, [rtn, DISTILL]))
    assert m["memory"]["weight_bytes"] == only["memory"]["weight_bytes"]  # packed int4 again, not float
    assert m["distill"][0]["student"]["fake_quant_linears"] == len(only["layers"])
    assert m["accuracy"]["perplexity"] != only["accuracy"]["perplexity"]  # it trained


def test_smaller_student(tiny_model_dir, corpus_file):
    m = run_experiment(_exp(tiny_model_dir, corpus_file, [dict(DISTILL, student_layers=1)]))
    assert m["memory"]["param_count_after"] < m["memory"]["param_count"]
    assert m["distill"][0]["student"]["kind"] == "smaller configuration"


def _cli(*args, **kw):
    env = dict(os.environ, SLIMLM_DATA=kw.pop("data_dir"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "core", *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_interrupt_then_resume_continues_from_the_checkpoint(tiny_model_dir, corpus_file, tmp_path):
    steps = 150
    spec = f"distill:max_steps={steps},micro_batch=4,lr=1e-3,warmup_steps=2,eval_every=50,checkpoint_every=10,val_windows=2,data.windows=32,data.window_len=32"
    common = ["--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--eval-windows", "3", "--window-len", "32",
              "--no-latency", "--no-samples"]
    proc = _cli("run", *common, "--step", "magnitude:sparsity=0.5", "--step", spec, data_dir=str(tmp_path))
    store_dir = tmp_path
    deadline = time.time() + 120
    log = None
    while time.time() < deadline:
        logs = list(store_dir.glob("artifacts/*/distill-1/log.jsonl"))
        if logs and sum(r["kind"] == "train" for r in read_log(logs[0])) >= 15:
            log = logs[0]
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert log is not None, "training did not start"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Resume the run" in err
    run_id = log.parent.parent.name
    done_before = max(r["step"] for r in read_log(log) if r["kind"] == "train")
    assert done_before < steps and (log.parent / "checkpoint.pt").exists()

    resumed = _cli("resume", run_id, "--json", data_dir=str(tmp_path))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    metrics = json.loads(out)
    t = metrics["distill"][0]["train"]
    assert t["steps"] == steps and t["resumed_from_step"] >= 10
    train_steps = [r["step"] for r in read_log(log) if r["kind"] == "train"]
    assert train_steps == list(range(1, steps + 1))  # every step exactly once, across the interruption

    again = _cli("resume", run_id, data_dir=str(tmp_path))
    _, err = again.communicate(timeout=60)
    assert again.returncode == 2 and "cannot be resumed" in err  # a finished run is not resumable


@pytest.mark.parametrize("first", [[{"method": "magnitude"}], [{"method": "rtn", "bits": 4, "group_size": 32}], []])
def test_distilled_student_saves_and_reloads(tiny_model_dir, corpus_file, tmp_path, first):
    distill = dict(DISTILL, max_steps=3, student_layers=None if first else 1)
    exp = parse_experiment({"model": str(tiny_model_dir), "steps": [*first, distill], "save_model": True,
                            "measure": {**QUICK, "corpus": str(corpus_file)}})
    m = run_experiment(exp, artifact_dir=tmp_path)
    again = run_experiment(_exp(m["saved_model"]["path"], corpus_file, []))
    assert again["accuracy"]["perplexity"] == pytest.approx(m["accuracy"]["perplexity"], rel=1e-6)
    assert again["memory"]["weight_bytes"] == m["memory"]["weight_bytes"]
