"""FP8 W8A8 prefill per layer on Llama-3-8B shapes (issue 6: "FP8 W8A8 prefill (M >= 2048) >= 1.6x bf16").

  python3 benchmarks/gpu_fp8_prefill.py --out DIR/gpu_fp8_prefill.json

For each shape and M: bf16 F.linear (cuBLAS), slimlm's FP8Linear forward (bf16 in and out, per-token activation
quantization included), the same layer as it was before this change (float32 copy of x, float32 matmul output,
then cast), and torch._scaled_mm alone. CUDA events, median of repeats, inputs rotated over 3 buffers, random
weights. Correctness: the fast layer against its reference path.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.quant import w8a8

SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336),
          "k/v 1024x4096": (1024, 4096)}


def timed(fn, inputs, repeats: int) -> float:
    """Median microseconds of fn(x), cycling through inputs."""
    for x in inputs:
        fn(x)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(inputs[i % len(inputs)])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def old_fp8_layer(layer):
    """The FP8 layer's forward before this change: float32 copy of x, float32 output, cast back."""
    def fwd(x):
        xf = x.float()
        s = w8a8._absmax_scale(xf, w8a8.FP8_MAX)
        xq = (xf / s).clamp_(-w8a8.FP8_MAX, w8a8.FP8_MAX).to(w8a8.FP8)
        return w8a8._scaled_mm(xq, s, layer.qweight, layer.weight_scale, torch.float32).float().to(x.dtype)
    return fwd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ms", default="2048,4096,8192")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = {"date": time.strftime("%Y-%m-%d"), "card": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "command": " ".join(sys.argv), "scaled_mm_out_dtypes": [str(d) for d in w8a8.scaled_mm_dtypes(str(dev))],
           "fp8_quant_kernel_ok": w8a8.fp8_kernel_ok(str(dev)),
           "rows": []}
    for name, (n, k) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        layer = w8a8.FP8Linear.from_linear(lin).to(dev)
        for m in (int(v) for v in args.ms.split(",")):
            xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(3)]
            with torch.no_grad():
                fast = layer(xs[0])
                layer.fast = False
                ref = layer(xs[0])
                layer.fast = True
                err = float((fast.float() - ref.float()).norm() / ref.float().norm())
                kq, ks = w8a8.quantize_activations_fp8(xs[0])
                codes_exact = bool(torch.equal(kq.view(torch.uint8), (xs[0].float() / ks).clamp(
                    -w8a8.FP8_MAX, w8a8.FP8_MAX).to(w8a8.FP8).view(torch.uint8)))
                xq, s = w8a8.quantize_per_token_fp8(xs[0])
                dt = fast.dtype
                us = {"bf16": timed(lambda x: F.linear(x, lin.weight), xs, args.repeats),
                      "fp8 layer": timed(layer, xs, args.repeats),
                      "fp8 layer, PyTorch quantization": timed(
                          lambda x: w8a8.fp8_matmul(*w8a8.quantize_per_token_fp8(x), layer.qweight, layer.weight_scale,
                                                    True, x.dtype), xs, args.repeats),
                      "activation quantization (kernel)": timed(w8a8.quantize_activations_fp8, xs, args.repeats),
                      "activation quantization (PyTorch)": timed(w8a8.quantize_per_token_fp8, xs, args.repeats),
                      "fp8 layer before": timed(old_fp8_layer(layer), xs, args.repeats),
                      "scaled_mm only": timed(lambda x: w8a8._scaled_mm(xq, s, layer.qweight, layer.weight_scale, dt),
                                              [xq], args.repeats)}
            flops = 2 * m * n * k
            row = {"shape": name, "M": m, "N": n, "K": k, "us": us, "out_dtype": str(dt), "rel_error_vs_reference": err,
                   "kernel_codes_exact_given_scale": codes_exact,
                   "speedup_fp8_layer_vs_bf16": us["bf16"] / us["fp8 layer"],
                   "speedup_before_vs_bf16": us["bf16"] / us["fp8 layer before"],
                   "bf16_tflops": flops / us["bf16"] / 1e6, "fp8_layer_tflops": flops / us["fp8 layer"] / 1e6}
            out["rows"].append(row)
            print(f"{name:20s} M={m:5d}  bf16 {us['bf16']:8.1f} us  fp8 layer {us['fp8 layer']:8.1f} "
                  f"(before {us['fp8 layer before']:8.1f})  scaled_mm {us['scaled_mm only']:8.1f}  "
                  f"speedup {row['speedup_fp8_layer_vs_bf16']:.2f}x (before {row['speedup_before_vs_bf16']:.2f}x)  "
                  f"err {err:.1e}  quant kernel {us['activation quantization (kernel)']:.1f} vs "
                  f"{us['activation quantization (PyTorch)']:.1f} us, codes exact {codes_exact}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))

        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
