"""The cost model's decode-step estimate beside measured decode steps (issue 6): reads the decode benchmarks'
JSON (benchmarks/gpu_decode.py output) and prints measured / estimated per configuration for the plain roofline
profile and the profile calibrated to slimlm's kernels. Also reads gpu_decode.py --epilogue-ab output (its "all on"
rows, batch 1).

  python benchmarks/costmodel_check.py [--out results/costmodel_check.json] DECODE_JSON [DECODE_JSON ...]

CUDA-graph rows are compared with the profile calibrated to that loop ("H100 SXM (slimlm kernels, measured)", the
loop the app's latency measurement uses), compiled + graph rows with the compiled-step profile ("... compiled
step"); each profile's per-layer overhead is fitted to its bf16 batch-1 row, and a format's saving from it
(Hardware.overhead_saving_us: int4 at batch 1, fitted to gpu_decode_s12_final.json) to that format's row; rows
marked [fitted] are those kinds, in every file (only the file named in costmodel.py was used for the fit); every
other row is a prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.measure import costmodel as cm  # noqa: E402

SETTINGS = {"bf16": cm.float_setting("bf16"), "w4a16": cm.weight_only(4, 128), "fp8": cm.w8a8("fp8"),
            "w4a16-head": replace(cm.weight_only(4, 128), quantize_lm_head=True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("decode_json", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shape = cm.PRESET_MODELS["Llama-3-8B"]
    roofline = cm.PRESET_HARDWARE["H100 SXM"]
    calibrated = {"cuda_graph": cm.PRESET_HARDWARE["H100 SXM (slimlm kernels, measured)"],
                  "compiled+cuda_graph": cm.PRESET_HARDWARE["H100 SXM (slimlm kernels, compiled step)"]}
    rows = []
    for f in a.decode_json:
        d = json.loads(Path(f).read_text())
        proto = d.get("protocol", {})
        ab = [{**r, "batch": 1, "prompt_len": proto.get("prompt_len"), "new_tokens": proto.get("new_tokens")}
              for r in d.get("epilogue_ab", []) if r["variant"] == "all on"]  # gpu_decode.py --epilogue-ab
        for r in d.get("runs", []) + d.get("compiled", []) + ab:
            if r.get("layers") != shape.layers or r["config"] not in SETTINGS:
                continue
            step_ms = r["batch"] * 1000 / r["decode_tokens_per_s"]
            row = {"file": Path(f).name, "config": r["config"], "batch": r["batch"], "mode": r["mode"],
                   "card": d["env"]["card"], "measured_step_ms": step_ms}
            if r["mode"] not in calibrated:
                continue
            for name, hw in (("roofline", roofline), ("calibrated", calibrated[r["mode"]])):
                e = cm.estimate(shape, SETTINGS[r["config"]], hw, r["batch"], r["prompt_len"], r["new_tokens"])
                row[f"{name}_ms"] = e.decode_ms
                row[f"{name}_ratio"] = step_ms / e.decode_ms
            row["calibrated_profile"] = calibrated[r["mode"]].name
            hw = calibrated[r["mode"]]
            row["fitted"] = (r["config"] == "bf16" and r["batch"] == 1) or any(  # the overhead, or a saving from it
                (f, b) == (cm.kernel_format(SETTINGS[r["config"]]), r["batch"]) for f, b, _ in hw.overhead_saving_us)
            row["within_25pct"] = abs(row["calibrated_ms"] - step_ms) / step_ms <= 0.25
            rows.append(row)
    print(f"{'file':32s} {'config':6s} {'B':>3s} {'mode':20s} {'measured':>9s} {'roofline (ratio)':>18s} "
          f"{'calibrated (ratio)':>20s}")
    for r in rows:
        print(f"{r['file']:32s} {r['config']:6s} {r['batch']:3d} {r['mode']:20s} {r['measured_step_ms']:8.2f}m "
              f"{r['roofline_ms']:8.2f} ({r['roofline_ratio']:.2f}) {r['calibrated_ms']:10.2f} ({r['calibrated_ratio']:.2f})"
              + ("  [fitted]" if r["fitted"] else ""))
    if a.out:
        Path(a.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
