"""FP8 W8A8 prefill on Llama-3-8B shapes (issue 6: "FP8 W8A8 prefill (M >= 2048) >= 1.6x bf16").

  python3 benchmarks/gpu_fp8_prefill.py --out DIR/gpu_fp8_prefill.json

For each shape and M: bf16 F.linear (cuBLAS) against slimlm's FP8Linear forward (bf16 in and out: the per-token
activation quantization kernel, core.kernels.fp8_quant, then torch._scaled_mm with row-wise scales writing bf16),
with fast accumulation (the default, w8a8.FP8_FAST_ACCUM) and without; the quantization kernel and the GEMM alone;
the PyTorch quantization for contrast. Each linear as a decoder layer runs it (as_run_row): with the kernel that
writes its input on both sides, the RMSNorm or SiLU*up, which on the FP8 side writes the codes too (core.fusion).
Then one decoder layer without attention (layer_row: norms, the seven linears, SiLU * up) bf16 vs FP8 vs FP8 with
the quantization fused into the norms and SiLU, and the whole model's prefill (model_rows: Llama-3-8B, random
weights, eager forward) bf16 vs FP8 fused / unfused, both with slimlm's norm and SiLU kernels (and bf16 with
transformers' own for contrast).

Timing: GPU time of a CUDA graph holding --reps calls (inputs rotated over 3 buffers), median of 15 replays,
so Python and launch overheads are out (prefill's kernels are long enough for the host to run ahead: the
"eager" columns, calls enqueued back to back with events between them, show that). Random weights, N(0, 1)
inputs. Correctness on every shape: the fast layer against its reference path (dequantized float32 matmul),
and the kernel's codes and scales against the PyTorch formula bit for bit.
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
TARGET = 1.6


def graph_us(fn, inputs, reps: int) -> float:
    """Median GPU microseconds per call of fn(x) inside a CUDA graph of `reps` calls over the rotated inputs."""
    for x in inputs:  # warm-up: Triton compiles, probes run, cuBLAS picks its kernels
        fn(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(inputs[0])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(inputs[i % len(inputs)])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    del g
    return statistics.median(times)


def eager_us(fn, inputs, calls: int = 40) -> float:
    """Median microseconds between events around each of `calls` calls enqueued back to back (no sync)."""
    for x in inputs:
        fn(x)
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(inputs[i % len(inputs)])
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1000 for a, b in ev)


def fast_accum(on: bool, fn):
    def call(x):
        w8a8.FP8_FAST_ACCUM = on
        try:
            return fn(x)
        finally:
            w8a8.FP8_FAST_ACCUM = True
    return call


def shape_row(name, n, k, m, dev, reps):
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    layer = w8a8.FP8Linear.from_linear(lin).to(dev)
    xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        fast = layer(xs[0])
        layer.fast = False
        ref = layer(xs[0])
        layer.fast = True
        err = float((fast.float() - ref.float()).norm() / ref.float().norm())
        kq, ks = w8a8.quantize_activations_fp8(xs[0])
        pq, ps = w8a8.quantize_per_token_fp8(xs[0])
        exact = bool(torch.equal(kq.view(torch.uint8), w8a8._fp8_reference_given_scale(xs[0], ks).view(torch.uint8)))
        scale_exact = bool(torch.equal(ks, ps))
        us = {"bf16": graph_us(lambda x: F.linear(x, lin.weight), xs, reps),
              "fp8 layer": graph_us(layer, xs, reps),
              "fp8 layer, no fast accumulation": graph_us(fast_accum(False, layer), xs, reps),
              "activation quantization (kernel)": graph_us(w8a8.quantize_activations_fp8, xs, reps),
              "activation quantization (PyTorch)": graph_us(w8a8.quantize_per_token_fp8, xs, reps),
              "scaled_mm only": graph_us(lambda x: w8a8._scaled_mm(kq, ks, layer.qweight, layer.weight_scale,
                                                                   torch.bfloat16), [kq], reps),
              "bf16 eager": eager_us(lambda x: F.linear(x, lin.weight), xs),
              "fp8 layer eager": eager_us(layer, xs)}
    flops = 2 * m * n * k
    return {"shape": name, "M": m, "N": n, "K": k, "us": us, "rel_error_vs_reference": err,
            "kernel_codes_exact_given_scale": exact, "kernel_scale_equals_pytorch": scale_exact,
            "speedup": us["bf16"] / us["fp8 layer"], "speedup_eager": us["bf16 eager"] / us["fp8 layer eager"],
            "speedup_no_fast_accumulation": us["bf16"] / us["fp8 layer, no fast accumulation"],
            "bf16_tflops": flops / us["bf16"] / 1e6, "fp8_layer_tflops": flops / us["fp8 layer"] / 1e6}


AS_RUN = {  # the linears of a decoder layer with the kernel that writes their input, as core.fusion runs them
    "q 4096x4096 after RMSNorm": (4096, 4096, "norm"), "k/v 1024x4096 after RMSNorm": (1024, 4096, "norm"),
    "gate/up 14336x4096 after RMSNorm": (14336, 4096, "norm"), "down 4096x14336 after SiLU*up": (4096, 14336, "silu"),
    "o 4096x4096 after attention": (4096, 4096, None)}


def as_run_row(name, n, k, producer, m, dev, reps):
    """One linear together with the kernel that writes its input in a decoder layer, on both sides: bf16 = slimlm's
    RMSNorm or SiLU*up kernel writing bf16, then F.linear; FP8 = the same kernel writing the per-token codes as well
    (RMSNorm: bf16 output and codes; SiLU*up: codes only), then _scaled_mm on those codes. o_proj's input is the
    attention's output, which nothing quantizes for it: it quantizes its own (the shape_row layer). A norm feeds
    several linears (q, k, v; gate, up) but is charged whole to each, so the ratio is conservative."""
    from core.kernels.fp8_quant import rmsnorm_fp8, silu_mul_fp8

    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    layer = w8a8.FP8Linear.from_linear(lin).to(dev)
    norm_w = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5
    if producer == "silu":  # silu(gate) * up: inputs are [gate | up] of width 2k
        xs = [torch.randn(m, 2 * k, device=dev, dtype=torch.bfloat16) for _ in range(3)]

        def bf16(x):
            return F.linear(silu_mul_fp8(x[:, :k], x[:, k:], quantize=False), lin.weight)

        def fp8(x):
            return layer.forward_quantized(*silu_mul_fp8(x[:, :k], x[:, k:]), (m,), torch.bfloat16)
    elif producer == "norm":
        xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(3)]

        def bf16(x):
            return F.linear(rmsnorm_fp8(x, norm_w, 1e-5, quantize=False)[0], lin.weight)

        def fp8(x):
            y, q, s = rmsnorm_fp8(x, norm_w, 1e-5)
            setattr(y, w8a8.FUSED_CODES, (q, s))
            return layer(y)
    else:
        xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(3)]

        def bf16(x):
            return F.linear(x, lin.weight)
        fp8 = layer
    with torch.no_grad():
        ref = bf16(xs[0]).float()
        err = float((fp8(xs[0]).float() - ref).norm() / ref.norm())
        us = {"bf16": graph_us(bf16, xs, reps), "fp8": graph_us(fp8, xs, reps)}
    return {"shape": name, "as_run": True, "producer": producer, "M": m, "N": n, "K": k, "us": us,
            "rel_error_vs_bf16": err, "speedup": us["bf16"] / us["fp8"]}


def layer_row(m, dev, reps):
    """One Llama-3-8B decoder layer without attention: two RMSNorms, the seven linears in call order and SiLU * up,
    bf16 vs FP8 with each linear quantizing its input vs FP8 with the quantization fused into the norms and the
    SiLU product (core.fusion: q/k/v and gate/up share their norm's codes; o still quantizes the
    attention output). The norms and SiLU run slimlm's kernels in all three (without quantization for the first
    two), so only the quantization differs."""
    from core.kernels.fp8_quant import rmsnorm_fp8, silu_mul_fp8
    from core.fusion import fused_kernels_ok

    h, kv, inter = 4096, 1024, 14336
    specs = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inter, h), "up": (inter, h),
             "down": (h, inter)}
    lins = {n: torch.nn.Linear(i, o, bias=False, device=dev, dtype=torch.bfloat16) for n, (o, i) in specs.items()}
    fp8 = {n: w8a8.FP8Linear.from_linear(lin).to(dev) for n, lin in lins.items()}
    norm_w = [torch.rand(h, device=dev, dtype=torch.bfloat16) + 0.5 for _ in range(2)]
    inputs = [tuple(torch.randn(m, h, device=dev, dtype=torch.bfloat16) for _ in range(3)) for _ in range(2)]

    def run(mods):
        def call(xs):
            x, a, x2 = xs
            y = rmsnorm_fp8(x, norm_w[0], 1e-5, quantize=False)[0]
            mods["q"](y), mods["k"](y), mods["v"](y), mods["o"](a)
            y2 = rmsnorm_fp8(x2, norm_w[1], 1e-5, quantize=False)[0]
            return mods["down"](silu_mul_fp8(mods["gate"](y2), mods["up"](y2), quantize=False))
        return call

    def fused(xs):
        x, a, x2 = xs
        y, q, s = rmsnorm_fp8(x, norm_w[0], 1e-5)
        setattr(y, w8a8.FUSED_CODES, (q, s))
        fp8["q"](y), fp8["k"](y), fp8["v"](y), fp8["o"](a)
        y2, q, s = rmsnorm_fp8(x2, norm_w[1], 1e-5)
        setattr(y2, w8a8.FUSED_CODES, (q, s))
        q, s = silu_mul_fp8(fp8["gate"](y2), fp8["up"](y2))
        return fp8["down"].forward_quantized(q, s, (m,), torch.bfloat16)

    bf = {n: (lambda x, w=lin.weight: F.linear(x, w)) for n, lin in lins.items()}
    with torch.no_grad():
        out_plain, out_fused, again = run(fp8)(inputs[0]), fused(inputs[0]), run(fp8)(inputs[0])
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        err, noise = rel(out_fused, out_plain), rel(again, out_plain)
        n = max(1, reps // 2)
        us = {"bf16": graph_us(run(bf), inputs, n), "fp8": graph_us(run(fp8), inputs, n),
              "fp8 fused": graph_us(fused, inputs, n), "bf16 eager": eager_us(run(bf), inputs, 10),
              "fp8 eager": eager_us(run(fp8), inputs, 10), "fp8 fused eager": eager_us(fused, inputs, 10)}
    return {"shape": "decoder layer without attention (2 norms, 7 linears, SiLU * up)", "M": m, "us": us,
            "fused_kernels_ok": fused_kernels_ok(str(dev)), "fused_vs_unfused_rel_error": err,
            "unfused_run_twice_rel_error": noise,
            "speedup": us["bf16"] / us["fp8 fused"], "speedup_unfused": us["bf16"] / us["fp8"],
            "speedup_eager": us["bf16 eager"] / us["fp8 fused eager"]}


def model_rows(layers, ms, dev, repeats=5):
    """Whole-model prefill: Llama-3-8B shapes with `layers` decoder layers and random weights (gpu_decode.build),
    forward(input_ids [1, M], logits_to_keep=1) timed eagerly with CUDA events (median of `repeats` after a
    warm-up). At M = 2048 the host's Python is part of it: the fused FP8 model took 61.0 ms in one run and 35.5 ms
    in the next on the same card (2026-11-26). Capturing the forward in a CUDA graph was tried and dropped: the
    graphed forward ran slower (bf16 M = 8192: 322 ms against 232 eager) and its logits differed from the eager
    ones, so other kernels ran. bf16 with transformers' own norms and SiLU ("plain"), bf16 with slimlm's norm /
    SiLU kernels (core.fusion, as the latency measurement runs every model on CUDA), then the same model in FP8
    W8A8 with the quantization fused into those kernels, and unfused (transformers' norms, each FP8Linear
    quantizing). The headline ratio compares bf16 and FP8 with the same norm / SiLU kernels. Logit differences of
    a random 32-layer model are large for tiny causes (bf16 with and without the kernels, which differ by an ulp
    here and there, is the noise floor printed beside)."""
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_decode as gd
    from core.fusion import fuse_producers, unfuse

    model, _ = gd.build(types.SimpleNamespace(tiny=False, seed=0), "bf16", layers, dev)
    unfuse(model)  # build installed the kernels; "bf16 plain" runs transformers' own modules
    ids = {m: torch.randint(3, 120000, (1, m), device=dev) for m in ms}

    def time_all():
        out = {}
        for m in ms:
            times = []
            for _ in range(repeats + 1):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                logits = model(input_ids=ids[m], logits_to_keep=1, use_cache=False).logits
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            out[m] = (statistics.median(times[1:]), logits[0, -1].float())
        return out

    with torch.inference_mode():
        res = {"bf16 plain": time_all()}
        fused_modules = fuse_producers(model)
        res["bf16"] = time_all()
        w8a8.quantize_model_w8a8(model, "fp8")
        fuse_producers(model)  # now its norms feed FP8 linears: they write codes too
        res["fp8 fused"] = time_all()
        unfuse(model)
        res["fp8 unfused"] = time_all()
    rows = []
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    for m in ms:
        t = {k: v[m][0] for k, v in res.items()}
        rows.append({"shape": f"Llama-3-8B x{layers} layers, whole prefill", "M": m, "ms": t,
                     "speedup": t["bf16"] / t["fp8 fused"], "speedup_unfused": t["bf16"] / t["fp8 unfused"],
                     "speedup_vs_bf16_plain": t["bf16 plain"] / t["fp8 fused"], "fused_modules": len(fused_modules),
                     "last_logits_rel_error": {
                         "bf16_kernels_vs_bf16_plain (noise floor)": rel(res["bf16"][m][1], res["bf16 plain"][m][1]),
                         "fp8_fused_vs_fp8_unfused": rel(res["fp8 fused"][m][1], res["fp8 unfused"][m][1]),
                         "fp8_vs_bf16": rel(res["fp8 fused"][m][1], res["bf16"][m][1])}})
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ms", default="2048,4096,8192")
    p.add_argument("--reps", type=int, default=10, help="calls per CUDA graph")
    p.add_argument("--model-layers", type=int, default=32, help="decoder layers of the whole-model prefill (0: skip)")
    p.add_argument("--model-ms", default="2048,8192")
    p.add_argument("--model-only", action="store_true", help="only the whole-model prefill rows")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = {"date": time.strftime("%Y-%m-%d"), "card": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "command": " ".join(sys.argv), "scaled_mm_out_dtypes": [str(d) for d in w8a8.scaled_mm_dtypes(str(dev))],
           "fp8_quant_kernel_ok": w8a8.fp8_kernel_ok(str(dev)), "fast_accumulation": w8a8.FP8_FAST_ACCUM, "rows": []}
    ms = [int(v) for v in args.ms.split(",")]

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    for name, (n, k) in ({} if args.model_only else SHAPES).items():
        for m in ms:
            row = shape_row(name, n, k, m, dev, args.reps)
            out["rows"].append(row)
            us = row["us"]
            print(f"{name:20s} M={m:5d}  bf16 {us['bf16']:7.1f} us  fp8 layer {us['fp8 layer']:7.1f} "
                  f"(no fast acc {us['fp8 layer, no fast accumulation']:7.1f}; "
                  f"quant {us['activation quantization (kernel)']:6.1f} + scaled_mm {us['scaled_mm only']:7.1f})  "
                  f"{row['speedup']:.2f}x (eager {row['speedup_eager']:.2f}x)  "
                  f"err {row['rel_error_vs_reference']:.1e}  codes exact {row['kernel_codes_exact_given_scale']}",
                  flush=True)
            save()
            torch.cuda.empty_cache()
    for name, (n, k, producer) in ({} if args.model_only else AS_RUN).items():
        for m in ms:
            row = as_run_row(name, n, k, producer, m, dev, args.reps)
            out["rows"].append(row)
            print(f"as run: {name:34s} M={m:5d}  bf16 {row['us']['bf16']:7.1f} us  fp8 {row['us']['fp8']:7.1f} "
                  f"{row['speedup']:.2f}x  err vs bf16 {row['rel_error_vs_bf16']:.1e}", flush=True)
            save()
            torch.cuda.empty_cache()
    for m in [] if args.model_only else ms:
        row = layer_row(m, dev, args.reps)
        out["rows"].append(row)
        us = row["us"]
        print(f"decoder layer M={m:5d}  bf16 {us['bf16']:7.1f} us  fp8 fused {us['fp8 fused']:7.1f} "
              f"({row['speedup']:.2f}x; unfused {us['fp8']:7.1f}, {row['speedup_unfused']:.2f}x; eager "
              f"{row['speedup_eager']:.2f}x)  fused vs unfused rel err {row['fused_vs_unfused_rel_error']:.1e} "
              f"(unfused twice {row['unfused_run_twice_rel_error']:.1e})",
              flush=True)
        save()
        torch.cuda.empty_cache()
    if args.model_layers:
        for row in model_rows(args.model_layers, [int(v) for v in args.model_ms.split(",")], dev):
            out["rows"].append(row)
            t = row["ms"]
            print(f"{row['shape']} M={row['M']}: bf16 {t['bf16']:.2f} ms (plain {t['bf16 plain']:.2f}), fp8 fused "
                  f"{t['fp8 fused']:.2f} ({row['speedup']:.2f}x), unfused {t['fp8 unfused']:.2f} "
                  f"({row['speedup_unfused']:.2f}x); logits rel err {row['last_logits_rel_error']}", flush=True)
        save()
    per_shape = {}
    for r in out["rows"]:
        per_shape.setdefault(r["shape"], []).append(r["speedup"])
    out["summary"] = {"min_speedup_per_shape_M>=2048": {s: min(v) for s, v in per_shape.items()},
                      f"target_{TARGET}x_met_per_shape": {s: min(v) >= TARGET for s, v in per_shape.items()},
                      "all_codes_exact": all(r.get("kernel_codes_exact_given_scale", True) for r in out["rows"])}
    save()
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
