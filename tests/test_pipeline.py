"""The whole engine on a tiny random model: pipeline, worker jobs, the CLI, and bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from core import jobs
from core.errors import DataError
from core.paths import REPO_ROOT
from core.pipeline import run_experiment
from core.recipe import parse_experiment

QUICK = {"eval_windows": 3, "window_len": 32, "prompt_len": 16, "decode_tokens": 3, "batch_sizes": [1, 2],
         "warmup": 0, "repeats": 1, "sample_tokens": 4}


def _exp(model, corpus, steps=(), **measure):
    return parse_experiment({"model": str(model), "steps": list(steps), "measure": {**QUICK, "corpus": str(corpus), **measure}})


def test_baseline_and_rtn_metrics(tiny_model_dir, corpus_file, tmp_path):
    base = run_experiment(_exp(tiny_model_dir, corpus_file), artifact_dir=tmp_path)
    assert (tmp_path / "metrics.json").exists()
    assert base["accuracy"]["kl_vs_baseline"] is None and base["layers"] == []
    assert base["memory"]["weight_bytes"] == base["memory"]["baseline_weight_bytes"]
    assert base["latency"]["decode_ms"]["median"] > 0 and len(base["samples"]) == 3
    # group 48 does not divide the width 64: handled, not refused
    q = run_experiment(_exp(tiny_model_dir, corpus_file, [{"method": "rtn", "bits": 4, "group_size": 48}]))
    assert q["accuracy"]["kl_vs_baseline"] > 0 and 0 < q["accuracy"]["top1_agreement"] <= 1
    assert q["accuracy"]["tokens"] == base["accuracy"]["tokens"]  # same evaluation tokens
    assert q["memory"]["weight_bytes"] < base["memory"]["weight_bytes"]
    assert {layer["group_size"] for layer in q["layers"]} == {48}
    assert all(0 < layer["rel_error"] < 0.2 for layer in q["layers"])


def test_bf16_baseline_is_compared_with_fp32(tiny_model_dir, corpus_file):
    m = run_experiment(parse_experiment({"model": str(tiny_model_dir), "dtype": "bf16",
                                         "measure": {**QUICK, "corpus": str(corpus_file), "latency": False, "samples": False}}))
    assert m["accuracy"]["kl_vs_baseline"] >= 0
    assert m["memory"]["weight_bytes"] * 2 == pytest.approx(m["memory"]["baseline_weight_bytes"], rel=0.01)


def test_empty_corpus_is_a_clear_error(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        run_experiment(_exp(tiny_model_dir, empty))


def _wait(store, run_id, timeout=180):
    t = time.time()
    while time.time() - t < timeout:
        run = store.get(run_id)
        if run.finished:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish: {store.get(run_id)}")


def _wait_running(store, run_id, timeout=60):
    t = time.time()
    while time.time() - t < timeout:
        run = store.get(run_id)
        if run.status == "running" and run.stage:
            return run
        time.sleep(0.2)
    raise AssertionError("worker never started")


def test_worker_jobs_done_failed_killed_cancelled(store, tiny_model_dir, corpus_file):
    ok = jobs.submit(_exp(tiny_model_dir, corpus_file, latency=False, samples=False), store)
    bad = jobs.submit(_exp("/no/such/model", corpus_file), store)
    assert _wait(store, ok).status == "done"
    failed = _wait(store, bad)
    assert failed.status == "failed" and "not found" in failed.error

    # a job killed mid-run (as by the OOM killer) is reported, and earlier results stay intact
    slow = dict(latency=True, repeats=1000, decode_tokens=200)
    victim = jobs.submit(_exp(tiny_model_dir, corpus_file, **slow), store)
    run = _wait_running(store, victim)
    os.killpg(os.getpgid(run.pid), signal.SIGKILL)
    time.sleep(1)
    jobs.reconcile(store, grace_s=0)
    dead = store.get(victim)
    assert dead.status == "failed" and "ended without reporting" in dead.error
    assert store.get(ok).status == "done" and store.get(ok).metrics["accuracy"]["perplexity"] > 0

    to_cancel = jobs.submit(_exp(tiny_model_dir, corpus_file, **slow), store)
    run = _wait_running(store, to_cancel)
    assert jobs.cancel(to_cancel, store)
    time.sleep(1)
    assert store.get(to_cancel).status == "cancelled"
    assert not jobs._worker_alive(run.pid, to_cancel)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_cli_run_list_show_and_errors(tiny_model_dir, corpus_file, tmp_path):
    env = {"SLIMLM_DATA": str(tmp_path)}
    common = ["--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--eval-windows", "2", "--window-len", "32",
              "--no-latency", "--no-samples"]
    r = _cli("run", *common, "--step", "rtn:bits=8", env=env)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "KL vs baseline" in r.stdout and "RTN int8 per-channel sym" in r.stdout
    run_id = r.stdout.split()[1]
    assert run_id in _cli("list", env=env).stdout
    assert "perplexity" in _cli("show", run_id, env=env).stdout

    r = _cli("run", *common, "--step", "rtn:bits=9", env=env)
    assert r.returncode == 2 and "bits must be between 2 and 8, got 9" in r.stderr
    r = _cli("run", *common, "--step", "rtn:group_size=-8", env=env)
    assert r.returncode == 2 and "group_size must be a positive" in r.stderr
    r = _cli("run", "--model", "/no/such/dir", "--no-latency", env=env)
    assert r.returncode == 2 and "not found" in r.stderr
    r = _cli("show", "nope", env=env)
    assert r.returncode == 2 and "No run with id nope" in r.stderr
    # the failed runs are recorded; the good one is intact
    listing = _cli("list", env=env).stdout
    assert "failed" in listing and "done" in listing


def test_runs_take_turns(store, tiny_model_dir, corpus_file):
    first = jobs.submit(_exp(tiny_model_dir, corpus_file, latency=True, repeats=30, decode_tokens=50), store)
    _wait_running(store, first)
    second = jobs.submit(_exp(tiny_model_dir, corpus_file, latency=False, samples=False), store)
    time.sleep(3)
    waiting = store.get(second)
    assert waiting.status == "queued" and "waiting" in waiting.stage
    jobs.cancel(first, store)
    assert _wait(store, second).status == "done"


def test_gptq_step_through_the_pipeline_and_cli(tiny_model_dir, corpus_file, tmp_path):
    calib = {"corpus": str(corpus_file), "windows": 4, "window_len": 32}
    rtn = run_experiment(_exp(tiny_model_dir, corpus_file, [{"method": "rtn", "bits": 3, "group_size": 32}], latency=False, samples=False))
    gptq = run_experiment(_exp(tiny_model_dir, corpus_file, [{"method": "gptq", "bits": 3, "group_size": 32, "calibration": calib}],
                               latency=False, samples=False))
    assert gptq["memory"]["weight_bytes"] == rtn["memory"]["weight_bytes"]  # same packed format
    (cal,) = gptq["calibration"]
    assert cal["windows"] == 4 and cal["seconds"] > 0 and cal["peak_bytes"] > 0
    assert {r.get("method") for r in gptq["layers"]} == {"gptq"}
    r = _cli("run", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--eval-windows", "2", "--window-len", "32",
             "--no-latency", "--no-samples", "--step", f"gptq:bits=4,group_size=32,calibration.windows=2,calibration.corpus={corpus_file}",
             env={"SLIMLM_DATA": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "GPTQ int4 g32 sym" in r.stdout


@pytest.mark.parametrize("step, label, calibrated", [
    ({"method": "w8a8", "scheme": "int8"}, "W8A8 int8 SmoothQuant a=auto GPTQ", True),
    ({"method": "w8a8", "scheme": "int8", "smoothquant_alpha": 0.5, "weight_rounding": "rtn"},
     "W8A8 int8 SmoothQuant a=0.5", True),
    ({"method": "w8a8", "scheme": "int8", "smoothquant_alpha": None, "weight_rounding": "rtn"}, "W8A8 int8", False),
    ({"method": "w8a8", "scheme": "fp8", "smoothquant_alpha": None}, "W8A8 FP8 searched scales GPTQ", True),
])
def test_w8a8_steps_through_the_pipeline(tiny_model_dir, corpus_file, step, label, calibrated):
    step = dict(step, calibration={"corpus": str(corpus_file), "windows": 4, "window_len": 32})
    exp = _exp(tiny_model_dir, corpus_file, [step], latency=False, samples=False)
    assert exp.label() == label
    m = run_experiment(exp)
    assert 0 < m["accuracy"]["kl_vs_baseline"] < 0.05 and m["accuracy"]["top1_agreement"] > 0.8
    assert m["memory"]["weight_bytes"] < m["memory"]["baseline_weight_bytes"]
    assert len(m["calibration"]) == (1 if calibrated else 0)
    if calibrated:
        assert m["calibration"][0]["tokens"] == 4 * 32
        assert all(r["out_rel_error"] is not None for r in m["layers"] if r["name"] != "lm_head")
    if "SmoothQuant" in label:
        assert m["calibration"][0]["smoothed_linears"] > 0


def test_pruning_steps_and_chains_through_the_pipeline(tiny_model_dir, corpus_file):
    calib = {"corpus": str(corpus_file), "windows": 4, "window_len": 32}
    base = run_experiment(_exp(tiny_model_dir, corpus_file, latency=False, samples=False))
    mag = run_experiment(_exp(tiny_model_dir, corpus_file, [{"method": "magnitude", "sparsity": 0.5}],
                              latency=False, samples=False))
    assert mag["calibration"] == []  # magnitude needs no calibration data
    assert mag["memory"]["sparsity"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert mag["memory"]["sparsity"]["sparse_stored_linears"] == 14
    assert mag["memory"]["weight_bytes"] < base["memory"]["weight_bytes"]  # stored compressed, not dense
    assert all(r["storage"] in ("bitmask", "csr") and r["bytes"] < r["orig_bytes"] for r in mag["layers"])

    # 2:4 SparseGPT, then 4-bit GPTQ: one experiment, the 2:4 zeros survive quantization
    exp = _exp(tiny_model_dir, corpus_file, [{"method": "sparsegpt", "pattern": "2:4", "calibration": calib},
                                             {"method": "gptq", "bits": 4, "group_size": 32, "calibration": calib}],
               latency=False, samples=False)
    assert exp.label() == "SparseGPT 2:4 + GPTQ int4 g32 sym act-order"
    chain = run_experiment(exp)
    assert chain["memory"]["sparsity"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(chain["calibration"]) == 2 and chain["accuracy"]["top1_agreement"] > 0.3

    st = run_experiment(_exp(tiny_model_dir, corpus_file, [{"method": "structured", "mlp_sparsity": 0.25,
                                                            "remove_layers": 1, "calibration": calib}],
                             latency=False, samples=False))
    assert st["memory"]["param_count_after"] < st["memory"]["param_count"]
    assert st["memory"]["weight_bytes"] < base["memory"]["weight_bytes"]


def test_pruning_settings_errors():
    from core.errors import RecipeError

    with pytest.raises(RecipeError, match="OWL"):
        parse_experiment({"steps": [{"method": "wanda", "pattern": "2:4", "owl": True}]})
    with pytest.raises(RecipeError, match="N:M"):
        parse_experiment({"steps": [{"method": "wanda", "pattern": "4:2"}]})
    with pytest.raises(RecipeError, match="sparsity"):
        parse_experiment({"steps": [{"method": "magnitude", "sparsity": 1.0}]})
    assert parse_experiment({"steps": [{"method": "wanda", "sparsity": 0.6, "owl": True}]}).label() == "Wanda 60% OWL"


def test_pruned_runs_can_save_but_bnb_cannot():
    from core.errors import RecipeError

    with pytest.raises(RecipeError, match="bitsandbytes"):
        parse_experiment({"steps": [{"method": "bnb"}], "save_model": True})
    for steps in ([{"method": "wanda"}], [{"method": "magnitude", "pattern": "2:4"}],
                  [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "gptq"}],
                  [{"method": "structured", "mlp_sparsity": 0.25}]):
        assert parse_experiment({"steps": steps, "save_model": True}).save_model


@pytest.mark.parametrize("step", [{"method": "magnitude", "sparsity": 0.5}, {"method": "magnitude", "pattern": "2:4"}])
def test_pruned_run_saves_and_measures_again(tiny_model_dir, corpus_file, tmp_path, step, capsys, monkeypatch):
    """A run ending in unstructured / N:M pruning saves its sparse storage; measured again from the saved directory
    (run_experiment, and the CLI's --model DIR) it gives the same perplexity, memory figure and generations."""
    import json

    from core.__main__ import main
    from core.prune.sparse import csr_fast_available

    first = run_experiment(parse_experiment({"model": str(tiny_model_dir), "steps": [step], "save_model": True,
                                             "measure": {**QUICK, "corpus": str(corpus_file)}}),
                           artifact_dir=tmp_path / "run")
    saved = first["saved_model"]
    assert saved["path"] == str((tmp_path / "run" / "model").resolve())
    meta = json.loads((tmp_path / "run" / "model" / "slimlm_quant.json").read_text())
    storage = "csr" if csr_fast_available(torch.zeros(1)) else ("nm" if step.get("pattern") == "2:4" else "bitmask")
    assert len(meta["modules"]) == 14 and {e["storage"] for e in meta["modules"].values()} == {storage}
    assert {r["storage"] for r in first["layers"]} == {storage}
    again = run_experiment(_exp(saved["path"], corpus_file))
    assert again["accuracy"]["perplexity"] == first["accuracy"]["perplexity"]
    assert again["accuracy"]["tokens"] == first["accuracy"]["tokens"]
    assert again["memory"]["weight_bytes"] == first["memory"]["weight_bytes"] < first["memory"]["baseline_weight_bytes"]
    assert again["memory"]["baseline_weight_bytes"] == first["memory"]["baseline_weight_bytes"]
    assert again["samples"] == first["samples"]  # greedy generations through the same layers
    assert again["latency"]["decode_ms"]["median"] > 0
    assert again["model"]["compressed_checkpoint"]["steps"] == [parse_experiment({"steps": [step]}).steps[0].label()]
    common = ["--corpus", str(corpus_file), "--eval-windows", str(QUICK["eval_windows"]), "--window-len",
              str(QUICK["window_len"]), "--no-latency", "--no-samples"]
    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path / "data"))
    capsys.readouterr()
    assert main(["run", "--model", saved["path"], *common, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["accuracy"]["perplexity"] == first["accuracy"]["perplexity"]
    assert cli["memory"]["weight_bytes"] == first["memory"]["weight_bytes"]