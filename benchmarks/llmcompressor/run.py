"""llm-compressor as a side-by-side peer of slimlm: same model, same calibration and evaluation
tokens, same GPTQ settings, and slimlm's own accuracy function.

Run with the llm-compressor venv (benchmarks/llmcompressor/setup.sh makes it), after writing the
windows with the project venv (export_windows.py):

  benchmarks/.venv-llmcompressor/bin/python benchmarks/llmcompressor/run.py \
      --windows /tmp/lc_windows.pt --scheme gptq-w4a16-g64 --out /tmp/gptq-w4a16-g64.json

Steps: load the plain float32 checkpoint on CPU; run llm-compressor `oneshot` on it with the
calibration windows as a pre-tokenized datasets.Dataset (timed: wall seconds of the oneshot call
only; peak RSS of the process is reset just before it); check that the model now runs quantized
(weights on the format's grid, activations quantized per token where the scheme says so); load the
unmodified baseline and evaluate both with slimlm's core.measure.accuracy.evaluate; save with
save_compressed=True into a temp dir and sum the safetensors tensor bytes (weight_bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GPTQ_DAMP = 0.01  # slimlm GPTQStep.damp default (llm-compressor's default is also 0.01)
GPTQ_BLOCK = 128  # slimlm GPTQStep.block_size default (same in llm-compressor)
SQ_STRENGTH = 0.5
IGNORE = ["lm_head"]

# name -> (description, builder kind, params)
SCHEMES = {
    "gptq-w4a16-g64": ("GPTQ int4 weights, groups of 64, symmetric; activations fp32", "gptq", dict(bits=4, group=64)),
    "gptq-w3a16-g64": ("GPTQ int3 weights, groups of 64, symmetric (custom config_groups)", "gptq", dict(bits=3, group=64)),
    "gptq-w4a16-ch": ("GPTQ int4 weights, per output channel, symmetric", "gptq", dict(bits=4, group=None)),
    "gptq-w3a16-ch": ("GPTQ int3 weights, per output channel, symmetric", "gptq", dict(bits=3, group=None)),
    "awq-w4a16-g64": ("AWQ (duo scaling, n_grid 20) + RTN int4 weights, groups of 64, symmetric", "awq", dict(symmetric=True)),
    "awq-w4a16-g64-asym": ("AWQ + RTN int4 weights, groups of 64, asymmetric (their W4A16_ASYM example, group 64)", "awq", dict(symmetric=False)),
    "sq-gptq-w8a8": (f"SmoothQuant(strength {SQ_STRENGTH}) + GPTQ W8A8 int8: weights per channel, activations dynamic per token (their W8A8 recipe)", "sq", dict(gptq=True)),
    "sq-rtn-w8a8": (f"SmoothQuant(strength {SQ_STRENGTH}) + QuantizationModifier W8A8 int8 (RTN weights per channel, dynamic per-token activations)", "sq", dict(gptq=False)),
    "fp8-dynamic": ("QuantizationModifier FP8_DYNAMIC: FP8 e4m3 weights per channel, activations dynamic per token (data-free)", "fp8", {}),
}


def _int_weights(bits: int, group: int | None, symmetric: bool = True):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    return QuantizationArgs(
        num_bits=bits,
        type=QuantizationType.INT,
        strategy=QuantizationStrategy.GROUP if group else QuantizationStrategy.CHANNEL,
        group_size=group,
        symmetric=symmetric,
        dynamic=False,
    )


def _config_groups(weights):
    from compressed_tensors.quantization import QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def build_recipe(scheme: str, actorder: str):
    """The list of llm-compressor modifiers for a scheme, and the settings recorded for it."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    desc, kind, p = SCHEMES[scheme]
    act = None if actorder == "none" else actorder
    gptq_settings = {"dampening_frac": GPTQ_DAMP, "block_size": GPTQ_BLOCK, "actorder": actorder}
    if kind == "gptq":
        recipe = [GPTQModifier(config_groups=_config_groups(_int_weights(p["bits"], p["group"])), ignore=IGNORE,
                               dampening_frac=GPTQ_DAMP, block_size=GPTQ_BLOCK, actorder=act)]
        settings = {"bits": p["bits"], "group_size": p["group"], "symmetric": True, **gptq_settings}
    elif kind == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(duo_scaling=True, n_grid=20),
                  QuantizationModifier(config_groups=_config_groups(_int_weights(4, 64, p["symmetric"])), ignore=IGNORE)]
        settings = {"bits": 4, "group_size": 64, "symmetric": p["symmetric"], "duo_scaling": True, "n_grid": 20,
                    "mappings": "inferred from the model (llm-compressor's Llama defaults)"}
    elif kind == "sq":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        sq = SmoothQuantModifier(smoothing_strength=SQ_STRENGTH)
        if p["gptq"]:
            q = GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE, dampening_frac=GPTQ_DAMP,
                             block_size=GPTQ_BLOCK, actorder=act)
            settings = {"smoothing_strength": SQ_STRENGTH, "preset": "W8A8", **gptq_settings}
        else:
            q = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=IGNORE)
            settings = {"smoothing_strength": SQ_STRENGTH, "preset": "W8A8", "weights": "RTN (min-max) per channel"}
        recipe = [sq, q]
    elif kind == "fp8":
        recipe = [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)]
        settings = {"preset": "FP8_DYNAMIC"}
    else:  # pragma: no cover
        raise ValueError(kind)
    settings["ignore"] = IGNORE
    settings["targets"] = "Linear"
    return recipe, desc, settings, kind


