"""Baseline and weight-quantization figures of the default model on this machine, one process,
one setting after another (same evaluation windows, same latency protocol), with bitsandbytes as
the peer: RTN int8 vs LLM.int8 and RTN int4 vs NF4 as ratios.

  .venv/bin/python benchmarks/default_model_cpu.py [--quick]

Writes benchmarks/results/default_model_cpu.json; RESULTS.md quotes it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import SlimError  # noqa: E402
from core.pipeline import run_experiment  # noqa: E402
from core.recipe import parse_experiment  # noqa: E402

SETTINGS = {
    "baseline fp32": [],
    "baseline bf16": "bf16",
    "RTN int8 per-channel": [{"method": "rtn", "bits": 8}],
    "RTN int4 g128 (ragged)": [{"method": "rtn", "bits": 4, "group_size": 128}],
    "RTN int4 g64 asym": [{"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}],
    "RTN int3 g64": [{"method": "rtn", "bits": 3, "group_size": 64}],
    "bnb LLM.int8": [{"method": "bnb", "mode": "int8"}],
    "bnb NF4": [{"method": "bnb", "mode": "nf4"}],
}
PEERS = [("RTN int8 per-channel", "bnb LLM.int8"), ("RTN int4 g64 asym", "bnb NF4")]


def row(name: str, m: dict) -> dict:
    a, mem, lat = m["accuracy"], m["memory"], m["latency"]
    return {
        "setting": name,
        "perplexity": a["perplexity"], "kl_vs_baseline": a["kl_vs_baseline"], "top1_agreement": a["top1_agreement"],
        "weight_mib": mem["weight_bytes"] / 2**20, "peak_rss_mib": mem["peak_rss_bytes"] / 2**20,
        "prefill_ms": lat["prefill_ms"]["median"], "decode_ms": lat["decode_ms"]["median"],
        "decode_ms_p90": lat["decode_ms"]["p90"],
        "tokens_per_s": {t["batch"]: t["tokens_per_s"] for t in lat["throughput"]},
        "compress_s": m["timings"]["compress_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 windows, 1 repeat: a smoke run")
    args = ap.parse_args()
    measure = {"samples": False}
    if args.quick:
        measure |= {"eval_windows": 4, "repeats": 1, "warmup": 0, "batch_sizes": [1, 4]}
    rows, env, protocol, errors = [], None, None, {}
    for name, steps in SETTINGS.items():
        dtype = steps if isinstance(steps, str) else "fp32"
        exp = parse_experiment({"dtype": dtype, "steps": [] if isinstance(steps, str) else steps, "measure": measure})
        print(f"== {name}", flush=True)
        try:
            m = run_experiment(exp)
        except SlimError as e:  # e.g. a bitsandbytes mode that does not run on this CPU
            errors[name] = str(e)
            print(f"   skipped: {e}", flush=True)
            continue
        rows.append(row(name, m))
        env = m["env"]
        protocol = {k: m["accuracy"][k] for k in ("corpus", "windows", "window_len", "tokens")} | {
            "prompt_len": m["latency"]["prompt_len"], "decode_tokens": m["latency"]["decode_tokens"],
            "warmup": m["latency"]["warmup"], "repeats": m["latency"]["repeats"]}
        print(json.dumps(rows[-1]), flush=True)
    by = {r["setting"]: r for r in rows}
    ratios = [
        {"ours": a, "peer": b,
         "perplexity_ratio": by[a]["perplexity"] / by[b]["perplexity"],
         "weight_bytes_ratio": by[a]["weight_mib"] / by[b]["weight_mib"],
         "decode_ms_ratio": by[a]["decode_ms"] / by[b]["decode_ms"]}
        for a, b in PEERS if a in by and b in by
    ]
    out = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/default_model_cpu.py" + (" --quick" if args.quick else ""),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, dequantized from Q4_1 GGUF)",
        "env": env, "protocol": protocol, "rows": rows, "ratios_vs_peer": ratios, "errors": errors,
    }
    path = Path(__file__).parent / "results" / "default_model_cpu.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
