"""Run one experiment end to end: load, compress (the chain of steps), measure.

Order matters for honest numbers: accuracy is measured first against a float32 reference copy
(same windows, window by window); the reference is then freed and the process's peak memory is
reset, so the peak reported is that of the compressed model running latency and generation.
"""
from __future__ import annotations

import copy
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data, models
from .measure import memory
from .measure.accuracy import evaluate
from .measure.env import environment
from .measure.latency import measure_latency
from .paths import ASSETS_DIR
from .recipe import Experiment

NOOP = lambda stage, step=0, total=0: None  # noqa: E731


@dataclass
class StepContext:
    """What a step may need besides the model: calibrated steps draw windows with the tokenizer,
    run on `device`, and append their calibration figures (time, peak memory) to `calibration`."""

    tokenizer: object
    device: str
    progress: Callable
    calibration: list = field(default_factory=list)
    # for distillation: the teacher (uncompressed model), the measurement windows and options, where to write
    reference: object = None
    eval_windows: object = None
    measure: object = None
    artifact_dir: Path | None = None
    step_index: int = 0
    methods: tuple = ()  # the experiment's step methods, in order
    distill: list = field(default_factory=list)


def _apply_rtn(model, step, ctx: StepContext):
    from .quant.linear import quantize_model_rtn

    return quantize_model_rtn(model, step, progress=ctx.progress)


def _calibrated(quantize, needs_windows=lambda step: True):
    """Wrap a calibrated method: draw its calibration windows, run it, keep its pass's figures."""

    def apply(model, step, ctx: StepContext):
        c = step.calibration
        windows = data.calibration_windows(ctx.tokenizer, c.corpus, c.window_len, c.windows, c.seed) if needs_windows(step) else None
        records = quantize(model, step, windows, ctx.device, ctx.progress)
        if records.stats:
            ctx.calibration.append({"step": step.label(), "window_len": c.window_len, "corpus": c.corpus, **records.stats})
        return list(records)

    return apply


def _gptq(*args):
    from .quant.gptq import quantize_model_gptq

    return quantize_model_gptq(*args)


def _awq(*args):
    from .quant.awq import quantize_model_awq

    return quantize_model_awq(*args)


def _w8a8(*args):
    from .quant.smoothquant import quantize_model_w8a8_step

    return quantize_model_w8a8_step(*args)


def _prune(*args):
    from .prune.unstructured import prune_model

    return prune_model(*args)


def _structured(*args):
    from .prune.structured import structured_prune

    return structured_prune(*args)


def _distill(model, step, ctx: StepContext):
    from .distill.step import apply_distill

    return apply_distill(model, step, ctx)


# Steps applied to an already-loaded model, in place; they return per-layer records. (bitsandbytes quantizes
# while loading: see _load.) Steps in MODEL_REPLACING return the model that replaces it in the chain instead.
STEP_APPLIERS = {
    "rtn": _apply_rtn,
    "gptq": _calibrated(_gptq),
    "awq": _calibrated(_awq),
    "w8a8": _calibrated(_w8a8, lambda s: s.needs_calibration()),
    **{m: _calibrated(_prune, lambda s: s.needs_calibration()) for m in ("magnitude", "wanda", "sparsegpt")},
    "structured": _calibrated(_structured),
    "distill": _distill,
}
MODEL_REPLACING = {"distill"}


def _store_sparse(model, layers: list[dict], progress) -> dict:
    """After a chain with pruning: the linears still float (pruned, not quantized afterwards) go into the
    compressed sparse storage where it is smaller (core.prune.sparse: blocked CSR on CPU float32, else bitmask +
    values or N:M values + indices), so the memory figure is what the format really holds; their records get the
    stored bytes. Returns the decoder linears'
    measured sparsity (fraction of exactly-zero weights of all linears but lm_head, as stored; counted
    before the storage changes)."""
    from .calibrate import as_linear, is_linear
    from .prune.sparse import compress_sparse
    from .quant.linear import QuantLinear

    zeros = total = 0
    for name, m in model.named_modules():
        if "lm_head" in name:
            continue
        if isinstance(m, QuantLinear):  # pruned, then quantized: count the zeros as stored
            w = m.qweight.dequantize()
        elif is_linear(m):
            w = as_linear(m).weight
        else:
            continue
        zeros += int((w == 0).sum())
        total += w.numel()
    stored = {r["name"]: r for r in compress_sparse(model, skip=["lm_head"], progress=progress)}
    for rec in layers:
        if rec.get("name") in stored:
            rec.update(bytes=stored[rec["name"]]["bytes"], storage=stored[rec["name"]]["format"])
    return {"linear_sparsity": zeros / total if total else 0.0, "sparse_stored_linears": len(stored)}


def _load(exp: Experiment, src, device: str):
    """Returns (model, reference or None). The reference is the unmodified float32 model,
    kept only when the run changes the model (for KL / top-1 / per-layer error)."""
    if src.kind == "compressed":  # a saved compressed model, measured as stored (run_experiment refuses steps)
        return models.load_model(src, exp.dtype, device), None
    first = exp.steps[0] if exp.steps else None
    if first is not None and first.method == "bnb":
        from .quant.bnb import load_with_bnb

        reference = models.load_model(src, "fp32", device)  # also checks the architecture
        return load_with_bnb(src.location, first, exp.dtype, device), reference
    base = models.load_model(src, "fp32", device)
    if not exp.steps and exp.dtype == "fp32":
        return base, None
    return copy.deepcopy(base).to(models.torch_dtype(exp.dtype)), base


