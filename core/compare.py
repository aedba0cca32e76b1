"""Pure helpers behind the app's comparison views (no streamlit): a flat table of runs, the
Pareto frontier, shareable query parameters and the evaluation protocol of a run."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import numpy as np
import pandas as pd

MIB = 2**20

# Metrics offered on the comparison axes; all are "lower is better".
Y_METRICS = {
    "perplexity": "Perplexity",
    "kl_vs_baseline": "KL vs baseline (nats/token)",
    "nll": "NLL (nats/token)",
}
MEMORY_METRICS = {
    "weight_mib": "Weight memory (MiB)",
    "peak_rss_mib": "Peak process RSS (MiB)",
}
LATENCY_METRICS = {
    "decode_ms": "Decode latency, batch 1 (ms/token, median)",
    "decode_ms_p90": "Decode latency, batch 1 (ms/token, p90)",
    "prefill_ms": "Prefill latency (ms, median)",
}
# View options of the Compare page as they travel in a share URL, with their defaults.
VIEW_DEFAULTS = {"y": "perplexity", "mem": "weight_mib", "lat": "decode_ms", "log": False}
_VIEW_CHOICES = {"y": Y_METRICS, "mem": MEMORY_METRICS, "lat": LATENCY_METRICS}


def _get(d, *keys):
    """d[k1][k2]... or None when any level is missing or None."""
    for k in keys:
        if not isinstance(d, Mapping) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _mib(v):
    return None if v is None else v / MIB


def protocol(run) -> dict:
    """How a run's accuracy was measured: only runs with equal protocols have comparable accuracy.
    Prefers what the engine recorded, falls back to the requested settings."""
    acc = run.metrics.get("accuracy") or {}
    m = run.experiment.measure
    return {
        "model": run.experiment.model,
        "corpus": acc.get("corpus") or m.corpus,
        "window_len": acc.get("window_len") or m.window_len,
        "windows": acc.get("windows") or m.eval_windows,
    }


def protocol_key(run) -> tuple:
    p = protocol(run)
    return (p["model"], str(p["corpus"]), int(p["window_len"]), int(p["windows"]))


def runs_frame(runs: Iterable) -> pd.DataFrame:
    """One row per run: identity, settings, status and flattened metrics (NaN where missing)."""
    rows = []
    for r in runs:
        m = r.metrics or {}
        acc, mem, lat = m.get("accuracy") or {}, m.get("memory") or {}, m.get("latency") or {}
        p = protocol(r)
        row = {
            "id": r.id,
            "label": r.label,
            "status": r.status,
            "stage": r.stage,
            "progress": (r.step / r.total) if r.total else None,
            "created": datetime.fromtimestamp(r.created),
            "model": r.experiment.model,
            "dtype": r.experiment.dtype,
            "device": _get(m, "env", "device") or lat.get("device") or r.experiment.device,
            "corpus": p["corpus"],
            "window_len": p["window_len"],
            "windows": p["windows"],
            "tokens": acc.get("tokens"),
            "perplexity": acc.get("perplexity"),
            "nll": acc.get("nll"),
            "kl_vs_baseline": acc.get("kl_vs_baseline"),
            "top1_agreement": acc.get("top1_agreement"),
            "weight_mib": _mib(mem.get("weight_bytes")),
            "baseline_weight_mib": _mib(mem.get("baseline_weight_bytes")),
            "compression": mem.get("compression"),
            "params": mem.get("param_count"),
            "peak_rss_mib": _mib(mem.get("peak_rss_bytes")),
            "peak_gpu_mib": _mib(mem.get("peak_gpu_bytes")),
            "prefill_ms": _get(lat, "prefill_ms", "median"),
            "prefill_ms_p90": _get(lat, "prefill_ms", "p90"),
            "decode_ms": _get(lat, "decode_ms", "median"),
            "decode_ms_p90": _get(lat, "decode_ms", "p90"),
        }
        for t in lat.get("throughput") or []:
            row[f"tokens_per_s_b{t['batch']}"] = t.get("tokens_per_s")
        row["total_s"] = _get(m, "timings", "total_s")
        row["error"] = r.error
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["id", "label", "display"])
    # A unique name per run for legends and column headers (the same setting may run twice).
    dup = df["label"].duplicated(keep=False)
    df.insert(2, "display", df["label"].where(~dup, df["label"] + " · " + df["id"].str[:6]))
    num = [c for c in df.columns if c not in ("id", "label", "display", "status", "stage", "created",
                                                "model", "dtype", "device", "corpus", "error")]
    df[num] = df[num].apply(pd.to_numeric, errors="coerce")
    return df


def pareto_mask(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for rows not dominated by another row (lower x and lower y are better).
    Rows missing x or y are never on the frontier; exact duplicates are both kept."""
    if df.empty or x not in df or y not in df:
        return pd.Series(False, index=df.index, dtype=bool)
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(float)
    valid = ~(np.isnan(xs) | np.isnan(ys))
    # dominated[i, j]: row j is at least as good as row i on both and strictly better on one
    le = (xs[None, :] <= xs[:, None]) & (ys[None, :] <= ys[:, None])
    lt = (xs[None, :] < xs[:, None]) | (ys[None, :] < ys[:, None])
    dominated = (le & lt & valid[None, :]).any(axis=1)
    return pd.Series(valid & ~dominated, index=df.index, dtype=bool)


