"""Baseline and weight-quantization figures of the default model on this machine: one setting
after another, each in a fresh `python -m core run` process (so peak memory is that run's alone),
same evaluation windows and latency protocol, with bitsandbytes as the peer: RTN int8 vs
LLM.int8 and RTN int4 vs NF4 as ratios.

  .venv/bin/python benchmarks/default_model_cpu.py [--quick]

Writes benchmarks/results/default_model_cpu.json; RESULTS.md quotes it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "baseline fp32": [],
    "baseline bf16": ["--dtype", "bf16"],
    "RTN int8 per-channel": ["--step", "rtn:bits=8"],
    "RTN int4 g128 (ragged)": ["--step", "rtn:bits=4,group_size=128"],
    "RTN int4 g64 asym": ["--step", "rtn:bits=4,group_size=64,symmetric=false"],
    "RTN int3 g64": ["--step", "rtn:bits=3,group_size=64"],
    "bnb LLM.int8": ["--step", "bnb:mode=int8"],
    "bnb NF4": ["--step", "bnb:mode=nf4"],
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
    common = ["--no-samples", "--json"] + (["--eval-windows", "4", "--repeats", "1", "--batch-sizes", "1,4"] if args.quick else [])
    rows, env, protocol, errors = [], None, None, {}
    store = tempfile.mkdtemp(prefix="slimlm-bench-")
    for name, extra in SETTINGS.items():
        print(f"== {name}", flush=True)
        r = subprocess.run([sys.executable, "-m", "core", "run", *common, *extra], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "SLIMLM_DATA": store})
        if r.returncode != 0:  # e.g. a bitsandbytes mode that does not run on this CPU
            errors[name] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
            print(f"   failed: {errors[name]}", flush=True)
            continue
        m = json.loads(r.stdout)
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
        "command": ".venv/bin/python benchmarks/default_model_cpu.py" + (" --quick" if args.quick else ""),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, dequantized from Q4_1 GGUF)",
        "env": env, "protocol": protocol, "rows": rows, "ratios_vs_peer": ratios, "errors": errors,
    }
    path = Path(__file__).parent / "results" / "default_model_cpu.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
