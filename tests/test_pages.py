"""Every page through streamlit's AppTest, on a temporary store filled with hand-made runs.

The pages run inside app.py's st.navigation (as in the real app), so links between pages resolve.
"""
import math
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import jobs
from core.recipe import parse_experiment
from core.store import Store

APP = str(Path(__file__).resolve().parent.parent / "app.py")
SHAPES = {"q_proj": [576, 576], "k_proj": [192, 576], "v_proj": [192, 576], "o_proj": [576, 576],
          "gate_proj": [1536, 576], "up_proj": [1536, 576], "down_proj": [576, 1536]}
BASE_BYTES = 538_060_800


def make_metrics(ppl, weight_bytes, decode_ms, bits=None, group_size=None, kl=None, top1=None,
                 window_len=256, seed=1):
    """A metrics dict shaped like the engine's for SmolLM2-135M on CPU."""
    layers = []
    if bits:
        for i in range(2):
            for j, (proj, shape) in enumerate(SHAPES.items()):
                n = shape[0] * shape[1]
                layers.append({
                    "name": f"model.layers.{i}.{'self_attn' if j < 4 else 'mlp'}.{proj}", "shape": shape,
                    "bits": bits, "group_size": group_size, "kind": "attention" if j < 4 else "mlp",
                    "rel_error": 2.0 ** -bits * (1 + 0.1 * ((i * 7 + j * seed) % 5)),
                    "bytes": n * bits // 8 + 2 * n // (group_size or shape[1]), "orig_bytes": 4 * n,
                })
    return {
        "accuracy": {"perplexity": ppl, "nll": math.log(ppl), "kl_vs_baseline": kl, "top1_agreement": top1,
                     "tokens": 16 * (window_len - 1), "corpus": "brown", "window_len": window_len, "windows": 16},
        "memory": {"weight_bytes": weight_bytes, "baseline_weight_bytes": BASE_BYTES,
                   "compression": BASE_BYTES / weight_bytes, "param_count": 134_515_008,
                   "peak_rss_bytes": 1_250_000_000, "peak_gpu_bytes": None},
        "latency": {"device": "cpu", "dtype": "fp32", "prompt_len": 64,
                    "prefill_ms": {"median": 9 * decode_ms, "p90": 10 * decode_ms},
                    "decode_ms": {"median": decode_ms, "p90": 1.15 * decode_ms},
                    "throughput": [{"batch": 1, "tokens_per_s": 1000 / decode_ms, "step_ms_median": decode_ms},
                                   {"batch": 4, "tokens_per_s": 2800 / decode_ms, "step_ms_median": 1.43 * decode_ms}],
                    "repeats": 3, "warmup": 1},
        "layers": layers,
        "samples": [
            {"prompt": "What is the capital of France?", "output": f"The capital of France is Paris. ({ppl:.1f})"},
            {"prompt": "Write a haiku about the sea.", "output": "Waves fold into foam,\nsalt wind carries gull voices"},
        ],
        "env": {"device": "cpu", "torch": "2.13.0", "transformers": "5.23.0", "bitsandbytes": "0.50.2",
                "python": "3.11.2", "cpu": "Test CPU", "threads": 2},
        "timings": {"load_s": 2.1, "compress_s": 0.8 if bits else 0.0, "accuracy_s": 20.5, "latency_s": 11.2,
                    "total_s": 36.0},
        "model": {"spec": "smollm2-135m", "name": "SmolLM2-135M-Instruct", "architecture": "LlamaForCausalLM",
                  "params": 134_515_008, "source_note": "from a Q4_1 GGUF"},
        "notes": ["The default model's weights come from a 4-bit GGUF."],
    }


def add_run(store, steps=(), status="done", metrics=None, error=None, **measure):
    run_id = store.create_run(parse_experiment({"steps": list(steps), "measure": measure}))
    store.update(run_id, status=status, metrics=metrics, error=error)
    return run_id


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path))
    return Store()


@pytest.fixture
def filled(store):
    ids = {
        "base": add_run(store, metrics=make_metrics(15.2, BASE_BYTES, 21.0)),
        "int8": add_run(store, [{"method": "rtn", "bits": 8}], metrics=make_metrics(
            15.25, 160_000_000, 23.0, bits=8, kl=0.002, top1=0.98)),
        "int4": add_run(store, [{"method": "rtn", "bits": 4, "group_size": 64}], metrics=make_metrics(
            16.9, 110_000_000, 26.0, bits=4, group_size=64, kl=0.09, top1=0.86, seed=3)),
        "failed": add_run(store, [{"method": "rtn", "bits": 2, "group_size": 64}], status="failed",
                          error="Out of memory while running this experiment."),
    }
    return ids