def share_query(run_ids: Iterable[str], **view) -> dict[str, str]:
    """Query parameters that reproduce a comparison: runs=id1,id2 plus view options."""
    q = {"runs": ",".join(run_ids)}
    for k, v in view.items():
        if v is not None:
            q[k] = ("1" if v else "0") if isinstance(v, bool) else str(v)
    return q


def parse_share_query(params: Mapping) -> tuple[list[str], dict]:
    """Inverse of share_query. Unknown or invalid view values fall back to VIEW_DEFAULTS."""
    def last(v):
        return v[-1] if isinstance(v, (list, tuple)) else v

    raw = params.get("runs") or ""
    parts = raw if isinstance(raw, (list, tuple)) else [raw]
    ids = list(dict.fromkeys(i.strip() for p in parts for i in str(p).split(",") if i.strip()))
    view = dict(VIEW_DEFAULTS)
    for k, default in VIEW_DEFAULTS.items():
        v = last(params.get(k))
        if v is None:
            continue
        if isinstance(default, bool):
            view[k] = str(v).lower() in ("1", "true", "yes", "on")
        elif v in _VIEW_CHOICES.get(k, {v: None}):
            view[k] = v
    return ids, view


def samples_by_prompt(runs: Iterable, names: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """{prompt: {run name: output}} so the same prompt can be shown across runs side by side."""
    out: dict[str, dict[str, str]] = {}
    for r in runs:
        name = (names or {}).get(r.id, r.label)
        for s in (r.metrics or {}).get("samples") or []:
            out.setdefault(s.get("prompt", ""), {})[name] = s.get("output", "")
    return out


BASELINE_ROUNDING = {"gptq": "round to nearest", "awq": "round to nearest", "w8a8": "plain W8A8 (no smoothing, round to nearest)"}


def output_error_frame(layers: list[dict]) -> pd.DataFrame:
    """Per-linear relative output error on the calibration inputs, before (plain rounding) and after the
    calibrated method, in long form (layer, stage, error) for a grouped bar chart; empty when the run's
    layers carry no output errors (round-to-nearest and bitsandbytes runs see no calibration data)."""
    rows = []
    for r in layers:
        after, before = r.get("out_rel_error"), r.get("rtn_out_rel_error")
        if after is None or before is None:
            continue
        method = r.get("method", "")
        rows.append({"layer": r["name"], "stage": f"before: {BASELINE_ROUNDING.get(method, 'round to nearest')}",
                     "error": before})
        rows.append({"layer": r["name"], "stage": f"after: {method.upper() or 'method'}", "error": after})
    return pd.DataFrame(rows, columns=["layer", "stage", "error"])


def distill_frames(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training-loss and held-out-perplexity curves from a distillation log (core.distill.log)."""
    train = pd.DataFrame([r for r in records if r.get("kind") == "train"], columns=["step", "tokens", "wall_s", "loss", "lr"])
    evals = pd.DataFrame([r for r in records if r.get("kind") == "eval"], columns=["step", "tokens", "wall_s", "val_ppl"])
    return train, evals


def gpu_kernels_line(kernels: dict) -> str:
    """One line on what a GPU latency measurement ran (core.measure.latency's `gpu_kernels` record)."""
    parts = []
    if kernels.get("merged_blocks") is not None:
        parts.append(f"{kernels['merged_blocks']} blocks with q/k/v or gate/up merged")
    if kernels.get("fused_modules") is not None:
        parts.append(f"{kernels['fused_modules']} norm / SiLU modules fused")
    if kernels.get("decoder_layers_residual_in_product"):
        parts.append(f"{kernels['decoder_layers_residual_in_product']} decoder layers with the residual adds handed to "
                     "o_proj / down_proj")
    for key, what in (("decode_attention", "decode attention"), ("rotary_and_cache_write", "rotary + cache write")):
        if kernels.get(key):
            parts.append(f"{what}: {kernels[key]}")
    return "GPU kernels: " + "; ".join(parts) if parts else ""
