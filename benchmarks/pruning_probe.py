"""Pruning on the default model (issue 4), in one process, same windows for every setting:
magnitude / Wanda / SparseGPT at 50 % unstructured and 2:4, Wanda+OWL at 50 %, structured removal of 25 % of
MLP channels and of 4 decoder layers.

  .venv/bin/python benchmarks/pruning_probe.py [--quick] [--only NAME ...] [--no-latency]
  .venv/bin/python benchmarks/pruning_probe.py --latency-rounds 5   # CPU latency, settings interleaved
  python benchmarks/pruning_probe.py --semi-structured OUT.json   # on a CUDA GPU: 2:4 layer speed vs dense

Per setting: perplexity, KL vs the float32 baseline and top-1 agreement (16 eval windows x 256 tokens of the
Brown evaluation split), weight bytes as stored (unstructured: after compress_sparse, bitmask or N:M format;
structured: the smaller dense model), parameter count (unstructured: dense count, plus nonzero_params),
compression seconds, and (unless --no-latency)
prefill / decode-at-batch-1 latency on the reference path. Calibration: 32 windows x 256 tokens, seed 0.
Writes benchmarks/results/pruning_probe.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import data, models
from core.measure.accuracy import evaluate
from core.measure.env import environment
from core.measure.latency import measure_latency
from core.prune.sparse import compress_sparse
from core.prune.structured import param_count, structured_prune
from core.prune.unstructured import prune_model
from core.quant.memory_accounting import module_bytes


def _u(method, pattern="unstructured", **kw):
    return ("unstructured", SimpleNamespace(method=method, sparsity=0.5, pattern=pattern, skip=["lm_head"], **kw))


SETTINGS = {
    "magnitude 50%": _u("magnitude"),
    "wanda 50%": _u("wanda"),
    "sparsegpt 50%": _u("sparsegpt"),
    "magnitude 2:4": _u("magnitude", "2:4"),
    "wanda 2:4": _u("wanda", "2:4"),
    "sparsegpt 2:4": _u("sparsegpt", "2:4"),
    "wanda 50% + OWL": _u("wanda", owl=True),
    "structured MLP -25%": ("structured", SimpleNamespace(mlp_sparsity=0.25)),
    "structured -4 layers": ("structured", SimpleNamespace(remove_layers=4)),
}


LLAMA3_8B = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
             "down_proj": (4096, 14336)}


def semi_structured_probe(out: str, batches=(1, 4, 16, 32, 64), repeats: int = 20, inner: int = 20) -> None:
    """CUDA: 2:4 SparseLinear (torch semi-structured, cuSPARSELt and CUTLASS backends) vs dense fp16 F.linear on
    Llama-3-8B layer shapes with random weights: checks the fast path against the reference and reports the
    layer-level time per call (eager, dispatch included: `inner` back-to-back calls between CUDA events,
    median over `repeats`) and the speedup."""
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor

    from core.prune.masks import magnitude_scores, nm_mask
    from core.prune.sparse import SparseLinear

    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []

    def timed(fn):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(inner):
                fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / inner)
        return sorted(ts)[len(ts) // 2]

    for name, (o, i) in LLAMA3_8B.items():
        lin = torch.nn.Linear(i, o, bias=False, device=dev, dtype=torch.float16)
        with torch.no_grad():
            lin.weight.mul_(nm_mask(magnitude_scores(lin.weight), 2, 4))
        fast = {}
        for backend, cutlass in (("cusparselt", False), ("cutlass", True)):
            SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
            try:
                fast[backend] = SparseLinear.from_linear(lin, "semi_structured")
                fast[backend](torch.randn(8, i, device=dev, dtype=torch.float16))
            except Exception as e:  # noqa: BLE001 (a backend this build or GPU lacks: CUTLASS is sm_8x only)
                fast.pop(backend, None)
                print(f"{backend}: {type(e).__name__}: {e}", flush=True)
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        ref = SparseLinear.from_linear(lin, "nm", 2, 4)
        x = torch.randn(64, i, device=dev, dtype=torch.float16)
        y = F.linear(x, lin.weight)
        assert torch.equal(ref(x), y)
        errs = {k: ((m(x) - y).abs().max() / y.abs().max()).item() for k, m in fast.items()}
        with torch.no_grad():
            for b in batches:
                xb = x[:b].contiguous()
                row = {"layer": name, "shape": [o, i], "batch": b, "dense_ms": timed(lambda xb=xb, w=lin.weight: F.linear(xb, w)),
                       "reference_nm_ms": timed(lambda xb=xb, ref=ref: ref(xb))}
                for k, m in fast.items():
                    row[f"{k}_ms"] = timed(lambda m=m, xb=xb: m(xb))
                    row[f"{k}_speedup"] = row["dense_ms"] / row[f"{k}_ms"]
                    row[f"{k}_max_rel_err"] = errs[k]
                row.update(dense_bytes=module_bytes(lin), sparse_bytes={k: module_bytes(m) for k, m in fast.items()},
                           nm_bytes=module_bytes(ref))
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "dtype": "float16", "weights": "random, 2:4 by magnitude",
           "timing": f"CUDA events around {inner} back-to-back eager calls, 5 warm-up, median of {repeats}",
           "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))


def latency_rounds(rounds: int, out: str) -> None:
    """Decode / prefill latency of the dense baseline, the structured settings and the two sparse storage formats,
    measured interleaved (A, B, C, ... then again, `rounds` times) in one process, so background load hits every
    setting alike. Sparse rows use magnitude masks (the storage format, not the method, sets the speed)."""
    import statistics

    src = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(src)
    base = models.load_model(src)
    cal = data.calibration_windows(tok, "brown", 256, 32, 0)
    prompt = data.prompt_tokens(tok, "brown", 128)
    variants = {"baseline fp32": base}
    for name, step in (("structured MLP -25%", SimpleNamespace(mlp_sparsity=0.25)),
                       ("structured -4 layers", SimpleNamespace(remove_layers=4))):
        variants[name] = copy.deepcopy(base)
        structured_prune(variants[name], step, cal)
    for name, pattern in (("sparse 50% bitmask", "unstructured"), ("sparse 2:4 compact", "2:4")):
        variants[name] = copy.deepcopy(base)
        prune_model(variants[name], SimpleNamespace(method="magnitude", sparsity=0.5, pattern=pattern,
                                                    skip=["lm_head"]), None)
        compress_sparse(variants[name], skip=["lm_head"])
    res = {n: {"decode_ms": [], "prefill_ms": []} for n in variants}
    for r in range(rounds):
        for name, model in variants.items():
            lat = measure_latency(model, prompt, 16, [1], 1, 3)
            res[name]["decode_ms"].append(lat["decode_ms"]["median"])
            res[name]["prefill_ms"].append(lat["prefill_ms"]["median"])
            print(f"round {r}: {name}: decode {lat['decode_ms']['median']:.1f} ms, "
                  f"prefill {lat['prefill_ms']['median']:.0f} ms", flush=True)
    rows = []
    b = statistics.median(res["baseline fp32"]["decode_ms"])
    for name, v in res.items():
        d = statistics.median(v["decode_ms"])
        rows.append({"setting": name, "decode_ms_median_of_rounds": d, "decode_vs_baseline": d / b,
                     "prefill_ms_median_of_rounds": statistics.median(v["prefill_ms"]),
                     "params": param_count(variants[name]), "weight_bytes": module_bytes(variants[name]), **v})
        print(f"| {name} | {d:.1f} | {d / b:.2f}x | {rows[-1]['prefill_ms_median_of_rounds']:.0f} |")
    Path(out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "env": environment("cpu"),
                                     "protocol": f"{rounds} interleaved rounds; each: prompt 128, decode 16 tokens "
                                                 "at batch 1, warmup 1, repeats 3, median", "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--semi-structured", metavar="OUT_JSON",
                    help="CUDA only: 2:4 semi-structured layer speed vs dense (Llama-3-8B shapes), then exit")
    ap.add_argument("--quick", action="store_true", help="4 eval windows, 8 calibration windows")
    ap.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--latency-rounds", type=int, metavar="N",
                    help="only latency: baseline, structured and sparse formats interleaved N times, then exit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pruning_probe.json"))
    args = ap.parse_args()
    if args.latency_rounds:
        latency_rounds(args.latency_rounds, str(ROOT / "benchmarks/results/pruning_latency_cpu.json"))
        return
    if args.semi_structured:
        semi_structured_probe(args.semi_structured)
        return
    n_eval, n_cal = (4, 8) if args.quick else (16, 32)
    src = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(src)
    base = models.load_model(src)
    cal = data.calibration_windows(tok, "brown", 256, n_cal, 0)
    ev = data.eval_windows(tok, "brown", 256, n_eval)
    prompt = data.prompt_tokens(tok, "brown", 128)

    def latency(model):
        if args.no_latency:
            return {}
        lat = measure_latency(model, prompt, 16, [1], 1, 3)
        return {"prefill_ms": lat["prefill_ms"]["median"], "decode_ms": lat["decode_ms"]["median"],
                "decode_ms_p90": lat["decode_ms"]["p90"]}

    rows = []
    t = time.perf_counter()
    acc = evaluate(base, ev)
    rows.append({"setting": "baseline fp32", "perplexity": acc["perplexity"], "kl_vs_baseline": None,
                 "top1_agreement": None, "weight_bytes": module_bytes(base), "params": param_count(base),
                 "compress_s": 0.0, **latency(base)})
    print(f"baseline: ppl {acc['perplexity']:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
    for name, (kind, step) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        model = copy.deepcopy(base)
        t = time.perf_counter()
        extra = {}
        params = None
        if kind == "unstructured":
            # magnitude needs no calibration pass (and its error estimate is not reported here)
            recs = prune_model(model, step, None if step.method == "magnitude" and not getattr(step, "owl", False)
                               else cal, "cpu")
            compress_s = time.perf_counter() - t
            acc = evaluate(model, ev, base)  # float masked model (same numbers as the compressed one)
            params = param_count(model)
            nonzero = sum(int((p != 0).sum()) for p in model.parameters())
            sparse = compress_sparse(model, skip=step.skip)
            extra = {"achieved_sparsity": recs.summary["achieved_sparsity"], "nonzero_params": nonzero,
                     "formats": sorted({r["format"] for r in sparse}),
                     "mean_out_rel_error": None if recs[0]["out_rel_error"] is None else
                     sum(r["out_rel_error"] for r in recs) / len(recs)}
            if "layer_sparsity" in recs.summary:
                ls = recs.summary["layer_sparsity"]
                extra["owl_layer_sparsity_range"] = [min(ls), max(ls)]
        else:
            recs = structured_prune(model, step, cal, "cpu")
            compress_s = time.perf_counter() - t
            acc = evaluate(model, ev, base)
            extra = {"removed_layers": recs.stats["removed_layers"],
                     "intermediate_size": recs.stats["intermediate_size"]}
        row = {"setting": name, "perplexity": acc["perplexity"], "kl_vs_baseline": acc["kl_vs_baseline"],
               "top1_agreement": acc["top1_agreement"], "weight_bytes": module_bytes(model),
               "params": params or param_count(model), "compress_s": compress_s, **latency(model), **extra}
        rows.append(row)
        print(f"{name}: ppl {row['perplexity']:.2f} KL {row['kl_vs_baseline']:.3f} "
              f"{row['weight_bytes'] / 2**20:.1f} MiB, compress {compress_s:.0f} s, "
              f"decode {row.get('decode_ms', float('nan')):.1f} ms ({time.perf_counter() - t:.0f} s total)", flush=True)
        del model
    out = {"date": datetime.date.today().isoformat(), "command": "benchmarks/pruning_probe.py" + (" --quick" * args.quick),
           "model": "smollm2-135m", "env": environment("cpu"),
           "protocol": {"eval_windows": n_eval, "window_len": 256, "calibration_windows": n_cal,
                        "calibration_seed": 0, "latency": None if args.no_latency else
                        "prompt 128, decode 16 tokens at batch 1, warmup 1, repeats 3, median"},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| setting | ppl | KL | top-1 | weights MiB | params M | compress s | decode ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kl = "-" if r["kl_vs_baseline"] is None else f"{r['kl_vs_baseline']:.3f}"
        t1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
        print(f"| {r['setting']} | {r['perplexity']:.2f} | {kl} | {t1} | {r['weight_bytes'] / 2**20:.1f} | "
              f"{r['params'] / 1e6:.1f} | {r['compress_s']:.0f} | {r.get('decode_ms', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
