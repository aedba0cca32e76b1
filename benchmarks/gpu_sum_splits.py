"""The split-K summing kernel (core/kernels/w4_words.sum_splits) on a GPU: outputs per program (BLOCK) x warps at
the split-K outputs of Llama-3-8B decode layers, against the default rule (sum_block).

  python3 benchmarks/gpu_sum_splits.py --out results.json

Per-call µs inside a CUDA graph over 8 partial buffers (benchmarks/gpu_kernels.graph_time); every output checked
against torch's sum of the partials.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_kernels as gk
import torch
import triton

# (splits, M, N): the GEMV's down at batch 1 (K split 7 ways), the mma kernel's gate/up (4) and down (16) at 4 / 16
CASES = [(7, 1, 4096), (8, 1, 14336), (4, 4, 14336), (4, 16, 14336), (16, 4, 4096), (16, 16, 4096), (8, 16, 4096)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from core.kernels import w4_words

    rows = []
    for split, m, n in CASES:
        ys = [torch.randn(split, m, n, device="cuda") for _ in range(8)]
        ref = ys[0].sum(0)
        r = {"split": split, "M": m, "N": n, "us": {}, "default_block": w4_words.sum_block(split)}
        for block in (128, 256, 512, 1024):
            for nw in (1, 2, 4):
                def call(y, block=block, nw=nw):
                    return w4_words.sum_splits(y, torch.bfloat16, block=block, num_warps=nw)
                torch.testing.assert_close(call(ys[0]).float(), ref, rtol=8e-3, atol=1e-3)
                r["us"][f"BLOCK {block}, {nw} warps"] = gk.graph_time([lambda y=y, call=call: call(y) for y in ys])
        torch.testing.assert_close(w4_words.sum_splits(ys[0], torch.bfloat16).float(), ref, rtol=8e-3, atol=1e-3)
        r["us"]["default (sum_splits)"] = gk.graph_time([lambda y=y: w4_words.sum_splits(y, torch.bfloat16)
                                                         for y in ys])
        best = min(r["us"].items(), key=lambda kv: kv[1])
        r["best"] = best[0]
        rows.append(r)
        print(f"split {split} [{m}, {n}]: default (BLOCK {r['default_block']}) {r['us']['default (sum_splits)']:.2f} "
              f"us, BLOCK 1024 {r['us']['BLOCK 1024, 4 warps']:.2f}, best {best[0]} {best[1]:.2f}", flush=True)
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": triton.__version__,
           "command": "python3 benchmarks/gpu_sum_splits.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
