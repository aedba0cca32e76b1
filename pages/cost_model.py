"""Cost model: roofline estimates of memory, prefill/decode latency, largest batch and cost per
million tokens for a model, settings and a hardware profile, with stored measurements beside them."""
from dataclasses import replace

import pandas as pd
import streamlit as st
from plotly.subplots import make_subplots

from core.measure import costmodel as cm
from core.store import Store

store = st.session_state.get("store") or Store()
st.title("Cost model")
st.caption(
    "A roofline estimate (Pope et al. 2022, *Efficiently Scaling Transformer Inference*): each phase takes "
    "max(FLOPs / FLOP/s, bytes moved / bandwidth), at the profile's achievable fraction of peak. Decode reads "
    "every weight plus the KV cache once per step; prefill does 2 × params × batch × prompt FLOPs plus attention. "
    "Not modelled: kernel-launch and framework overhead, communication between GPUs, paged/chunked scheduling "
    "(batches are static, activations unchunked), dequantization cost. Prices are editable assumptions."
)

GB = cm.GB


@st.cache_data(show_spinner=False)
def _cached_shape(spec: str):
    return cm.shape_for_model(spec)  # exceptions are not cached, so a fixed path is read again


def shape_of(spec: str):
    """(ModelShape, None) or (None, error message)."""
    try:
        return _cached_shape(spec), None
    except Exception as e:  # noqa: BLE001 -- a missing checkpoint, no network for a hub id, a config without a field
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


# -- inputs ----------------------------------------------------------------------------------------
runs = store.list()
run_setting = None
left, right = st.columns(2)
with left:
    st.subheader("Model and workload")
    src = st.radio("Model from", ["Preset", "Stored run", "Checkpoint or hub id"], key="cm_model_src", horizontal=True)
    if src == "Preset":
        spec = st.selectbox("Model", list(cm.PRESET_MODELS), key="cm_model")
    elif src == "Stored run":
        if not runs:
            st.info("No stored runs yet: pick a preset model.")
            st.stop()
        by_id = {r.id: r for r in runs}
        rid = st.selectbox("Run", list(by_id), key="cm_run", format_func=lambda i: f"{by_id[i].label} · {by_id[i].experiment.model} · {i}")
        spec = by_id[rid].experiment.model
        run_setting = cm.setting_for_experiment(by_id[rid].experiment)
    else:
        spec = st.text_input("Checkpoint directory, config.json or hub id", key="cm_path", placeholder="/path/to/checkpoint or org/name").strip()
        if not spec:
            st.info("Type a checkpoint directory or a hub id, or pick a preset.")
            st.stop()
    shape, err = shape_of(spec)
    if shape is None:
        st.error(f"Could not read the shape of model `{spec}`: {err}")
        st.stop()
    n = cm.param_counts(shape)["total"]
    st.caption(f"**{shape.name}**: {n / 1e9:.3g} B params, {shape.layers} layers, hidden {shape.hidden}, MLP "
               f"{shape.intermediate}, {shape.heads} heads / {shape.kv_heads} KV heads × {shape.head_dim}, vocab "
               f"{shape.vocab}, embeddings {'tied' if shape.tied else 'untied'}.")
    c1, c2, c3 = st.columns(3)
    batch = c1.number_input("Batch size", min_value=1, max_value=65536, value=1, step=1, key="cm_batch")
    prompt_len = c2.number_input("Prompt length (tokens)", min_value=1, max_value=1_048_576, value=1024, step=128, key="cm_prompt")
    gen_tokens = c3.number_input("Generated tokens", min_value=1, max_value=1_048_576, value=256, step=64, key="cm_gen")

    names = st.multiselect("Settings to compare", list(cm.PRESET_SETTINGS), key="cm_settings",
                           default=["bf16", "int4 g128 (W4A16)", "FP8 W8A8"])
    settings = [cm.PRESET_SETTINGS[s] for s in names]
    if src == "Stored run":  # the run's own setting (dtype and format) first
        settings.insert(0, replace(run_setting, name=f"{run_setting.name} (this run)"))
    with st.expander("Custom weight-only setting"):
        if st.checkbox("Add it", key="cm_custom_on"):
            d1, d2, d3 = st.columns(3)
            bits = d1.number_input("Bits", min_value=2, max_value=8, value=4, key="cm_custom_bits")
            group = d2.number_input("Group size (0 = per channel)", min_value=0, max_value=65536, value=64, key="cm_custom_group")
            sym = d3.checkbox("Symmetric", value=True, key="cm_custom_sym")
            settings.append(cm.weight_only(int(bits), int(group) or None, sym))
    if not settings:
        st.info("Choose at least one setting.")
        st.stop()