def sample_generations(model, tokenizer, max_new_tokens: int) -> list[dict]:
    prompts = json.loads((ASSETS_DIR / "prompts.json").read_text())["prompts"]
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append({"prompt": prompt, "output": tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()})
    return out


def run_experiment(exp: Experiment, progress=NOOP, artifact_dir: Path | None = None) -> dict:
    from .quant.memory_accounting import module_bytes

    t_start = time.perf_counter()
    timings = {}
    base_rss = memory.current_rss()
    device = models.resolve_device(exp.device)
    m = exp.measure

    progress("load model", 0, 1)
    t = time.perf_counter()
    src = models.resolve(exp.model)
    if src.kind == "compressed" and exp.steps:
        from .errors import RecipeError

        raise RecipeError(f"{exp.model} is a compressed checkpoint ({', '.join((src.checkpoint or {}).get('info', {}).get('step_labels') or []) or 'no steps'}): "
                          "it is measured as stored, so run it without steps; to chain more steps, run the whole chain on its base model.")
    tokenizer = models.load_tokenizer(src)
    windows = data.eval_windows(tokenizer, m.corpus, m.window_len, m.eval_windows)  # fail early on bad data
    model, reference = _load(exp, src, device)
    timings["load_s"] = time.perf_counter() - t
    info = models.model_info(src, reference if reference is not None else model)
    baseline_bytes = module_bytes(reference if reference is not None else model)
    if src.kind == "compressed":  # the float model it was made from, as recorded when it was saved
        baseline_bytes = ((src.checkpoint or {}).get("info") or {}).get("baseline_weight_bytes") or baseline_bytes

    t = time.perf_counter()
    layers: list[dict] = []
    ctx = StepContext(tokenizer, device, progress, reference=reference, eval_windows=windows, measure=m,
                      artifact_dir=artifact_dir, methods=tuple(s.method for s in exp.steps))
    for i, step in enumerate(exp.steps):
        if step.method == "bnb":
            from .quant.bnb import bnb_layer_records

            layers += bnb_layer_records(model, reference)
            continue
        progress(f"step {i + 1}/{len(exp.steps)}: {step.label()}", 0, 1)
        ctx.step_index = i
        if step.method in MODEL_REPLACING:
            model = STEP_APPLIERS[step.method](model, step, ctx)
        else:
            layers += STEP_APPLIERS[step.method](model, step, ctx)
    sparsity = None
    if any(s.method in ("magnitude", "wanda", "sparsegpt") for s in exp.steps):
        sparsity = _store_sparse(model, layers, progress)
    timings["compress_s"] = time.perf_counter() - t
    saved_model = None
    if exp.save_model and artifact_dir is not None:
        from .checkpoint import save_run_model

        progress("save model", 0, 1)
        t = time.perf_counter()
        saved_model = save_run_model(exp, src, model, tokenizer, info, baseline_bytes, Path(artifact_dir) / "model")
        timings["save_s"] = time.perf_counter() - t

    t = time.perf_counter()
    accuracy = evaluate(model, windows, reference, progress)
    accuracy["corpus"] = m.corpus
    timings["accuracy_s"] = time.perf_counter() - t
    del reference
    gc.collect()

    memory.reset_peak()
    latency = None
    if m.latency:
        t = time.perf_counter()
        prompt = data.prompt_tokens(tokenizer, m.corpus, m.prompt_len)
        latency = measure_latency(model, prompt, m.decode_tokens, m.batch_sizes, m.warmup, m.repeats, progress)
        latency["dtype"] = exp.dtype
        timings["latency_s"] = time.perf_counter() - t
    samples = []
    if m.samples:
        progress("samples", 0, 1)
        samples = sample_generations(model, tokenizer, m.sample_tokens)
    weight_bytes = module_bytes(model)
    mem = {
        "weight_bytes": weight_bytes,
        "baseline_weight_bytes": baseline_bytes,
        "compression": baseline_bytes / weight_bytes if weight_bytes else None,
        "param_count": info["params"],
        "param_count_after": sum(p.numel() for p in model.parameters()),
        "sparsity": sparsity,
        "peak_rss_bytes": memory.peak_rss(),
        "process_base_rss_bytes": base_rss,
        "peak_gpu_bytes": memory.peak_gpu(),
    }
    timings["total_s"] = time.perf_counter() - t_start
    notes = [src.note] if src.note else []
    if any(s.method == "rtn" for s in exp.steps) and device == "cpu":
        notes.append("RTN layers run the reference path here (dequantize, then matmul): memory shrinks, decode does not get faster on CPU.")
    if exp.save_model and artifact_dir is None:
        notes.append("The model was not saved: this run has no artifact directory (in-process use without a store).")
    metrics = {
        "accuracy": accuracy, "memory": mem, "latency": latency, "layers": layers, "samples": samples,
        "calibration": ctx.calibration, "env": environment(device), "timings": timings, "model": info, "notes": notes,
        "saved_model": saved_model, "distill": ctx.distill or None,
    }
    if artifact_dir is not None:
        (Path(artifact_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    progress("done", 1, 1)
    return metrics