@pytest.fixture
def submitted(monkeypatch):
    calls = []
    monkeypatch.setattr(jobs, "submit", lambda exp, store: calls.append(exp) or f"fake{len(calls):08d}")
    return calls


def app(page=None, **query):
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    if page:
        at.query_params.update(query)
        at.switch_page(page).run()
        assert not at.exception, at.exception
    return at


def app_without_presets():
    """The New experiment page with the default presets unticked."""
    at = app()
    for key in ("preset_baseline", "preset_rtn8", "preset_rtn4g64"):
        at.checkbox(key=key).uncheck()
    return at


def texts(at, kind):
    return " ".join(str(e.value) for e in getattr(at, kind))


def test_new_experiment_submits_each_ticked_setting(store, submitted):
    at = app()
    assert at.title[0].value == "New experiment"
    assert "4-bit" in texts(at, "info")  # DEFAULT_MODEL_NOTE
    at.checkbox(key="preset_rtn2g64").check()
    at.number_input(key="m_windows").set_value(2)
    at.button(key="submit").click().run()
    assert not at.exception and not at.error
    assert [e.label() for e in submitted] == ["baseline fp32", "RTN int8 per-channel sym", "RTN int4 g64 sym",
                                              "RTN int2 g64 sym"]
    assert all(e.measure.eval_windows == 2 and e.model == "smollm2-135m" for e in submitted)
    assert "Submitted 4 experiments" in texts(at, "success")


def test_new_experiment_invalid_bits_shows_error_and_submits_nothing(store, submitted):
    at = app()
    at.checkbox(key="custom_on").check().run()
    at.number_input(key="custom_bits").set_value(9)
    at.button(key="submit").click().run()
    assert not at.exception
    assert "bits must be between 2 and 8" in texts(at, "error")
    assert submitted == [] and "submitted" not in at.session_state


def test_new_experiment_negative_group_size(store, submitted):
    at = app_without_presets()
    at.checkbox(key="custom_on").check().run()
    at.number_input(key="custom_group").set_value(-8)
    at.button(key="submit").click().run()
    assert "group_size" in texts(at, "error") and submitted == []


def test_new_experiment_custom_gptq(store, submitted):
    at = app_without_presets()
    at.checkbox(key="custom_on").check().run()
    at.radio(key="custom_method").set_value("gptq").run()
    at.number_input(key="custom_bits").set_value(3)
    at.checkbox(key="custom_act_order").check()
    at.number_input(key="custom_calib_windows").set_value(8)
    at.button(key="submit").click().run()
    assert not at.exception and not at.error
    (exp,) = submitted
    assert exp.label() == "GPTQ int3 g64 sym act-order" and exp.steps[0].calibration.windows == 8


def test_new_experiment_custom_w8a8(store, submitted):
    at = app_without_presets()
    at.checkbox(key="w8_on").check().run()
    at.radio(key="w8_scheme").set_value("fp8")
    at.radio(key="w8_smooth").set_value("fixed").run()
    at.slider(key="w8_alpha").set_value(0.65)
    at.radio(key="w8_round").set_value("rtn")
    at.number_input(key="w8_windows").set_value(8)
    at.button(key="submit").click().run()
    assert not at.exception and not at.error
    (exp,) = submitted
    step = exp.steps[0]
    assert (step.scheme, step.smoothquant_alpha, step.weight_rounding, step.calibration.windows) == ("fp8", 0.65, "rtn", 8)
    assert exp.label() == "W8A8 FP8 SmoothQuant a=0.65 searched scales"


def test_new_experiment_custom_pruning_chain(store, submitted):
    at = app_without_presets()
    at.checkbox(key="pr_on").check().run()
    at.radio(key="pr_method").set_value("sparsegpt")
    at.selectbox(key="pr_pattern").set_value("2:4")
    at.selectbox(key="pr_then").set_value("GPTQ int4 g64")
    at.button(key="submit").click().run()
    assert not at.exception and not at.error
    (exp,) = submitted
    assert exp.label() == "SparseGPT 2:4 + GPTQ int4 g64 sym act-order"


def test_experiments_lists_runs_and_shows_errors(filled):
    at = app("pages/experiments.py")
    table = at.dataframe[0].value
    assert set(table["id"]) == set(filled.values())
    assert "RTN int4 g64 sym" in set(table["label"])
    assert "Out of memory while running this experiment." in texts(at, "error")


def test_experiments_shows_active_run_with_cancel(store, filled):
    running = add_run(store, [{"method": "rtn", "bits": 3, "group_size": 64}], status="running")
    store.update(running, stage="accuracy", step=3, total=16, pid=None)
    at = app("pages/experiments.py")
    assert at.button(key=f"cancel_{running}")
    assert any("accuracy (3/16)" in str(p.proto.text) for p in at.get("progress"))


