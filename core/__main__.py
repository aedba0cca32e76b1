"""Headless slimlm: everything the app can do, from a shell, on the same store.

  python -m core setup                         fetch and cache the default model and corpus
  python -m core run [options]                 run one experiment in this process (progress bar)
  python -m core resume ID                     continue a stopped distillation run from its checkpoint
  python -m core list | show ID | delete ID    inspect the store
  python -m core worker ID                     (used by the app) execute a queued run
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from .errors import SlimError


def _bar(stage: str, step: int, total: int) -> None:
    width = 30
    frac = step / total if total else 0.0
    fill = int(frac * width)
    sys.stderr.write(f"\r{stage[:40]:<40} [{'#' * fill}{'.' * (width - fill)}] {step}/{total}   ")
    if total and step >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def summary(run) -> str:
    m = run.metrics
    a, mem, lat = m.get("accuracy", {}), m.get("memory", {}), m.get("latency")
    lines = [f"run {run.id}  {run.label}  [{run.status}]"]
    if run.error:
        lines.append(f"  error: {run.error}")
    if a:
        kl = "" if a.get("kl_vs_baseline") is None else f"  KL vs baseline {a['kl_vs_baseline']:.4f}  top-1 agreement {a['top1_agreement']:.3%}"
        lines.append(f"  perplexity {a['perplexity']:.3f} on {a['tokens']} tokens ({a['windows']} windows x {a['window_len']}, corpus {a.get('corpus')}){kl}")
    if mem:
        lines.append(f"  weights {_fmt_bytes(mem['weight_bytes'])} (baseline {_fmt_bytes(mem['baseline_weight_bytes'])}, {mem['compression']:.2f}x)  peak RSS {_fmt_bytes(mem['peak_rss_bytes'])}")
    if lat:
        tp = ", ".join(f"b{t['batch']}: {t['tokens_per_s']:.1f} tok/s" for t in lat["throughput"])
        lines.append(f"  prefill {lat['prompt_len']} tok: {lat['prefill_ms']['median']:.1f} ms (p90 {lat['prefill_ms']['p90']:.1f})  decode {lat['decode_ms']['median']:.2f} ms/token (p90 {lat['decode_ms']['p90']:.2f})  {tp}  on {lat['device']}")
    for d in m.get("distill") or []:
        t = d.get("train") or {}
        rec = "" if d.get("recovered_fraction") is None else f", recovered {d['recovered_fraction']:.0%} of the gap"
        lines.append(f"  distillation: perplexity {d['perplexity_before']:.3f} -> {d['perplexity_after']:.3f} (teacher {d['teacher_perplexity']:.3f}){rec}; "
                     f"{t.get('steps')} steps, {t.get('tokens')} tokens, {t.get('wall_s', 0):.0f} s on {t.get('device')} x{t.get('world_size', 1)}, stopped: {t.get('stopped')}")
    if saved := m.get("saved_model"):
        lines.append(f"  saved model: {saved['path']} ({_fmt_bytes(saved['bytes'])}); measure it again with: python -m core run --model {shlex.quote(saved['path'])}")
    for note in m.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="SQLite store path (default: $SLIMLM_DATA/slimlm.sqlite)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="fetch and cache the default model and corpus")
    r = sub.add_parser("run", help="run one experiment here and print its metrics")
    r.add_argument("--model", default=None, help="built-in alias, checkpoint dir (also a compressed one saved with --save-model), .gguf file or hub id")
    r.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    r.add_argument("--step", action="append", default=[], help="a step, repeatable for a chain: 'rtn:bits=4,group_size=64,symmetric=false', 'bnb:mode=nf4'")
    r.add_argument("--recipe", help="JSON file with a whole experiment (flags override it)")
    r.add_argument("--name")
    r.add_argument("--corpus", help="'brown' or a UTF-8 text file")
    r.add_argument("--eval-windows", type=int)
    r.add_argument("--window-len", type=int)
    r.add_argument("--no-latency", action="store_true")
    r.add_argument("--no-samples", action="store_true")
    r.add_argument("--save-model", action="store_true", help="save the compressed model into the run's artifacts (<artifacts>/<run id>/model); reload it with --model DIR")
    r.add_argument("--batch-sizes", help="comma-separated, e.g. 1,4,16")
    r.add_argument("--repeats", type=int)
    r.add_argument("--json", action="store_true", help="print the metrics as JSON")
    rs = sub.add_parser("resume", help="continue a failed or cancelled distillation run from its last checkpoint, here")
    rs.add_argument("run_id")
    rs.add_argument("--json", action="store_true")
    sub.add_parser("list", help="list runs")
    s = sub.add_parser("show", help="show one run")
    s.add_argument("run_id")
    s.add_argument("--json", action="store_true")
    d = sub.add_parser("delete", help="delete a run and its artifacts")
    d.add_argument("run_id")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("run_id")
    w.add_argument("--store", dest="worker_store")
    args = p.parse_args(argv)

    try:
        if args.cmd == "setup":
            from .assets import main_setup

            main_setup()
            return 0
        from .store import Store

        store = Store(getattr(args, "worker_store", None) or args.store)
        if args.cmd == "worker":
            from .jobs import execute

            try:
                execute(args.run_id, store)
            except SlimError:
                return 1
            return 0
        if args.cmd == "run":
            return _run(args, store)
        if args.cmd == "resume":
            return _resume(args, store)
        if args.cmd == "list":
            from .jobs import reconcile

            reconcile(store)
            for run in store.list():
                ppl = run.metrics.get("accuracy", {}).get("perplexity")
                print(f"{run.id}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(run.created))}  {run.status:<9}  {'' if ppl is None else f'ppl {ppl:8.3f}'}  {run.label}")
            return 0
        run = store.get(args.run_id)
        if run is None:
            raise SlimError(f"No run with id {args.run_id}")
        if args.cmd == "show":
            print(json.dumps({"experiment": run.experiment.model_dump(), "status": run.status, "error": run.error, "metrics": run.metrics}, indent=2) if args.json else summary(run))
        elif args.cmd == "delete":
            store.delete(args.run_id)
            print(f"deleted {args.run_id}")
        return 0
    except SlimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, store) -> int:
    from .recipe import parse_experiment, parse_step

    data: dict = {}
    if args.recipe:
        try:
            with open(args.recipe) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SlimError(f"Could not read recipe {args.recipe}: {e}") from None
    for key in ("model", "dtype", "device", "name"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.step:
        data["steps"] = [parse_step(s) for s in args.step]
    measure = data.setdefault("measure", {})
    for key, val in (("corpus", args.corpus), ("eval_windows", args.eval_windows), ("window_len", args.window_len), ("repeats", args.repeats)):
        if val is not None:
            measure[key] = val
    if args.no_latency:
        measure["latency"] = False
    if args.no_samples:
        measure["samples"] = False
    if args.save_model:
        data["save_model"] = True
    if args.batch_sizes:
        try:
            measure["batch_sizes"] = [int(b) for b in args.batch_sizes.split(",")]
        except ValueError:
            raise SlimError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    exp = parse_experiment(data)
    run_id = store.create_run(exp)
    print(f"run {run_id}: {exp.label()}  (store {store.path})", file=sys.stderr)
    return _execute_here(run_id, store, args.json)


def _resume(args, store) -> int:
    from .jobs import resume

    resume(args.run_id, store, spawn=False)
    print(f"resuming run {args.run_id}: {store.get(args.run_id).label}", file=sys.stderr)
    return _execute_here(args.run_id, store, args.json)


def _execute_here(run_id: str, store, as_json: bool) -> int:
    """Execute a queued run in this process with a progress bar, then print its metrics."""
    from .jobs import execute

    try:
        execute(run_id, store, echo=_bar)
    except SlimError:
        sys.stderr.write("\n")
        raise
    except KeyboardInterrupt:
        store.set_status_if_active(run_id, "cancelled", "Interrupted from the command line.")
        raise
    run = store.get(run_id)
    print(json.dumps(run.metrics, indent=2) if as_json else summary(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