# ---------------------------------------------------------------- memory (same method as core/measure/memory.py)

def _reset_peak():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- checks that the model really runs quantized

def _quantized_linears(model):
    import torch

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None]


def _qdq_weight(m):
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    return forward_quantize(m, m.weight.data, "weight", m.quantization_scheme.weights)


def _per_token_qdq(x, a, half_range: bool = True):
    """Reference per-token dynamic symmetric quantize-dequantize of activations.

    int: half_range=True is compressed-tensors' convention (scale = absmax / ((qmax - qmin) / 2) =
    absmax / 127.5 for int8, codes clamped to [-128, 127]); half_range=False is vLLM's per-token int8
    kernel (scale = absmax / 127). fp8 e4m3: scale = absmax / 448 in both."""
    import torch

    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if a.type == "float":
        fmax = torch.finfo(torch.float8_e4m3fn).max
        s = (amax / fmax).clamp(min=torch.finfo(torch.float32).tiny)
        return ((x / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn).float() * s).to(x.dtype)
    qmax, qmin = 2 ** (a.num_bits - 1) - 1, -(2 ** (a.num_bits - 1))
    s = (amax / ((qmax - qmin) / 2 if half_range else qmax)).clamp(min=torch.finfo(torch.float32).eps)
    return (torch.round(x / s).clamp(qmin, qmax) * s).to(x.dtype)