def test_compare_shows_selected_runs_from_query(filled):
    ids = [filled["base"], filled["int4"]]
    at = app("pages/compare.py", runs=",".join(ids), y="kl_vs_baseline", log="1")
    assert at.multiselect(key="cmp_runs").value == ids
    assert at.selectbox(key="cmp_y").value == "kl_vs_baseline" and at.checkbox(key="cmp_log").value
    assert len(at.get("plotly_chart")) == 2
    shown = at.dataframe[0].value["display"].tolist()
    assert shown == ["baseline fp32", "RTN int4 g64 sym"]
    assert f"runs={ids[0]},{ids[1]}" in texts(at, "code")  # share URL
    assert not at.warning


def test_compare_warns_about_different_protocols(store, filled):
    other = add_run(store, metrics=make_metrics(14.1, BASE_BYTES, 21.0, window_len=512))
    at = app("pages/compare.py", runs=f"{filled['base']},{other}")
    assert "different protocols" in texts(at, "warning")


def test_compare_unknown_and_unfinished_runs(filled):
    at = app("pages/compare.py", runs=f"{filled['base']},{filled['failed']},doesnotexist")
    assert at.multiselect(key="cmp_runs").value == [filled["base"], filled["failed"]]
    assert "doesnotexist" in texts(at, "warning") and "failed" in texts(at, "warning")


def test_run_detail_done(filled):
    at = app("pages/run_detail.py", run=filled["int4"])
    assert at.title[0].value == "RTN int4 g64 sym"
    assert len(at.get("plotly_chart")) == 1  # per-layer error
    assert str(Path(Store().artifacts) / filled["int4"]) in texts(at, "code")


def test_run_detail_output_error_before_after(store):
    m = make_metrics(16.1, 110_000_000, 26.0, bits=4, group_size=64, kl=0.07, top1=0.88)
    for i, r in enumerate(m["layers"]):
        r.update(method="gptq", out_rel_error=0.02 + 0.001 * i, rtn_out_rel_error=0.04 + 0.001 * i)
    run = add_run(store, [{"method": "gptq", "bits": 4, "group_size": 64}], metrics=m)
    at = app("pages/run_detail.py", run=run)
    assert len(at.get("plotly_chart")) == 2  # output error before/after + weight error
    assert "before and after the calibrated method" in texts(at, "markdown")


def test_run_detail_latency_says_what_ran_on_the_gpu(store):
    m = make_metrics(16.9, 110_000_000, 2.8, bits=4, group_size=64)
    m["latency"].update(device="cuda:0", card="NVIDIA H100 80GB HBM3", decode_loop="static_cache+cuda_graph",
                        warnings=[("q/k/v and gate/up were not merged (OutOfMemoryError: CUDA out of memory): "
                                   "timed as separate linears")],
                        gpu_kernels={"fused_modules": 90, "merged_blocks": 0, "decode_attention": "slimlm kernel",
                                     "rotary_and_cache_write": "transformers",
                                     "decoder_layers_residual_in_product": 30})
    at = app("pages/run_detail.py", run=add_run(store, [{"method": "rtn", "bits": 4, "group_size": 64}], metrics=m))
    assert "NVIDIA H100 80GB HBM3" in texts(at, "markdown") and "static_cache+cuda_graph" in texts(at, "markdown")
    assert "were not merged" in texts(at, "warning")
    caption = texts(at, "caption")
    assert "0 blocks with q/k/v or gate/up merged" in caption and "90 norm / SiLU modules fused" in caption
    assert "decode attention: slimlm kernel" in caption and "rotary + cache write: transformers" in caption
    assert "30 decoder layers with the residual adds handed to o_proj / down_proj" in caption


def test_run_detail_failed_shows_error(filled):
    at = app("pages/run_detail.py", run=filled["failed"])
    assert "Out of memory while running this experiment." in texts(at, "error")


def test_pages_render_on_empty_store(store):
    for page in ("pages/experiments.py", "pages/compare.py", "pages/run_detail.py"):
        at = app(page)
        assert "No experiments yet." in texts(at, "info")


def test_compare_keeps_url_in_sync_and_survives_page_switches(filled):
    at = app("pages/compare.py", runs=f"{filled['base']},{filled['int8']}")
    at.multiselect(key="cmp_runs").select(filled["int4"])
    at.selectbox(key="cmp_lat").set_value("prefill_ms").run()
    assert at.query_params["runs"] == f"{filled['base']},{filled['int8']},{filled['int4']}"
    assert at.query_params["lat"] == "prefill_ms"
    # leave through the menu (which drops the query string) and come back the same way
    at.query_params.clear()
    at.switch_page("pages/experiments.py").run()
    at.query_params.clear()
    at.switch_page("pages/compare.py").run()
    assert at.multiselect(key="cmp_runs").value == [filled["base"], filled["int8"], filled["int4"]]
    assert at.selectbox(key="cmp_lat").value == "prefill_ms"


