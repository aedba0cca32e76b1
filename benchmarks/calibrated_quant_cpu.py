"""Calibrated quantization on the default model, side by side with llm-compressor on the same CPU.

For each setting: slimlm (`python -m core run --json`, a fresh process) then, where there is an equivalent,
llm-compressor (benchmarks/llmcompressor/run.py in its own venv) on the same float checkpoint, the same
calibration windows (32 x 256 tokens of the Brown calibration split, seed 0) and the same evaluation windows
(16 x 256 tokens of the Brown evaluation split), scored by the same function (core.measure.accuracy.evaluate).
Wall time: slimlm's calibration pass (on windows already drawn; the whole step, which also tokenizes the
raw corpus, is compress_seconds) vs llm-compressor's oneshot call (on pre-tokenized windows). Weight bytes: the quantized linears as stored (codes + scales + zero points).

  bash benchmarks/llmcompressor/setup.sh        # once: the peer's own venv
  .venv/bin/python benchmarks/calibrated_quant_cpu.py [--quick] [--only NAME ...] [--no-peer]

Writes benchmarks/results/calibrated_quant_cpu.json; RESULTS.md quotes it.
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
PEER_PY = ROOT / "benchmarks" / ".venv-llmcompressor" / "bin" / "python"
PEER_RUN = ROOT / "benchmarks" / "llmcompressor" / "run.py"
EXPORT = ROOT / "benchmarks" / "llmcompressor" / "export_windows.py"

# Both sides run with one torch thread: on this 2-core machine, two threads per process slow every op ~10x as
# soon as anything else runs (measured: torch.round on 1536x576, 2.4 ms with 1 thread vs 21 ms with 2 while
# another process was busy), which would make the wall times measure the machine's load, not the methods.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# (setting, slimlm step or None for the baseline, llm-compressor scheme or None, peer flags)
SETTINGS = [  # in order of importance, so that a partial run already answers the main questions
    ("baseline fp32", None, None, []),
    ("RTN int4 g64", "rtn:bits=4,group_size=64", None, []),
    ("GPTQ int4 g64", "gptq:bits=4,group_size=64,act_order=false", "gptq-w4a16-g64", ["--actorder", "none"]),
    ("RTN int3 g64", "rtn:bits=3,group_size=64", None, []),
    ("GPTQ int3 g64 act-order", "gptq:bits=3,group_size=64,act_order=true", "gptq-w3a16-g64", ["--actorder", "static"]),
    ("SmoothQuant W8A8 int8", "w8a8:scheme=int8", "sq-gptq-w8a8", ["--actorder", "static"]),
    ("FP8 W8A8", "w8a8:scheme=fp8", "fp8-dynamic", []),
    ("AWQ int4 g64", "awq:bits=4,group_size=64", "awq-w4a16-g64", []),
    ("RTN int4 per-channel", "rtn:bits=4", None, []),
    ("GPTQ int4 per-channel", "gptq:bits=4,group_size=null,act_order=true", None, []),
    ("RTN int3 per-channel", "rtn:bits=3", None, []),
    ("GPTQ int3 per-channel", "gptq:bits=3,group_size=null,act_order=true", None, []),
]


def ours(step: str | None, quick: bool, store: str) -> dict:
    args = [sys.executable, "-m", "core", "run", "--no-samples", "--no-latency", "--json"]
    if quick:
        args += ["--eval-windows", "2"]
    if step:
        if quick:
            step += ",calibration.windows=4" if not step.startswith("rtn") else ""
        args += ["--step", step]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **THREADS, "SLIMLM_DATA": store})
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    m = json.loads(r.stdout)
    quantized = [x for x in m["layers"] if x.get("bytes") is not None]
    calib = m["calibration"][0] if m["calibration"] else {}
    return {
        "perplexity": m["accuracy"]["perplexity"], "kl_vs_baseline": m["accuracy"]["kl_vs_baseline"],
        "top1_agreement": m["accuracy"]["top1_agreement"],
        "linear_bytes": sum(x["bytes"] for x in quantized) if quantized else None,
        # seconds: the calibration pass (what llm-compressor's oneshot does on pre-tokenized windows); the whole
        # step also draws the windows from the raw corpus (tokenizing it: ~9 s here), in compress_seconds
        "weight_bytes": m["memory"]["weight_bytes"], "seconds": calib.get("seconds", m["timings"]["compress_s"]),
        "compress_seconds": m["timings"]["compress_s"],
        "calibration_peak_bytes": calib.get("peak_bytes"), "calibration_tokens": calib.get("tokens"),
        "warnings": sorted({x["warning"] for x in m["layers"] if x.get("warning")}),
        "env": m["env"],
    }


def peer(scheme: str, flags: list[str], windows: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        r = subprocess.run([str(PEER_PY), str(PEER_RUN), "--windows", str(windows), "--scheme", scheme,
                            "--out", f.name, "--threads", THREADS["OMP_NUM_THREADS"], *flags],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, **THREADS})
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
        m = json.loads(Path(f.name).read_text())
    return {
        "scheme": scheme, "flags": flags, "perplexity": m["perplexity"], "kl_vs_baseline": m["kl_vs_baseline"],
        "top1_agreement": m["top1_agreement"], "linear_bytes": m.get("weight_bytes_linears"),
        "seconds": m["oneshot_seconds"], "versions": m.get("versions"),
    }


def merge(kept: list[dict], rows: list[dict]) -> list[dict]:
    done = {r["setting"] for r in rows}
    order = [n for n, *_ in SETTINGS]
    return sorted([r for r in kept if r["setting"] not in done] + rows, key=lambda r: order.index(r["setting"]))


def write(path: Path, args, env, rows: list[dict]) -> None:
    base = next((r["slimlm"]["perplexity"] for r in rows if r["step"] is None and "error" not in r["slimlm"]), None)
    recovered = {}
    by = {r["setting"]: r["slimlm"] for r in rows}
    for rtn, gptq in (("RTN int3 g64", "GPTQ int3 g64 act-order"), ("RTN int4 g64", "GPTQ int4 g64"),
                      ("RTN int4 per-channel", "GPTQ int4 per-channel"), ("RTN int3 per-channel", "GPTQ int3 per-channel")):
        if base and "perplexity" in by.get(rtn, {}) and "perplexity" in by.get(gptq, {}):
            recovered[f"{gptq} vs {rtn}"] = (by[rtn]["perplexity"] - by[gptq]["perplexity"]) / (by[rtn]["perplexity"] - base)
    out = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([".venv/bin/python benchmarks/calibrated_quant_cpu.py", *sys.argv[1:]]).strip(),
        "model": "smollm2-135m (SmolLM2-135M-Instruct, dequantized from Q4_1 GGUF)",
        "protocol": {"calibration": "Brown calibration split, 32 windows x 256 tokens, seed 0" if not args.quick else "4 windows",
                     "evaluation": "Brown evaluation split, 16 windows x 256 tokens, evenly spaced" if not args.quick else "2 windows"},
        "threads": int(THREADS["OMP_NUM_THREADS"]), "env": env, "baseline_perplexity": base, "gptq_recovered_fraction_of_rtn_increase": recovered,
        "rows": rows,
    }
    path.write_text(json.dumps(out, indent=2) + "\n")


def table(path: Path) -> str:
    """The results file as the markdown table RESULTS.md quotes."""
    data = json.loads(path.read_text())
    base = data["baseline_perplexity"]
    out = ["| setting | slimlm ppl (Δ) | KL | linears MiB | slimlm s | llm-compressor ppl (Δ) | KL | linears MiB | oneshot s | ppl ratio | time ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ppl(r):
        return f"{r['perplexity']:.2f} ({100 * (r['perplexity'] / base - 1):+.1f} %)" if base else f"{r['perplexity']:.2f}"

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.1f}"

    for row in data["rows"]:
        a, b, q = row["slimlm"], row.get("llmcompressor"), row.get("ratio") or {}
        if "error" in a:
            out.append(f"| {row['setting']} | error: {a['error']} |" + " |" * 9)
            continue
        kl = "-" if a["kl_vs_baseline"] is None else f"{a['kl_vs_baseline']:.4f}"
        left = f"| {row['setting']} | {ppl(a)} | {kl} | {mib(a['linear_bytes'])} | {a['seconds']:.1f} |"
        if b and "error" not in b:
            right = (f" {ppl(b)} | {b['kl_vs_baseline']:.4f} | {mib(b['linear_bytes'])} | {b['seconds']:.1f} |"
                     f" {q.get('perplexity', float('nan')):.3f} | {q.get('seconds', float('nan')):.2f} |")
        else:
            right = f" {'error: ' + b['error'] if b else '-'} | - | - | - | - | - |"
        out.append(left + right)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 calibration / 2 evaluation windows: a smoke run")
    ap.add_argument("--only", nargs="*", help="settings to run (names as in SETTINGS)")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1, see THREADS)")
    ap.add_argument("--out", help="result file (default results/calibrated_quant_cpu.json)")
    ap.add_argument("--table", help="print a results file as a markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    peer_ok = not args.no_peer and PEER_PY.exists()
    if not args.no_peer and not peer_ok:
        sys.exit(f"{PEER_PY} is missing: run `bash benchmarks/llmcompressor/setup.sh` (or pass --no-peer)")
    store = tempfile.mkdtemp(prefix="slimlm-bench-")
    windows = Path(store) / "windows.pt"
    if peer_ok:
        subprocess.run([sys.executable, str(EXPORT), str(windows)] + (["--quick"] if args.quick else []),
                       cwd=ROOT, check=True, capture_output=True)
    rows, env = [], None
    path = Path(args.out) if args.out else \
        ROOT / "benchmarks" / "results" / ("calibrated_quant_cpu_quick.json" if args.quick else "calibrated_quant_cpu.json")
    kept = json.loads(path.read_text())["rows"] if args.only and path.exists() else []  # a partial re-run
    for name, step, scheme, flags in SETTINGS:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        row = {"setting": name, "step": step, "slimlm": ours(step, args.quick, store)}
        env = row["slimlm"].pop("env", env)
        print("   slimlm:", json.dumps(row["slimlm"]), flush=True)
        if scheme and peer_ok:
            row["llmcompressor"] = peer(scheme, flags, windows)
            print("   llm-compressor:", json.dumps(row["llmcompressor"]), flush=True)
            a, b = row["slimlm"], row["llmcompressor"]
            if "error" not in a and "error" not in b:
                row["ratio"] = {"perplexity": a["perplexity"] / b["perplexity"], "seconds": a["seconds"] / b["seconds"],
                                "linear_bytes": a["linear_bytes"] / b["linear_bytes"] if b["linear_bytes"] else None}
        rows.append(row)
        write(path, args, env, merge(kept, rows))  # after every setting: a long run interrupted keeps its rows
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
