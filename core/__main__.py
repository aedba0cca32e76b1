"""Headless slimlm: everything the app can do, from a shell, on the same store.

  python -m core setup                         fetch and cache the default model and corpus
  python -m core run [options]                 run one experiment in this process (progress bar)
  python -m core resume ID                     continue a stopped distillation run from its checkpoint
  python -m core list | show ID | delete ID    inspect the store
  python -m core cost [options]                the Cost model page: roofline estimates of serving a setting
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
    c = sub.add_parser("cost", help="roofline estimate of latency, memory and cost per million tokens (the Cost model page)")
    c.add_argument("--model", default="SmolLM2-135M", help="preset (see --list), built-in alias, checkpoint dir or config.json")
    c.add_argument("--setting", action="append", default=None,
                   help="preset setting name, repeatable (default: bf16, 'int4 g128 (W4A16)', 'FP8 W8A8')")
    c.add_argument("--hardware", default=None, help="preset hardware profile (default: H100 SXM)")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    c.add_argument("--tokens", type=int, default=128, help="generated tokens")
    c.add_argument("--sweep", action="store_true", help="one row per batch size (powers of two) instead of --batch")
    c.add_argument("--measured", action="store_true", help="also the stored runs measured on this kind of device, "
                   "each beside its estimate")
    c.add_argument("--list", action="store_true", help="list the preset models, settings and hardware profiles")
    c.add_argument("--json", action="store_true")
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
        if args.cmd == "cost":
            return _cost(args, store)
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


COST_SETTINGS = ("bf16", "int4 g128 (W4A16)", "FP8 W8A8")  # the Cost model page's default selection


def _cost(args, store) -> int:
    from .measure import costmodel as cm

    if args.list:
        for what, names in (("models", cm.PRESET_MODELS), ("settings", cm.PRESET_SETTINGS),
                            ("hardware", cm.PRESET_HARDWARE)):
            print(f"{what}:\n" + "\n".join(f"  {n}" for n in names))
        return 0

    def preset(kind: str, table: dict, name: str):
        if name not in table:
            raise SlimError(f"Unknown {kind} {name!r}; the presets are: {', '.join(table)} (python -m core cost --list)")
        return table[name]

    hw = preset("hardware profile", cm.PRESET_HARDWARE, args.hardware or cm.DEFAULT_HARDWARE)
    settings = [preset("setting", cm.PRESET_SETTINGS, n) for n in (args.setting or COST_SETTINGS)]
    try:
        shape = cm.shape_for_model(args.model)
    except Exception as e:  # noqa: BLE001  (a missing path, a config transformers cannot read, no network)
        raise SlimError(f"Cannot read the shape of model {args.model!r}: {type(e).__name__}: {e}") from e
    rows, notes = [], []
    try:
        for s in settings:
            if args.sweep:
                rows += cm.sweep_batches(shape, s, hw, args.prompt, args.tokens)
            else:
                e = cm.estimate(shape, s, hw, args.batch, args.prompt, args.tokens)
                rows.append(e.row())
                notes += [n for n in e.notes if n not in notes]
    except ValueError as e:
        raise SlimError(str(e)) from e
    measured = []
    if args.measured:
        def shape_or_none(spec):
            try:
                return cm.shape_for_model(spec)
            except Exception:  # noqa: BLE001  (a run whose checkpoint is gone: left out, as on the page)
                return None

        measured = cm.compare_measured(cm.measured_points(store.list()), hw, shape_or_none)
    if args.json:
        print(json.dumps({"model": shape.name, "hardware": hw.name, "estimates": rows, "notes": notes,
                          "measured": measured}, indent=2, default=str))
        return 0
    print(f"{shape.name} on {hw.name}" + (f" (calibrated: {hw.calibration})" if hw.calibration else "")
          + f"; prompt {args.prompt}, generated {args.tokens}")
    head = f"{'setting':32s} {'batch':>5s} {'decode ms':>10s} {'tok/s':>10s} {'prefill ms':>10s} {'memory':>10s} " \
           f"{'fits':>4s} {'max batch':>9s} {'$/M tok':>8s}  bound"
    print(head)
    for r in rows:
        print(f"{r['setting'][:32]:32s} {r['batch']:5d} {r['decode_ms']:10.3f} {r['tokens_per_s']:10.1f} "
              f"{r['prefill_ms']:10.2f} {r['memory_bytes'] / 2**30:7.2f} GiB {'yes' if r['fits'] else 'no':>4s} "
              f"{r['max_batch']:9d} {r['cost_per_million']:8.3f}  {r['decode_bound']}")
    for n in notes:
        print(f"note: {n}")
    if args.measured:
        if not measured:
            print(f"no stored run was measured on a device matching {hw.name}")
        for m in measured:
            print(f"measured run {m['run_id']} {m['label'][:40]}: batch {m['batch']} decode {m['decode_ms']:.3f} ms "
                  f"vs estimate {m['est_decode_ms']:.3f} ms (ratio {m['decode_ratio']:.2f})")
    return 0


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
