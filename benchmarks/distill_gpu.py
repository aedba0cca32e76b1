"""Distillation on the default model (issue 5's measurements), through the same pipeline as the app and CLI.

  python benchmarks/distill_gpu.py --which sparse24 --out DIR      SparseGPT 2:4 student, distilled from the baseline
  python benchmarks/distill_gpu.py --which struct25 --out DIR      structured -25 % MLP-channel student
  python benchmarks/distill_gpu.py --which throughput --out DIR    training tokens/s with 1 process vs torchrun 2 (DDP)

Each writes DIR/distill_<which>.json (perplexity before / after on the standard measurement windows, the teacher's,
fraction of the gap recovered, steps, tokens, minutes, card) and copies the training log. Runs on CUDA when present
(any device works; on CPU pass small --steps for a smoke run).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENTS = {
    "sparse24": [{"method": "sparsegpt", "pattern": "2:4"}],
    "struct25": [{"method": "structured", "mlp_sparsity": 0.25}],
}


def experiment(first: list[dict], distill: dict, device: str, eval_windows: int) -> dict:
    return {"model": "smollm2-135m", "device": device, "steps": [*first, {"method": "distill", **distill}],
            "measure": {"eval_windows": eval_windows, "window_len": 256, "latency": False, "samples": False}}


def steady_tokens_per_s(log: list[dict], skip: int = 10) -> float | None:
    """Training tokens/s between optimizer step `skip` and the last one (start-up and the first steps' one-time
    costs excluded), from the live log's cumulative tokens and wall time."""
    train = [r for r in log if r.get("kind") == "train"]
    if len(train) <= skip + 1:
        return None
    a, b = train[skip - 1], train[-1]
    return (b["tokens"] - a["tokens"]) / (b["wall_s"] - a["wall_s"])


def run(exp_dict: dict, keep_log: Path | None) -> dict:
    import torch

    from core.distill.log import read_log
    from core.pipeline import run_experiment
    from core.recipe import parse_experiment

    exp = parse_experiment(exp_dict)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        metrics = run_experiment(exp, lambda *a: None, Path(tmp))
        wall = time.perf_counter() - t
        d = metrics["distill"][0]
        log = read_log(d["log"])
        if keep_log is not None and Path(d["log"]).exists():
            shutil.copy(d["log"], keep_log)
    tr = d["train"]
    return {
        "setting": exp.label(), "experiment": exp.model_dump(),
        "perplexity_before": d["perplexity_before"], "perplexity_after": d["perplexity_after"],
        "teacher_perplexity": d["teacher_perplexity"], "recovered_fraction": d["recovered_fraction"],
        "final_measurement": metrics["accuracy"],
        "steps": tr.get("steps"), "tokens": tr.get("tokens"), "train_minutes": tr.get("wall_s", 0) / 60,
        "tokens_per_s": tr.get("tokens_per_s"), "steady_tokens_per_s": steady_tokens_per_s(log),
        "world_size": tr.get("world_size"), "strategy": tr.get("strategy"), "stopped": tr.get("stopped"),
        "initial_val_ppl": tr.get("initial_val_ppl"), "best_val_ppl": tr.get("best_val_ppl"),
        "restored_best_step": tr.get("restored_best_step"), "device": tr.get("device"),
        "run_wall_minutes": wall / 60, "weight_bytes": metrics["memory"]["weight_bytes"],
        "param_count_after": metrics["memory"]["param_count_after"],
        "torch": torch.__version__,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=[*STUDENTS, "throughput"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", type=float, default=240.0, help="training time budget per student, seconds")
    p.add_argument("--steps", type=int, default=2000, help="max steps (the cosine schedule spans them)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=32)
    p.add_argument("--train-windows", type=int, default=4096)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--throughput-steps", type=int, default=60)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    distill = {"max_steps": args.steps, "time_budget_s": args.budget, "micro_batch": args.micro_batch, "lr": args.lr,
               "warmup_steps": min(50, args.steps), "eval_every": args.eval_every, "val_windows": args.val_windows,
               "checkpoint_every": 10**6, "data": {"windows": args.train_windows}}
    out = {"date": date, "command": " ".join(sys.argv)}
    if args.which in STUDENTS:
        out["result"] = run(experiment(STUDENTS[args.which], distill, args.device, args.eval_windows),
                            args.out / f"distill_{args.which}_log.jsonl")
        r = out["result"]
        print(f"{r['setting']}: ppl {r['perplexity_before']:.2f} -> {r['perplexity_after']:.2f} (teacher "
              f"{r['teacher_perplexity']:.2f}), recovered {r['recovered_fraction']:.1%}, {r['steps']} steps, "
              f"{r['tokens']:,} tokens, {r['train_minutes']:.2f} min on {r['device']}", flush=True)
    else:
        # same per-process micro-batch everywhere (weak scaling: 2 processes train on twice the tokens per step)
        configs = [("in-process", {"nproc": 1}), ("torchrun x1", {"nproc": 1, "launcher": "torchrun"}),
                   ("torchrun x2 DDP", {"nproc": 2}), ("torchrun x2 FSDP2", {"nproc": 2, "strategy": "fsdp"})]
        rows = []
        for name, extra in configs:
            d = dict(distill, max_steps=args.throughput_steps, time_budget_s=None, eval_every=10**6, warmup_steps=5,
                     **extra)
            try:
                rows.append({"config": name, **run(experiment(STUDENTS["struct25"], d, args.device, args.eval_windows), None)})
            except Exception as e:  # record and go on: one failing launcher must not lose the others
                rows.append({"config": name, "error": f"{type(e).__name__}: {e}"})
                print(f"{name}: FAILED {rows[-1]['error'][:300]}", flush=True)
                continue
            r = rows[-1]
            print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s overall, {r['steady_tokens_per_s'] or 0:,.0f} after 10 steps "
                  f"({r['tokens']:,} tokens, {r['train_minutes'] * 60:.1f} s)", flush=True)
            (args.out / "distill_throughput.json").write_text(json.dumps(dict(out, rows=rows), indent=2))
        out["rows"] = rows
        ok = {r["config"]: r for r in rows if "error" not in r}
        for base in ("in-process", "torchrun x1"):
            for key in ("tokens_per_s", "steady_tokens_per_s"):
                if base in ok and "torchrun x2 DDP" in ok and ok[base].get(key) and ok["torchrun x2 DDP"].get(key):
                    ratio = ok["torchrun x2 DDP"][key] / ok[base][key]
                    out[f"ddp2_vs_{base.replace(' ', '_')}_{key}"] = ratio
                    print(f"torchrun x2 DDP vs {base} ({key}): {ratio:.2f}x", flush=True)
    (args.out / f"distill_{args.which}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
