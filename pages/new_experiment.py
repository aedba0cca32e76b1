"""New experiment: pick a model, tick one or more compression settings, submit one run each."""
import streamlit as st

from core import jobs
from core.assets import DEFAULT_MODEL_NOTE
from core.errors import RecipeError, SlimError
from core.models import BUILTIN_MODELS, resolve_device
from core.quant.bnb import bnb_status
from core.recipe import DEFAULT_MODEL, parse_experiment, save_refusal
from core.store import Store

store = st.session_state.get("store") or Store()

# (key, label, steps, bitsandbytes mode it needs, help)
PRESETS = [
    ("baseline", "Baseline (no compression)", [], None,
     "The model as loaded. Runs that compress it report KL and top-1 agreement against it."),
    ("rtn8", "RTN int8 per-channel", [{"method": "rtn", "bits": 8, "group_size": None}], None, None),
    ("rtn4g64", "RTN int4 g64", [{"method": "rtn", "bits": 4, "group_size": 64}], None, None),
    ("rtn4g128", "RTN int4 g128", [{"method": "rtn", "bits": 4, "group_size": 128}], None,
     "128 does not divide every layer width (e.g. 576 in the default model): the last group of "
     "each row is then shorter, and still gets its own scale."),
    ("rtn3g64", "RTN int3 g64", [{"method": "rtn", "bits": 3, "group_size": 64}], None, None),
    ("rtn2g64", "RTN int2 g64", [{"method": "rtn", "bits": 2, "group_size": 64}], None,
     "Expect a large accuracy loss: this shows where round-to-nearest breaks down."),
    ("gptq4g64", "GPTQ int4 g64", [{"method": "gptq", "bits": 4, "group_size": 64}], None,
     "Calibrated layer by layer on 32 windows × 256 tokens of the Brown calibration split."),
    ("gptq3g64", "GPTQ int3 g64", [{"method": "gptq", "bits": 3, "group_size": 64}], None,
     "Where GPTQ's error compensation matters most: compare with RTN int3 g64."),
    ("awq4g64", "AWQ int4 g64", [{"method": "awq", "bits": 4, "group_size": 64}], None,
     ("Activation-aware scaling and weight clipping, searched layer by layer on 32 windows × 256 tokens of the "
      "Brown calibration split, then round-to-nearest (same storage as RTN).")),
    ("sq_w8a8", "SmoothQuant W8A8 int8", [{"method": "w8a8", "scheme": "int8"}], None,
     "int8 weights (per channel, GPTQ-rounded) and per-token int8 activations; activation outliers moved into "
     "the weights with a smoothing strength searched per group of layers on 32 calibration windows."),
    ("fp8_w8a8", "FP8 W8A8 (E4M3)", [{"method": "w8a8", "scheme": "fp8"}], None,
     "FP8 weights (per channel, scales searched on calibration data, GPTQ-rounded) and per-token FP8 activations; "
     "no smoothing by default (FP8's relative rounding gains nothing from it; a fixed alpha in the custom form still smooths). "
     "Real FP8 matmuls need a recent GPU; elsewhere a reference path."),
    ("mag50", "Magnitude pruning 50%", [{"method": "magnitude", "sparsity": 0.5}], None,
     "Zero the half of each layer's weights with the smallest magnitude; no calibration data."),
    ("wanda50", "Wanda pruning 50%", [{"method": "wanda", "sparsity": 0.5}], None,
     "|W| x input feature norm from 32 calibration windows, compared per output row."),
    ("sgpt50", "SparseGPT 50%", [{"method": "sparsegpt", "sparsity": 0.5}], None,
     "Second-order pruning with weight updates (shares GPTQ's Hessian), layer by layer."),
    ("sgpt24", "SparseGPT 2:4", [{"method": "sparsegpt", "pattern": "2:4"}], None,
     "2 of every 4 weights kept: the pattern sparse tensor cores run."),
    ("sgpt24_gptq4", "SparseGPT 2:4 → GPTQ int4 g64", [{"method": "sparsegpt", "pattern": "2:4"},
                                                       {"method": "gptq", "bits": 4, "group_size": 64}], None,
     "A chain: prune, then quantize what is left (GPTQ keeps the pruned weights at zero)."),
    ("struct_mlp25", "Structured: −25% MLP channels", [{"method": "structured", "mlp_sparsity": 0.25}], None,
     "A genuinely smaller dense model (plain transformers checkpoint): the least important quarter of every "
     "MLP's channels removed."),
    ("struct_l4", "Structured: −4 decoder layers", [{"method": "structured", "remove_layers": 4}], None,
     "The 4 layers that change their input least (ShortGPT block influence) removed."),
    ("bnb_int8", "bitsandbytes LLM.int8", [{"method": "bnb", "mode": "int8"}], "int8", None),
    ("bnb_nf4", "bitsandbytes NF4", [{"method": "bnb", "mode": "nf4"}], "nf4", None),
    ("bnb_fp4", "bitsandbytes FP4", [{"method": "bnb", "mode": "fp4"}], "fp4", None),
]
DEFAULT_PRESETS = {"baseline", "rtn8", "rtn4g64"}
# Compression settings a distillation student can start from (the form's "Student" choice).
DISTILL_STUDENTS = {
    "SparseGPT 2:4": [{"method": "sparsegpt", "pattern": "2:4"}],
    "Structured −25% MLP": [{"method": "structured", "mlp_sparsity": 0.25}],
    "Wanda 50%": [{"method": "wanda", "sparsity": 0.5}],
    "GPTQ int3 g64": [{"method": "gptq", "bits": 3, "group_size": 64}],
    "RTN int4 g64": [{"method": "rtn", "bits": 4, "group_size": 64}],
}


