"""Run detail (?run=ID): everything recorded for one run."""
import shlex
from datetime import datetime

import pandas as pd
import plotly.express as px
import streamlit as st

from core import jobs
from core.compare import distill_frames, gpu_kernels_line, output_error_frame
from core.distill.log import run_logs
from core.store import Store

store = st.session_state.get("store") or Store()
BADGE = {"queued": ("gray", ":material/schedule:"), "running": ("blue", ":material/progress_activity:"),
         "done": ("green", ":material/check_circle:"), "failed": ("red", ":material/error:"),
         "cancelled": ("orange", ":material/cancel:")}

jobs.reconcile(store)
runs = store.list()
if not runs:
    st.title("Run detail")
    st.info("No experiments yet.")
    st.page_link("pages/new_experiment.py", label="Start one on the New experiment page", icon=":material/science:")
    st.stop()

by_id = {r.id: r for r in runs}
# The URL's ?run wins when it is not what this page last wrote (a link, a shared URL) or when
# streamlit dropped the selectbox state (after visiting another page).
wanted = st.query_params.get("run")
if wanted and wanted not in by_id:
    st.warning(f"No run `{wanted}` in this store (deleted?). Choose another one.")
last = st.session_state.get("_detail_written")
target = wanted if wanted in by_id else last if last in by_id else None
if target and (target != last or "detail_run" not in st.session_state):
    st.session_state["detail_run"] = target
run_id = st.selectbox("Run", list(by_id), key="detail_run", width=520,
                      format_func=lambda i: f"{by_id[i].label} · {i} · {by_id[i].status}")
if wanted != run_id:
    st.query_params["run"] = run_id
st.session_state["_detail_written"] = run_id


def _mib(v):
    return "–" if v is None else f"{v / 2**20:.1f} MiB"


def _num(v, fmt):
    return "–" if v is None else format(v, fmt)


def distillation(run, m: dict) -> None:
    """Live training curves (from the log the trainer appends to), compute spent, and the recovered gap."""
    st.subheader("Distillation")
    reports = {r.get("step"): r for r in m.get("distill") or []}
    for index, records in run_logs(store.artifacts / run.id).items():
        step = run.experiment.steps[index] if index < len(run.experiment.steps) else None
        label = step.label() if step is not None else f"step {index + 1}"
        report = reports.get(label) or {}
        train, evals = distill_frames(records)
        t = report.get("train") or {}
        c = st.columns(5)
        if report:
            c[0].metric("Perplexity before → after", f"{report['perplexity_before']:.2f} → {report['perplexity_after']:.2f}",
                        help=f"on the measurement windows; teacher {report['teacher_perplexity']:.2f}")
            rec = report.get("recovered_fraction")
            c[1].metric("Gap recovered", "–" if rec is None else f"{rec:.0%}",
                        help="(before − after) / (before − teacher), perplexity on the measurement windows")
        c[2].metric("Steps", f"{int(train['step'].max()) if not train.empty else 0}" + (f" / {step.max_steps}" if step is not None else ""))
        c[3].metric("Tokens", f"{int(train['tokens'].max()):,}" if not train.empty else "0")
        c[4].metric("Wall time", f"{train['wall_s'].max():.0f} s" if not train.empty else "–",
                    help=f"device: {t.get('device', '…')} × {t.get('world_size', 1)}; "
                         f"{t.get('tokens_per_s', 0):,.0f} training tokens/s" if t else "training time so far")
        if train.empty:
            st.info("No training step logged yet.")
            continue
        left, right = st.columns(2)
        fig = px.line(train, x="step", y="loss", labels={"loss": "training loss"}, title=label)
        fig.update_layout(height=320, margin=dict(t=40))
        left.plotly_chart(fig, key=f"distill_loss_{index}")
        if not evals.empty:
            fig = px.line(evals, x="step", y="val_ppl", markers=True, title="Held-out perplexity",
                          labels={"val_ppl": "perplexity (validation windows)"})
            fig.update_layout(height=320, margin=dict(t=40))
            right.plotly_chart(fig, key=f"distill_val_{index}")
        if t:
            st.caption(f"Stopped: {t.get('stopped')}. Validation perplexity {t.get('initial_val_ppl', 0):.2f} → best "
                       f"{t.get('best_val_ppl', 0):.2f}" + (f" (weights of step {t['restored_best_step']} kept)" if t.get("restored_best_step") else "")
                       + (f"; resumed from step {t['resumed_from_step']}" if t.get("resumed_from_step") else "")
                       + f". Training data: {report.get('train_windows')} windows × {report.get('train_window_len')} tokens of the calibration split.")
    if jobs.resumable(run, store):
        st.button("Resume distillation from its checkpoint", key="detail_resume", on_click=jobs.resume,
                  args=(run.id, store), icon=":material/play_arrow:")