def verify_quantized(model, hidden_states) -> dict:
    """Evidence that the in-memory model computes with quantized weights (and activations)."""
    import torch
    import torch.nn.functional as F

    linears = _quantized_linears(model)
    statuses = sorted({str(getattr(m, "quantization_status", None)) for _, m in linears})
    name, m = linears[0]
    args = m.quantization_scheme.weights
    out = {"quantized_linears": len(linears), "status": statuses, "checked_module": name}
    with torch.no_grad():
        wq = _qdq_weight(m)
        out["weight_stored_equals_qdq"] = bool(torch.equal(wq, m.weight.data))
        out["weight_max_abs_change_by_qdq"] = float((wq - m.weight.data).abs().max())
        # distinct values per quantization group (<= 2**bits for an int grid)
        cols = wq.shape[1]
        g = args.group_size if args.group_size else cols
        groups = wq[:, : (cols // g) * g].reshape(wq.shape[0], -1, g)
        distinct = max(int(torch.unique(groups[r, c]).numel()) for r in range(0, groups.shape[0], 37)
                       for c in range(groups.shape[1]))
        out["max_distinct_values_per_group"] = distinct
        out["grid_levels"] = 2 ** args.num_bits
        x = hidden_states[..., : m.in_features].clone()
        y = m(x)
        y_plain = F.linear(x, wq, m.bias)
        ia = m.quantization_scheme.input_activations
        out["input_activations"] = None if ia is None else {
            "type": str(ia.type), "num_bits": ia.num_bits, "strategy": str(ia.strategy), "dynamic": bool(ia.dynamic)}
        out["forward_vs_unquantized_input_max_abs"] = float((y - y_plain).abs().max())
        if ia is not None:
            y_ref = F.linear(_per_token_qdq(x, ia), wq, m.bias)
            out["forward_vs_reference_per_token_qdq_max_abs"] = float((y - y_ref).abs().max())
            if ia.type == "int":
                y_vllm = F.linear(_per_token_qdq(x, ia, half_range=False), wq, m.bias)
                out["forward_vs_vllm_convention_per_token_qdq_max_abs"] = float((y - y_vllm).abs().max())
            out["activations_quantized"] = out["forward_vs_unquantized_input_max_abs"] > 0 and \
                out["forward_vs_reference_per_token_qdq_max_abs"] < 1e-3 * float(y.abs().max())
        else:
            out["activations_quantized"] = False
    return out


# ---------------------------------------------------------------- weight bytes of the compressed-tensors format

def compressed_weight_bytes(model, tok) -> dict:
    """Save with save_compressed=True and sum the bytes of every tensor in the safetensors files.
    Tied weights are counted once, like slimlm (the saved lm_head, ignored by every scheme, is the
    embedding; if the file holds it separately and it equals embed_tokens, it is not counted twice)."""
    import torch
    from safetensors import safe_open

    res = {"total": 0, "linears": 0, "other": 0, "by_suffix": {}, "format": None, "tensors": 0}
    with tempfile.TemporaryDirectory(prefix="lc_save_") as d:
        model.save_pretrained(d, save_compressed=True)
        cfg = json.loads((Path(d) / "config.json").read_text())
        qc = cfg.get("quantization_config", {})
        res["format"] = qc.get("format")
        res["tie_word_embeddings"] = cfg.get("tie_word_embeddings")
        tensors = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
        emb = tensors.get("model.embed_tokens.weight")
        for k, t in tensors.items():
            if k == "lm_head.weight" and emb is not None and t.shape == emb.shape and torch.equal(t, emb):
                res["lm_head_tied_not_counted"] = True
                continue
            nbytes = t.numel() * t.element_size()
            res["total"] += nbytes
            res["tensors"] += 1
            leaf = k.rsplit(".", 2)
            is_linear = k.endswith(("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")) \
                or (k.endswith(".weight") and any(p in k for p in ("_proj.",)))
            if is_linear:
                res["linears"] += nbytes
                suffix = leaf[-1]
                res["by_suffix"][suffix] = res["by_suffix"].get(suffix, 0) + nbytes
            else:
                res["other"] += nbytes
        sample = next((k for k in tensors if "layers.0.self_attn.q_proj" in k), None)
        res["sample_q_proj"] = {k: [list(tensors[k].shape), str(tensors[k].dtype)]
                                for k in tensors if "layers.0.self_attn.q_proj." in k} if sample else None
    return res


# ---------------------------------------------------------------- main

def cpu_workarounds() -> list[str]:
    """llm-compressor 0.14.0.1 AWQ pins its cached activations (IntermediatesCache.pin_memory) for
    faster host-to-device copies; without an accelerator torch raises 'Cannot access accelerator
    device when none is available'. Pinning only speeds up transfers, so on a CPU-only machine it is
    made a no-op. Returns the workarounds applied (recorded in the result)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    applied = []
    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        applied.append("IntermediatesCache.pin_memory -> no-op (no accelerator; AWQ would raise otherwise)")
    return applied


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", required=True, help=".pt written by export_windows.py")
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--actorder", choices=("none", "static"), default="none",
                   help="GPTQ activation ordering (default none = slimlm's default act_order=False; "
                        "llm-compressor's own default is static)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-save", action="store_true", help="skip the save_compressed weight-bytes step")
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from core.measure.accuracy import evaluate  # slimlm's own metric code (imports only torch)

    workarounds = cpu_workarounds()
    from loguru import logger

    lc_warnings: list[str] = []  # llm-compressor's own warnings (e.g. GPTQ falling back to RTN, skipped mappings)
    logger.add(lambda msg: lc_warnings.append(str(msg.record["message"])[:300])
               if msg.record["level"].name in ("WARNING", "ERROR", "CRITICAL") else None, level="WARNING")

    w = torch.load(a.windows, weights_only=True)
    calib, evalw, location = w["calibration"], w["eval"], w["location"]
    n_cal, seq = calib.shape
    recipe, desc, settings, kind = build_recipe(a.scheme, a.actorder)

    tok = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})

    _reset_peak()
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, max_seq_length=seq,
            num_calibration_samples=n_cal, shuffle_calibration_samples=False, batch_size=1)
    oneshot_s = time.perf_counter() - t0
    peak_oneshot = _peak_rss_mib()
    model.eval()

    with torch.no_grad():
        h = model.model.embed_tokens(evalw[:1, :64])  # real hidden states of the right width for the check
        h = model.model.layers[0].input_layernorm(h)
    check = verify_quantized(model, h)

    baseline = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    with torch.no_grad():
        l_q = model(evalw[:1], use_cache=False).logits
        l_b = baseline(evalw[:1], use_cache=False).logits
    check["logits_max_abs_diff_vs_baseline"] = float((l_q - l_b).abs().max())
    t1 = time.perf_counter()
    acc = evaluate(model, evalw, reference=baseline)
    base_acc = evaluate(baseline, evalw)
    eval_s = time.perf_counter() - t1
    del baseline

    wb = None
    if not a.no_save:
        try:
            wb = compressed_weight_bytes(model, tok)
        except Exception as e:  # noqa: BLE001
            wb = {"error": f"{type(e).__name__}: {e}"}

    result = {
        "scheme": a.scheme,
        "description": desc,
        "settings": settings,
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "model_location": location,
        "windows": w.get("meta"),
        "oneshot_seconds": oneshot_s,
        "peak_rss_mib": peak_oneshot,
        "peak_rss_note": "VmHWM reset right before oneshot, read right after it (only the model being compressed is loaded then)",
        "peak_rss_mib_process": _peak_rss_mib(),
        "perplexity": acc["perplexity"],
        "kl_vs_baseline": acc["kl_vs_baseline"],
        "top1_agreement": acc["top1_agreement"],
        "baseline_perplexity": base_acc["perplexity"],
        "tokens": acc["tokens"],
        "eval_seconds": eval_s,
        "weight_bytes": None if wb is None or "total" not in wb else wb["total"],
        "weight_bytes_linears": None if wb is None or "linears" not in wb else wb["linears"],
        "weight_bytes_detail": wb,
        "quantization_check": check,
        "workarounds": workarounds,
        "llmcompressor_warnings": sorted({w for w in lc_warnings if "No accelerator available" not in w
                                          and "tokenizer parallelism" not in w}),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("scheme", "oneshot_seconds", "peak_rss_mib", "perplexity",
                                              "kl_vs_baseline", "top1_agreement", "weight_bytes")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