@st.cache_resource(show_spinner="Checking which bitsandbytes modes work here…")
def _bnb(device: str) -> dict:
    try:
        return bnb_status(resolve_device(device))
    except SlimError as e:  # e.g. cuda asked for but absent
        return {"available": False, "int8": False, "nf4": False, "fp4": False, "version": "", "detail": str(e)}


st.title("New experiment")
st.write("Choose a model and tick the settings to try: each ticked setting runs as its own "
         "experiment in the background, measured the same way so the results are comparable.")

left, right = st.columns(2, gap="large")

with left:
    st.subheader("Model")
    other = "Other: local checkpoint, .gguf file or hub id"
    choice = st.radio("Model", [*BUILTIN_MODELS, other], key="model_choice",
                      format_func=lambda k: f"{k} — {BUILTIN_MODELS[k]}" if k in BUILTIN_MODELS else k)
    if choice == other:
        model = st.text_input("Model location", key="model_other",
                              placeholder="/path/to/checkpoint-dir, /path/to/model.gguf or org/name")
        st.caption("A transformers checkpoint directory, a .gguf file (converted once) or a "
                   "Hugging Face hub id (needs network access). Causal language models only.")
    else:
        model = choice
        if choice == DEFAULT_MODEL:
            st.info(DEFAULT_MODEL_NOTE, icon=":material/info:")
    c1, c2 = st.columns(2)
    dtype = c1.selectbox("Weights dtype", ["fp32", "bf16", "fp16"], key="dtype",
                         help="dtype of the unquantized weights and activations.")
    device = c2.selectbox("Device", ["auto", "cpu", "cuda"], key="device",
                          help="auto = a CUDA GPU when there is one, else the CPU.")

    st.subheader("Settings")
    bnb = _bnb(device)
    selected = []  # (label shown in errors, steps, experiment name or None)
    for key, label, steps, bnb_mode, help_text in PRESETS:
        usable = bnb_mode is None or bool(bnb.get(bnb_mode))
        if not usable:
            help_text = f"Not available on this machine: {bnb.get('detail') or 'bitsandbytes is missing'}"
        ticked = st.checkbox(label, value=key in DEFAULT_PRESETS and usable, key=f"preset_{key}",
                             disabled=not usable, help=help_text)
        if ticked and usable:
            if bnb_mode:  # bitsandbytes computes in the chosen dtype
                steps = [dict(steps[0], compute_dtype=dtype)]
            selected.append((label, steps, None))
    modes = ", ".join(f"{m} {'✓' if bnb.get(m) else '✗'}" for m in ("int8", "nf4", "fp4"))
    st.caption(f"bitsandbytes {bnb.get('version') or 'not installed'}: {modes}."
               + (f" {bnb['detail']}" if bnb.get("detail") else ""))

    with st.container(border=True):
        custom = st.checkbox("Custom weight-quantization setting", key="custom_on")
        method = st.radio("Method", ["rtn", "gptq", "awq"], key="custom_method", horizontal=True, disabled=not custom,
                          format_func={"rtn": "RTN (round to nearest)", "gptq": "GPTQ (calibrated)",
                                       "awq": "AWQ (calibrated)"}.get)
        c1, c2, c3 = st.columns(3)
        bits = c1.number_input("Bits", value=4, step=1, key="custom_bits", disabled=not custom,
                               help="2 to 8 bits per weight.")
        per_channel = c3.checkbox("Per-channel", key="custom_per_channel", disabled=not custom,
                                  help="One scale per output channel instead of per group of columns.")
        group = c2.number_input("Group size", value=64, step=1, key="custom_group",
                                disabled=not custom or per_channel,
                                help="Columns sharing one scale (and zero point when asymmetric).")
        symmetric = st.checkbox("Symmetric", value=True, key="custom_symmetric", disabled=not custom,
                                help="Symmetric: no zero point. Asymmetric: a zero point per group, "
                                     "which fits skewed weights better at a small memory cost.")
        skip = st.text_input("Keep unquantized (comma-separated layer names)", value="lm_head",
                             key="custom_skip", disabled=not custom)
        gptq_on = custom and method == "gptq"
        calibrated = custom and method in ("gptq", "awq")
        c1, c2, c3, c4 = st.columns(4)
        act_order = c1.checkbox("Act-order", value=True, key="custom_act_order", disabled=not gptq_on,
                                help="Quantize columns in order of decreasing input energy (static groups).")
        damp = c2.number_input("Damping", value=0.01, step=0.005, format="%.3f", key="custom_damp", disabled=not gptq_on,
                               help="Fraction of the mean Hessian diagonal added for stability (raised automatically if needed).")
        calib_windows = c3.number_input("Calibration windows", value=32, step=1, key="custom_calib_windows",
                                        disabled=not calibrated)
        calib_len = c4.number_input("Window length", value=256, step=1, key="custom_calib_len", disabled=not calibrated)
        name = st.text_input("Name (optional)", key="custom_name", disabled=not custom)
        if custom:
            step = {"method": method, "bits": int(bits), "group_size": None if per_channel else int(group),
                    "symmetric": symmetric, "skip": [s.strip() for s in skip.split(",") if s.strip()]}
            if gptq_on:
                step |= {"act_order": act_order, "damp": float(damp)}
            if calibrated:
                step |= {"calibration": {"windows": int(calib_windows), "window_len": int(calib_len)}}
            selected.append((name or f"Custom {method.upper()}", [step], name.strip() or None))

    with st.container(border=True):
        w8_on = st.checkbox("Custom W8A8 setting (8-bit weights and activations)", key="w8_on")
        c1, c2, c3 = st.columns(3)
        w8_scheme = c1.radio("Format", ["int8", "fp8"], key="w8_scheme", disabled=not w8_on,
                             format_func={"int8": "int8", "fp8": "FP8 (E4M3)"}.get)
        w8_smooth = c2.radio("Smoothing (SmoothQuant)", ["auto", "fixed", "none"], key="w8_smooth",
                             disabled=not w8_on, help="auto: the strength alpha is searched per group of layers "
                             "on the calibration data (smallest W8A8 output error); fixed: one alpha for all.")
        w8_alpha = c2.slider("alpha", 0.0, 1.0, 0.5, 0.05, key="w8_alpha",
                             disabled=not w8_on or w8_smooth != "fixed")
        w8_round = c3.radio("Weight rounding", ["gptq", "rtn"], key="w8_round", disabled=not w8_on,
                            format_func={"gptq": "GPTQ (calibrated)", "rtn": "round to nearest"}.get)
        c1, c2 = st.columns(2)
        w8_windows = c1.number_input("Calibration windows", value=32, step=1, key="w8_windows", disabled=not w8_on)
        w8_len = c2.number_input("Window length", value=256, step=1, key="w8_len", disabled=not w8_on)
        if w8_on:
            alpha = {"auto": "auto", "fixed": float(w8_alpha), "none": None}[w8_smooth]
            w8_step = {"method": "w8a8", "scheme": w8_scheme, "smoothquant_alpha": alpha, "weight_rounding": w8_round,
                       "calibration": {"windows": int(w8_windows), "window_len": int(w8_len)}}
            selected.append(("Custom W8A8", [w8_step], None))

    with st.container(border=True):
        pr_on = st.checkbox("Custom pruning (optionally followed by quantization)", key="pr_on")
        c1, c2, c3 = st.columns(3)
        pr_method = c1.radio("Pruning method", ["magnitude", "wanda", "sparsegpt", "structured"], key="pr_method",
                             disabled=not pr_on, format_func={"magnitude": "Magnitude", "wanda": "Wanda",
                                                              "sparsegpt": "SparseGPT",
                                                              "structured": "Structured (smaller dense model)"}.get)
        structured = pr_method == "structured"
        pr_pattern = c2.selectbox("Pattern", ["unstructured", "2:4", "4:8"], key="pr_pattern",
                                  disabled=not pr_on or structured)
        pr_sparsity = c2.slider("Sparsity", 0.05, 0.95, 0.5, 0.05, key="pr_sparsity",
                                disabled=not pr_on or structured or pr_pattern != "unstructured",
                                help="Fraction of each layer's weights removed (N:M patterns fix it).")
        pr_owl = c2.checkbox("OWL layer ratios", key="pr_owl",
                             disabled=not pr_on or structured or pr_pattern != "unstructured",
                             help="Non-uniform per-layer sparsity from outlier statistics, same overall ratio.")
        pr_mlp = c3.slider("MLP channels removed", 0.0, 0.9, 0.25, 0.05, key="pr_mlp", disabled=not pr_on or not structured)
        pr_heads = c3.slider("Attention heads removed", 0.0, 0.9, 0.0, 0.05, key="pr_heads", disabled=not pr_on or not structured)
        pr_layers = c3.number_input("Decoder layers removed", 0, 100, 0, key="pr_layers", disabled=not pr_on or not structured)
        pr_then = st.selectbox("Then", ["nothing", "GPTQ int4 g64", "RTN int4 g64", "RTN int8 per-channel"],
                               key="pr_then", disabled=not pr_on)
        if pr_on:
            if structured:
                first = {"method": "structured", "mlp_sparsity": float(pr_mlp), "head_sparsity": float(pr_heads),
                         "remove_layers": int(pr_layers)}
            else:
                first = {"method": pr_method, "sparsity": float(pr_sparsity), "pattern": pr_pattern, "owl": pr_owl}
            then = {"nothing": [], "GPTQ int4 g64": [{"method": "gptq", "bits": 4, "group_size": 64}],
                    "RTN int4 g64": [{"method": "rtn", "bits": 4, "group_size": 64}],
                    "RTN int8 per-channel": [{"method": "rtn", "bits": 8}]}[pr_then]
            selected.append(("Custom pruning", [first, *then], None))

    with st.container(border=True):
        ds_on = st.checkbox("Knowledge distillation (train the compressed model to match the original)", key="ds_on")
        ds_student = st.radio("Student", list(DISTILL_STUDENTS) + ["smaller"], key="ds_student", disabled=not ds_on,
                              horizontal=True, format_func=lambda k: "Fewer layers" if k == "smaller" else k,
                              help="The compressed model the chosen setting makes, or a smaller configuration with "
                                   "fewer decoder layers initialised from the original's.")
        c1, c2, c3 = st.columns(3)
        ds_layers = c1.number_input("Student layers", 1, 1000, 20, key="ds_layers",
                                    disabled=not ds_on or ds_student != "smaller")
        ds_teacher = c2.text_input("Teacher", "baseline", key="ds_teacher", disabled=not ds_on,
                                   help="'baseline' (the uncompressed model) or another model with the same tokenizer.")
        ds_nproc = c3.number_input("Processes (GPUs)", 1, 64, 1, key="ds_nproc", disabled=not ds_on,
                                   help="More than 1 launches torchrun (DDP), one process per GPU.")
        c1, c2, c3, c4, c5, c6 = st.columns(6)
        ds_kl = c1.number_input("KL", 0.0, 100.0, 1.0, key="ds_kl", disabled=not ds_on, help="forward KL(teacher ‖ student)")
        ds_rkl = c2.number_input("Reverse KL", 0.0, 100.0, 0.0, key="ds_rkl", disabled=not ds_on)
        ds_js = c3.number_input("JS", 0.0, 100.0, 0.0, key="ds_js", disabled=not ds_on, help="Jensen-Shannon")
        ds_ce = c4.number_input("Cross-entropy", 0.0, 100.0, 0.0, key="ds_ce", disabled=not ds_on,
                                help="next-token loss on the training text")
        ds_hidden = c5.number_input("Hidden states", 0.0, 100.0, 0.0, key="ds_hidden", disabled=not ds_on,
                                    help="match hidden states (normalised MSE; learned projection when widths differ)")
        ds_temp = c6.number_input("Temperature", 0.05, 100.0, 1.0, key="ds_temp", disabled=not ds_on)
        c1, c2, c3, c4 = st.columns(4)
        ds_steps = c1.number_input("Steps", 1, 1_000_000, 100, key="ds_steps", disabled=not ds_on)
        ds_budget = c2.number_input("Time budget (s, 0 = none)", 0, 10**7, 600, key="ds_budget", disabled=not ds_on)
        ds_lr = c3.number_input("Learning rate", 1e-7, 1.0, 1e-4, format="%.1e", key="ds_lr", disabled=not ds_on)
        ds_batch = c4.number_input("Windows per step", 1, 4096, 4, key="ds_batch", disabled=not ds_on,
                                   help="micro-batch per process (× gradient accumulation below)")
        c1, c2, c3, c4 = st.columns(4)
        ds_accum = c1.number_input("Gradient accumulation", 1, 1024, 1, key="ds_accum", disabled=not ds_on)
        ds_eval = c2.number_input("Evaluate every (steps)", 1, 100_000, 25, key="ds_eval", disabled=not ds_on)
        ds_patience = c3.number_input("Early-stop patience", 0, 1000, 0, key="ds_patience", disabled=not ds_on,
                                      help="evaluations without improvement before stopping (0 = never)")
        ds_windows = c4.number_input("Training windows", 1, 4096, 1024, key="ds_windows", disabled=not ds_on,
                                     help="256-token windows of the calibration split (never the evaluation split)")
        if ds_on:
            distill = {"method": "distill", "teacher": ds_teacher.strip() or "baseline", "kl": float(ds_kl),
                       "reverse_kl": float(ds_rkl), "js": float(ds_js), "ce": float(ds_ce), "hidden": float(ds_hidden),
                       "temperature": float(ds_temp), "max_steps": int(ds_steps),
                       "time_budget_s": float(ds_budget) or None, "lr": float(ds_lr), "micro_batch": int(ds_batch),
                       "grad_accum": int(ds_accum), "eval_every": int(ds_eval), "patience": int(ds_patience),
                       "warmup_steps": min(10, int(ds_steps)), "nproc": int(ds_nproc),
                       "data": {"windows": int(ds_windows)}}
            if ds_student == "smaller":
                chain = [dict(distill, student_layers=int(ds_layers))]
            else:
                chain = [*DISTILL_STUDENTS[ds_student], distill]
            selected.append(("Custom distillation", chain, None))