with right:
    st.subheader("Hardware")
    presets = dict(cm.PRESET_HARDWARE)
    if probed := st.session_state.get("cm_probed"):
        presets[probed.name] = probed
    h1, h2 = st.columns([3, 2], vertical_alignment="bottom")
    if st.session_state.get("cm_hw") not in presets:
        st.session_state["cm_hw"] = cm.DEFAULT_HARDWARE
    hw_name = h1.selectbox("Profile", list(presets), key="cm_hw")

    def _probe():
        st.session_state["cm_probed"] = probed = cm.probe_host()
        st.session_state["cm_hw"] = probed.name

    h2.button("Measure this machine", key="cm_probe", on_click=_probe,
              help="Times a memory copy and an fp32 matmul on the machine running the app (a few seconds).")
    base = presets[hw_name]
    # One widget per field, keyed by the profile, so picking another profile loads its numbers.
    EDIT = {  # field: (label, step, optional)
        "bandwidth_gbs": ("Memory bandwidth (GB/s)", 10.0, False),
        "memory_gb": ("Memory (GB)", 1.0, False),
        "bf16_tflops": ("Dense bf16/fp16 (TFLOP/s)", 1.0, False),
        "fp32_tflops": ("fp32 (TFLOP/s)", 1.0, False),
        "int8_tops": ("Dense int8 (TOPS, 0 = none)", 1.0, True),
        "fp8_tflops": ("Dense fp8 (TFLOP/s, 0 = none)", 1.0, True),
        "price_per_hour": ("Price ($/hour, assumption)", 0.1, False),
        "bw_efficiency": ("Bandwidth efficiency", 0.05, False),
        "flop_efficiency": ("FLOP/s efficiency", 0.05, False),
        "mem_utilization": ("Usable memory fraction", 0.05, False),
        "layer_overhead_us": ("Per-layer step overhead (µs)", 1.0, False),
    }
    values = {}
    cols = st.columns(2)
    for i, (f, (label, step, optional)) in enumerate(EDIT.items()):
        v = getattr(base, f)
        frac = f in ("bw_efficiency", "flop_efficiency", "mem_utilization")
        values[f] = cols[i % 2].number_input(
            label, min_value=0.0, max_value=1.0 if frac else None, value=float(v or 0.0), step=step,
            format="%.2f" if frac else "%.4g", key=f"cm_hw_{f}_{hw_name}")
        if optional and not values[f]:
            values[f] = None
    hw = replace(base, **values)
    st.caption("Peak rates are dense spec-sheet numbers (sparsity figures halved). Efficiency factors scale them "
               "to what kernels reach; a measured profile uses achieved rates (efficiency 1). The per-layer "
               "overhead adds launch and small-op time to every decode step (0 = pure roofline).")
    if hw.kernel_bw:
        by_fmt = {}
        for fmt, b, frac in hw.kernel_bw:
            by_fmt.setdefault(fmt, []).append(f"{frac:.0%} at batch {b}")
        st.caption(f"Calibrated to {hw.calibration}: decode moves the decoder linears at the bandwidth their "
                   "kernels reached (fraction of peak) — " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by_fmt.items())
                   + ". Settings without a measurement use the bandwidth efficiency.")
    if hw.overhead_saving_us:
        st.caption("The per-layer overhead is lower where a format's kernels do the work of separate kernels of "
                   "the bf16 loop it was fitted to (the 4-bit GEMV's epilogues at batch 1): "
                   + "; ".join(f"{fmt} at batch {b}: {us:g} µs less" for fmt, b, us in hw.overhead_saving_us) + ".")

# -- estimates -------------------------------------------------------------------------------------
estimates, errors = [], []
for s in settings:
    try:
        estimates.append((s, cm.estimate(shape, s, hw, int(batch), int(prompt_len), int(gen_tokens))))
    except ValueError as e:
        errors.append(f"{s.name}: {e}")
for e in errors:
    st.error(e)
if not estimates:
    st.stop()

