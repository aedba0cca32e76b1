"""slimlm's decode attention kernel (core/kernels/decode_attention.py) against SDPA on a GPU: a one-token query
of 32 heads over an 8-KV-head cache (Llama-3-8B: R = 4 query heads per KV head, D = 128), as
core.measure.decode's grouped_decode_sdpa calls both, at batch 1 and 16 and cache lengths 192-16384 with the last
third of the slots masked.

  python3 benchmarks/gpu_decode_attention.py --out results.json

Per case: the largest absolute error of SDPA and of the kernel (default splits and forced 1-16) against the same
softmax in float64, and the GPU time per call inside a CUDA graph over 3 K/V copies (benchmarks/gpu_kernels.py's
graph_time). A kernel error above 4x SDPA's fails the run (exit 1).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_kernels as gk
import torch
import torch.nn.functional as F

from core.kernels import decode_attention as da


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows, bad = [], 0
    hk, r, d = 8, 4, 128
    for b in (1, 16):
        for length in (192, 1024, 4096, 16384):
            g = torch.Generator(device="cuda").manual_seed(length + b)
            q = torch.randn(b, hk, r, d, device="cuda", dtype=torch.bfloat16, generator=g)
            ks = [torch.randn(b, hk, length, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
            vs = [torch.randn(b, hk, length, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
            mask = torch.zeros(1, 1, 1, length, device="cuda", dtype=torch.bfloat16)
            mask[..., length - length // 3:] = torch.finfo(torch.bfloat16).min  # slots not written yet
            sc = (q.double() @ ks[0].double().transpose(-1, -2)) * d ** -0.5 + mask.double()
            ref = torch.softmax(sc, -1) @ vs[0].double()
            row = {"batch": b, "length": length, "us": {}, "max_abs_err": {}}
            sd = F.scaled_dot_product_attention(q, ks[0], vs[0], attn_mask=mask)
            row["max_abs_err"]["sdpa"] = float((sd.double() - ref).abs().max())
            def sdpa(k, v, q=q, mask=mask):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            def kernel(k, v, sp, q=q, mask=mask):
                return da.decode_attention(q, k, v, mask, None, splits=sp)

            row["us"]["sdpa"] = gk.graph_time([lambda k=k, v=v: sdpa(k, v) for k, v in zip(ks, vs)])
            for sp in (None, 1, 2, 4, 8, 16):
                lab = "kernel" if sp is None else f"kernel splits={sp}"
                o = da.decode_attention(q, ks[0], vs[0], mask, None, splits=sp)
                err = float((o.double() - ref).abs().max())
                row["max_abs_err"][lab] = err
                bad += err > 4 * row["max_abs_err"]["sdpa"]
                row["us"][lab] = gk.graph_time([lambda k=k, v=v, sp=sp: kernel(k, v, sp) for k, v in zip(ks, vs)])
            row["kernel_vs_sdpa"] = row["us"]["sdpa"] / row["us"]["kernel"]
            gk.log(f"b={b} L={length}: sdpa {row['us']['sdpa']:.1f} us, kernel {row['us']['kernel']:.1f} us "
                   f"({row['kernel_vs_sdpa']:.2f}x); max abs err sdpa {row['max_abs_err']['sdpa']:.2e} kernel "
                   f"{row['max_abs_err']['kernel']:.2e}")
            rows.append(row)
    # float32 (IEEE products, not TF32): the error must stay at float32 level, like SDPA's
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(2, hk, n, d, device="cuda", generator=g) for n in (r, 1000, 1000))
    mask = torch.zeros(1, 1, 1, 1000, device="cuda")
    mask[..., 700:] = torch.finfo(torch.float32).min
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * d ** -0.5 + mask.double(), -1) @ v.double()
    f32 = {"sdpa": float((F.scaled_dot_product_attention(q, k, v, attn_mask=mask).double() - ref).abs().max()),
           "kernel": float((da.decode_attention(q, k, v, mask).double() - ref).abs().max())}
    bad += f32["kernel"] > max(4 * f32["sdpa"], 1e-5)
    gk.log(f"float32 b=2 L=1000: max abs err sdpa {f32['sdpa']:.2e} kernel {f32['kernel']:.2e}")
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "command": "python3 " + " ".join(sys.argv), "errors_over_4x_sdpa": bad, "float32_max_abs_err": f32,
           "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