def test_run_detail_follows_url_and_selection(filled):
    at = app("pages/run_detail.py", run=filled["int8"])
    assert at.title[0].value == "RTN int8 per-channel sym"
    at.selectbox(key="detail_run").set_value(filled["base"]).run()
    assert at.title[0].value == "baseline fp32" and at.query_params["run"] == filled["base"]
    at.query_params.clear()
    at.switch_page("pages/experiments.py").run()
    at.query_params["run"] = filled["base"]  # e.g. a link to the same run again
    at.switch_page("pages/run_detail.py").run()
    assert at.title[0].value == "baseline fp32"


def test_new_experiment_custom_distillation_chain(store, submitted):
    at = app_without_presets()
    at.checkbox(key="ds_on").check().run()
    at.radio(key="ds_student").set_value("SparseGPT 2:4")
    at.number_input(key="ds_steps").set_value(40)
    at.number_input(key="ds_ce").set_value(0.5)
    at.number_input(key="ds_budget").set_value(0)
    at.button(key="submit").click().run()
    assert not at.exception and not at.error
    (exp,) = submitted
    assert [s.method for s in exp.steps] == ["sparsegpt", "distill"]
    d = exp.steps[1]
    assert (d.max_steps, d.ce, d.kl, d.time_budget_s, d.teacher) == (40, 0.5, 1.0, None, "baseline")


def test_new_experiment_distillation_smaller_student_and_bad_losses(store, submitted):
    at = app_without_presets()
    at.checkbox(key="ds_on").check().run()
    at.radio(key="ds_student").set_value("smaller").run()
    at.number_input(key="ds_layers").set_value(12)
    at.number_input(key="ds_kl").set_value(0.0)
    at.button(key="submit").click().run()
    assert "at least one loss weight" in texts(at, "error") and submitted == []
    at.number_input(key="ds_js").set_value(1.0)
    at.button(key="submit").click().run()
    assert not at.error
    (exp,) = submitted
    assert [s.method for s in exp.steps] == ["distill"] and exp.steps[0].student_layers == 12


def test_run_detail_distillation_live_curve_and_report(store):
    import json

    steps = [{"method": "sparsegpt", "pattern": "2:4"}, {"method": "distill", "max_steps": 50}]
    running = add_run(store, steps, status="running")
    store.update(running, stage="distill", step=3, total=50)
    log = store.artifact_dir(running) / "distill-1" / "log.jsonl"
    log.parent.mkdir(parents=True)
    records = [{"kind": "eval", "step": 0, "tokens": 0, "wall_s": 0.1, "val_ppl": 130.0, "val_nll": 4.87}]
    records += [{"kind": "train", "step": s, "tokens": 1024 * s, "wall_s": 0.5 * s, "loss": 2.0 / s, "parts": {"kl": 2.0 / s},
                 "lr": 1e-4, "grad_norm": 1.0} for s in (1, 2, 3)]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n{\"kind\": \"tra")  # last line half-written
    at = app("pages/run_detail.py", run=running)
    assert "Distillation" in [h.value for h in at.subheader]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Steps"] == "3 / 50" and metrics["Tokens"] == "3,072"
    report = {"step": parse_experiment({"steps": steps}).steps[1].label(), "perplexity_before": 130.0,
              "perplexity_after": 80.0, "teacher_perplexity": 41.9, "recovered_fraction": 50.0 / 88.1,
              "train": {"steps": 3, "tokens": 3072, "wall_s": 1.5, "device": "cpu", "world_size": 1,
                        "tokens_per_s": 2048.0, "stopped": "max_steps", "initial_val_ppl": 130.0, "best_val_ppl": 90.0}}
    store.update(running, status="done", metrics={**make_metrics(80.0, BASE_BYTES, 20.0), "distill": [report]})
    at = app("pages/run_detail.py", run=running)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Gap recovered"] == "57%" and metrics["Perplexity before → after"] == "130.00 → 80.00"
    assert not any(b.key == "detail_resume" for b in at.button)


def test_run_detail_offers_resume_for_stopped_distillation(store, monkeypatch):
    run_id = add_run(store, [{"method": "wanda"}, {"method": "distill"}], status="cancelled", error="Cancelled by the user.")
    ckpt = store.artifact_dir(run_id) / "distill-1" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    spawned = []
    monkeypatch.setattr(jobs, "_spawn", lambda rid, st: spawned.append(rid))
    at = app("pages/run_detail.py", run=run_id)
    at.button(key="detail_resume").click().run()
    assert not at.exception
    assert spawned == [run_id] and store.get(run_id).status == "queued" and store.get(run_id).error is None