context = int(prompt_len) + int(gen_tokens)
for s, e in estimates:
    if e.max_batch == 0:
        one = cm.memory_needed(shape, s, 1, int(prompt_len), int(gen_tokens))
        st.error(f"**{s.name}**: a context of {context:,} tokens does not fit on {hw.name} even at batch 1: weights "
                 f"{e.weight_bytes / GB:.2f} GB + KV cache and activations {(one - e.weight_bytes) / GB:.2f} GB "
                 f"> usable {e.usable_bytes / GB:.2f} GB ({hw.memory_gb:g} GB × {hw.mem_utilization:g}).")
    elif not e.fits:
        st.warning(f"**{s.name}**: batch {batch} does not fit on {hw.name} with {context:,} tokens of context; "
                   f"at most {e.max_batch}.")
    for note in e.notes:
        st.info(f"**{s.name}**: {note}")

st.subheader(f"{shape.name} on {hw.name}: batch {batch}, prompt {prompt_len}, {gen_tokens} generated tokens")
table = pd.DataFrame([{
    "Setting": s.name,
    "Weights (GB)": e.weight_bytes / GB,
    "KV cache (GB)": e.kv_bytes / GB,
    "Fits": "yes" if e.fits else "no",
    "Max batch": e.max_batch,
    "Prefill (ms)": e.prefill_ms,
    "Prefill bound": e.prefill_bound,
    "Decode (ms/token)": e.decode_ms,
    "Decode bound": e.decode_bound,
    "Decode tokens/s": e.decode_tokens_per_s,
    "End-to-end tokens/s": e.tokens_per_s,
    "$ / 1M tokens": e.cost_per_million,
    "Compute-bound from batch": e.crossover_batch,
} for s, e in estimates])
st.dataframe(table, hide_index=True, key="cm_table", column_config={
    "Weights (GB)": st.column_config.NumberColumn(format="%.3f"),
    "KV cache (GB)": st.column_config.NumberColumn(format="%.3f"),
    "Prefill (ms)": st.column_config.NumberColumn(format="%.2f"),
    "Decode (ms/token)": st.column_config.NumberColumn(format="%.3f"),
    "Decode tokens/s": st.column_config.NumberColumn(format="%.0f"),
    "End-to-end tokens/s": st.column_config.NumberColumn(format="%.0f"),
    "$ / 1M tokens": st.column_config.NumberColumn(format="$%.4f"),
    "Compute-bound from batch": st.column_config.NumberColumn(format="%.0f"),
})
st.caption(
    "Decode is the mean step over the generated tokens (context prompt + generated/2). End-to-end tokens/s = "
    "batch × generated / (prefill + generated × decode step), static batching; the cost is price per hour / "
    "(3600 × end-to-end tokens/s) × 1e6, generated tokens only. Max batch: weights + batch × (KV of prompt + "
    "generated tokens + prefill activations) ≤ memory × usable fraction. *Compute-bound from batch*: decode "
    "batch where FLOP time overtakes memory time at this context (∞: KV reads grow faster than FLOPs). Linears "
    "in the setting's format; embeddings, lm_head, norms and the KV cache in the activation dtype."
)

# -- measured points --------------------------------------------------------------------------------
points = cm.measured_points(runs)


def _shape_only(spec):
    return shape_of(spec)[0]


measured = cm.compare_measured(points, hw, _shape_only)
on_chart = [m for m in measured if m["model_shape"] == shape.name]

# -- chart -----------------------------------------------------------------------------------------
fig = make_subplots(rows=1, cols=2, subplot_titles=("Decode latency per step", "Decode throughput"))
palette = ["#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2", "#72b7b2", "#9d755d", "#eeca3b"]
sweeps = {}
for s, e in estimates:
    top = max(1024, 2 * e.max_batch, int(batch))
    grid = sorted({2**k for k in range(min(top, 65536).bit_length())} | {b for b in (e.max_batch, int(batch)) if b >= 1})
    sweeps[s.name] = pd.DataFrame(cm.sweep_batches(shape, s, hw, int(prompt_len), int(gen_tokens), grid))
ranges = {y: (min(d[y].min() for d in sweeps.values()), max(d[y].max() for d in sweeps.values()))
          for y in ("decode_ms", "decode_tokens_per_s")}