with right:
    st.subheader("Measurement")
    st.caption(
        "Small defaults so that one run of the 135M default model takes about a minute or two on "
        "2 CPU cores: perplexity on 16 windows × 256 tokens (4,096 tokens — enough to rank "
        "settings; raise both for tighter numbers), latency with a 64-token prompt, 16 decode "
        "steps and 3 timed repeats. Only runs measured with the same model, corpus, windows and "
        "window length have comparable accuracy."
    )
    corpus = st.text_input("Corpus", value="brown", key="m_corpus",
                           help="'brown' (built-in evaluation text) or the path of a UTF-8 text file.")
    c1, c2 = st.columns(2)
    windows = c1.number_input("Evaluation windows", 1, 4096, 16, key="m_windows")
    window_len = c2.number_input("Window length (tokens)", 8, 8192, 256, key="m_window_len")
    latency = st.toggle("Measure latency", value=True, key="m_latency")
    c1, c2 = st.columns(2)
    prompt_len = c1.number_input("Prompt length (tokens)", 1, 8192, 64, key="m_prompt_len", disabled=not latency)
    decode_tokens = c2.number_input("Decode steps", 2, 1024, 16, key="m_decode_tokens", disabled=not latency)
    warmup = c1.number_input("Warm-up repeats", 0, 100, 1, key="m_warmup", disabled=not latency)
    repeats = c2.number_input("Timed repeats", 1, 1000, 3, key="m_repeats", disabled=not latency)
    batch_sizes = st.multiselect("Decode batch sizes (throughput)", [1, 2, 4, 8, 16, 32, 64], default=[1, 4],
                                 key="m_batches", disabled=not latency)
    samples = st.toggle("Generate sample outputs", value=True, key="m_samples")
    sample_tokens = st.number_input("Tokens per sample", 1, 512, 24, key="m_sample_tokens", disabled=not samples)