@st.fragment(run_every=2.0 if not by_id[run_id].finished else None)
def detail(run_id: str):
    run = store.get(run_id)
    if run is None:
        st.warning("This run was deleted.")
        return
    m = run.metrics or {}
    st.title(run.label)
    color, icon = BADGE.get(run.status, ("gray", None))
    st.badge(run.status, color=color, icon=icon)
    st.caption(f"run `{run.id}` · model `{run.experiment.model}` · "
               f"created {datetime.fromtimestamp(run.created):%Y-%m-%d %H:%M:%S}")
    if not run.finished:
        frac = min(run.step / run.total, 1.0) if run.total else 0.0
        st.progress(frac, text=f"{run.stage or 'waiting for the worker'} ({run.step}/{run.total})")
        st.button("Cancel", key="detail_cancel", on_click=jobs.cancel, args=(run.id, store))
    elif not by_id[run_id].finished:
        st.rerun()  # finished while watching: full rerun shows everything and stops polling
    if not run.finished and by_id[run_id].finished:
        st.rerun(scope="app")  # resumed while watching: a full rerun starts polling again
    if run.status == "failed":
        st.error(run.error or "The run failed without an error message.", icon=":material/error:")
    elif run.status == "cancelled":
        st.warning(run.error or "Cancelled.")
    for note in m.get("notes") or []:
        st.info(note, icon=":material/info:")

    acc, mem, lat = m.get("accuracy") or {}, m.get("memory") or {}, m.get("latency") or {}
    if acc or mem or lat:
        c = st.columns(6)
        c[0].metric("Perplexity", _num(acc.get("perplexity"), ".3f"))
        c[1].metric("KL vs baseline", _num(acc.get("kl_vs_baseline"), ".5f"), help="nats per token")
        c[2].metric("Top-1 agreement", _num(acc.get("top1_agreement"), ".2%"))
        c[3].metric("Weights", _mib(mem.get("weight_bytes")),
                    help=f"baseline {_mib(mem.get('baseline_weight_bytes'))}")
        c[4].metric("Compression", _num(mem.get("compression"), ".2f") + ("x" if mem.get("compression") else ""))
        c[5].metric("Decode ms/token", _num((lat.get("decode_ms") or {}).get("median"), ".2f"),
                    help="median per-token decode latency at batch 1")
    if saved := m.get("saved_model"):
        st.write(f"Compressed model saved in `{saved['path']}` ({_mib(saved.get('bytes'))} on disk). "
                 "Measure it again, or use it in another run, without recompressing:")
        st.code(f"python -m core run --model {shlex.quote(saved['path'])}", language="bash")

    if any(s.method == "distill" for s in run.experiment.steps):
        distillation(run, m)

    tabs = st.tabs(["Accuracy & memory", "Layers", "Latency", "Samples", "Settings", "Environment"])
    with tabs[0]:
        if acc:
            st.write(f"Evaluated on {acc.get('tokens')} tokens of corpus `{acc.get('corpus')}`: "
                     f"{acc.get('windows')} windows × {acc.get('window_len')} tokens.")
            st.dataframe(pd.DataFrame([acc]), hide_index=True)
        if mem:
            st.dataframe(pd.DataFrame([{k.replace("_bytes", "_mib"): v / 2**20 if k.endswith("_bytes") and v else v
                                        for k, v in mem.items()}]), hide_index=True)
        if calib := m.get("calibration"):
            st.write("Calibration (time and peak memory of the layer-by-layer pass):")
            st.dataframe(pd.DataFrame(calib), hide_index=True)
        if timings := m.get("timings"):
            st.caption("Wall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items()))
        if model := m.get("model"):
            with st.expander("Model"):
                st.json(model)
        if not (acc or mem):
            st.info("No accuracy or memory measured (yet).")
    with tabs[1]:
        layers = pd.DataFrame(m.get("layers") or [])
        if layers.empty:
            st.info("No quantized layers (a baseline, or not measured yet).")
        else:
            layers["shape"] = layers["shape"].astype(str)
            out_err = output_error_frame(m.get("layers") or [])
            if not out_err.empty:
                st.write("Relative output error of each linear on the calibration inputs, "
                         "‖XWᵀ − X̂Ŵᵀ‖ / ‖XWᵀ‖, before and after the calibrated method:")
                fig = px.bar(out_err, x="layer", y="error", color="stage", barmode="group",
                             labels={"error": "relative output error"})
                fig.update_layout(height=420, margin=dict(t=20), xaxis_tickangle=-60, legend_title_text="")
                st.plotly_chart(fig, key="out_error_chart")
            fig = px.bar(layers, x="name", y="rel_error", color="kind" if "kind" in layers else None,
                         hover_data=[c for c in ("shape", "bits", "group_size", "bytes") if c in layers],
                         labels={"name": "layer", "rel_error": "relative weight error ‖W−Ŵ‖/‖W‖"})
            fig.update_layout(height=420, margin=dict(t=20), xaxis_tickangle=-60)
            st.plotly_chart(fig, key="layers_chart")
            st.dataframe(layers, hide_index=True)
    with tabs[2]:
        if not lat:
            st.info("Latency was not measured.")
        else:
            st.write(f"On {lat.get('card') or lat.get('device')} in {lat.get('dtype')}, prompt of "
                     f"{lat.get('prompt_len')} tokens, {lat.get('warmup')} warm-up + {lat.get('repeats')} timed "
                     f"repeats" + (f"; decode loop `{lat['decode_loop']}`" if lat.get("decode_loop") else "") + ".")
            for w in lat.get("warnings") or []:
                st.warning(w, icon=":material/warning:")
            if kernels := lat.get("gpu_kernels"):
                st.caption(gpu_kernels_line(kernels))
            st.dataframe(pd.DataFrame([
                {"what": "prefill (whole prompt, ms)", **(lat.get("prefill_ms") or {})},
                {"what": "decode, batch 1 (ms/token)", **(lat.get("decode_ms") or {})},
            ]), hide_index=True)
            if lat.get("throughput"):
                st.dataframe(pd.DataFrame(lat["throughput"]), hide_index=True, column_config={
                    "batch": "Batch", "tokens_per_s": st.column_config.NumberColumn("Tokens/s", format="%.1f"),
                    "step_ms_median": st.column_config.NumberColumn("Step (ms, median)", format="%.2f")})
    with tabs[3]:
        samples = m.get("samples") or []
        if not samples:
            st.info("No sample generations.")
        for s in samples:
            st.markdown(f"**Prompt:** {s.get('prompt')}")
            st.code(s.get("output", ""), language=None, wrap_lines=True)
    with tabs[4]:
        st.json(run.experiment.model_dump())
        if t := m.get("timings"):
            st.dataframe(pd.DataFrame([t]), hide_index=True)
    with tabs[5]:
        if env := m.get("env"):
            st.dataframe(pd.DataFrame({"value": {k: str(v) for k, v in env.items()}}))
        else:
            st.info("No environment recorded.")
        st.write("Artifacts folder (worker log and files of this run):")
        st.code(str(store.artifacts / run.id), language=None)


detail(run_id)