for i, (s, e) in enumerate(estimates):
    color = palette[i % len(palette)]
    rows = sweeps[s.name]
    inside, beyond = rows[rows["batch"] <= e.max_batch], rows[rows["batch"] >= max(e.max_batch, 1)]
    for part, dash, show in ((inside, "solid", True), (beyond, "dot", inside.empty)):
        if part.empty:
            continue
        for col, y, fmt in ((1, "decode_ms", "%{y:.3g} ms"), (2, "decode_tokens_per_s", "%{y:.4g} tokens/s")):
            fig.add_scatter(x=part["batch"], y=part[y], mode="lines", name=s.name, legendgroup=s.name,
                            showlegend=show and col == 1, line={"color": color, "dash": dash},
                            hovertemplate=f"{s.name}<br>batch %{{x}}: {fmt}<br>%{{customdata}}-bound<extra></extra>",
                            customdata=part["decode_bound"], row=1, col=col)
    if e.max_batch >= 1:  # the memory limit as a vertical segment over the plotted range
        for col, y in ((1, "decode_ms"), (2, "decode_tokens_per_s")):
            fig.add_scatter(x=[e.max_batch, e.max_batch], y=list(ranges[y]), mode="lines", legendgroup=s.name,
                            showlegend=False, line={"color": color, "dash": "dash", "width": 1},
                            hovertemplate=f"{s.name}: memory limit at batch {e.max_batch}<extra></extra>", row=1, col=col)
if on_chart:
    m = pd.DataFrame(on_chart)
    for col, y in ((1, "decode_ms"), (2, None)):
        yy = m["decode_ms"] if y else m["batch"] * 1000 / m["decode_ms"]
        fig.add_scatter(x=m["batch"], y=yy, mode="markers", name="measured (stored runs)", legendgroup="measured",
                        showlegend=col == 1, marker={"symbol": "x", "size": 11, "color": "black"}, text=m["label"],
                        hovertemplate="%{text}<br>batch %{x}: %{y:.4g}<extra>measured</extra>", row=1, col=col)
fig.update_xaxes(type="log", title_text="batch size")
fig.update_yaxes(type="log", title_text="ms per decode step", row=1, col=1)
fig.update_yaxes(type="log", title_text="generated tokens/s", row=1, col=2)
fig.update_layout(height=460, margin={"t": 40, "b": 10}, legend={"orientation": "h", "y": -0.2})
st.plotly_chart(fig, key="cm_chart")
st.caption("Solid: fits in memory; dotted: beyond the memory limit (dashed vertical line) for this context. "
           + ("Crosses: measured points of stored runs of this model on a matching device." if on_chart else ""))

st.subheader("Measured vs estimate")
if not points:
    st.caption("No stored run has latency measurements yet, so there is nothing to compare the estimate with.")
elif not measured:
    devices = sorted({f"{p['device']} ({p['device_name']})" if p.get("device_name") else p["device"] for p in points})
    st.caption(f"No stored run was measured on a device matching **{hw.name}** (stored runs ran on: "
               f"{', '.join(devices)}). Pick the CPU profile, or *Measure this machine*, to compare with runs "
               "measured on a CPU.")
else:
    st.dataframe(pd.DataFrame([{
        "Run": m["label"], "Model": m["model"], "Batch": m["batch"], "Prompt": m["prompt_len"],
        "Decode measured (ms)": m["decode_ms"], "Decode estimate (ms)": m["est_decode_ms"],
        "Decode measured / estimate": m["decode_ratio"], "Prefill measured (ms)": m["prefill_ms"],
        "Prefill estimate (ms)": m["est_prefill_ms"], "Prefill measured / estimate": m["prefill_ratio"],
        "Device": m["device_name"] or m["device"],
    } for m in measured]), hide_index=True, key="cm_measured", column_config={
        c: st.column_config.NumberColumn(format="%.2f") for c in (
            "Decode measured (ms)", "Decode estimate (ms)", "Prefill measured (ms)", "Prefill estimate (ms)")
    } | {c: st.column_config.NumberColumn(format="%.2fx") for c in ("Decode measured / estimate", "Prefill measured / estimate")})
    st.caption(f"Each estimate uses the run's own model, dtype, setting, prompt length and decode tokens on the "
               f"**{hw.name}** profile as edited above. A ratio above 1 is time the roofline does not see: Python and "
               "framework overhead per step, other load on the machine, and on CPU the reference path of RTN layers "
               "(dequantize, then matmul), which reads more bytes than the packed weights the model assumes.")