measure = {
    "corpus": corpus, "eval_windows": int(windows), "window_len": int(window_len),
    "latency": latency, "prompt_len": int(prompt_len), "decode_tokens": int(decode_tokens),
    "batch_sizes": batch_sizes or [1], "warmup": int(warmup), "repeats": int(repeats),
    "samples": samples, "sample_tokens": int(sample_tokens),
}

save_model = st.checkbox(
    "Save the compressed model", key="save_model",
    help="Each run that compresses the model (not the baseline or bitsandbytes) saves it in its artifacts "
         "folder (safetensors + a quantization config; deleted with the run). Run detail shows where, and the "
         "command that measures it again without recompressing.")

st.divider()
n = len(selected)
if st.button(f"Run {n} experiment{'s' * (n != 1)}", type="primary", disabled=not n, key="submit"):
    experiments, errors = [], []
    for label, steps, exp_name in selected:
        try:
            experiments.append(parse_experiment({"model": model, "dtype": dtype, "device": device,
                                                 "steps": steps, "measure": measure, "name": exp_name,
                                                 "save_model": save_model and bool(steps)
                                                 and save_refusal([s["method"] for s in steps]) is None}))
        except RecipeError as e:
            errors.append(f"**{label}** — {e}")
    if errors:
        for e in errors:
            st.error(e)
        st.caption("Nothing was submitted.")
    else:
        try:
            st.session_state["submitted"] = [(jobs.submit(e, store), e.label()) for e in experiments]
        except (SlimError, OSError) as e:
            st.error(f"Could not start the experiments: {e}")
if not n:
    st.caption("Tick at least one setting.")

if submitted := st.session_state.get("submitted"):
    st.success(f"Submitted {len(submitted)} experiment{'s' * (len(submitted) != 1)}. They run in the "
               "background; follow them on the Experiments page.")
    for run_id, label in submitted:
        st.page_link("pages/run_detail.py", label=f"{label} (run {run_id})", query_params={"run": run_id},
                     icon=":material/description:")
    st.page_link("pages/experiments.py", label="Experiments: progress of all runs", icon=":material/list:")
    if len(submitted) > 1:
        st.page_link("pages/compare.py", label="Compare these runs", icon=":material/compare_arrows:",
                     query_params={"runs": ",".join(i for i, _ in submitted)})
