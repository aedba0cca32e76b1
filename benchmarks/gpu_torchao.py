"""slimlm's W4A16 kernels side by side with torchao's int4 weight-only path, per layer (issue 6: "If torchao's int4
weight-only path can be installed there, time it side by side").

  python3 benchmarks/gpu_torchao.py --out $OUT/gpu_torchao.json [--ms 1,4,16,64,256] [--formats tile_packed_to_4d,plain]

Needs torch (CUDA), triton and torchao (the GPU machine has no torchao and no network: carry its wheel and
`pip install --no-deps` it there, and for torchao's default "plain" / "preshuffled" formats also the kernel
library they call, MSLK; benchmarks/RESULTS.md says which versions ran).

Llama-3-8B shapes, bf16 activations, group size 128, timed exactly as benchmarks/gpu_kernels.py times every
layer (its graph_time: back-to-back calls over weight copies that together exceed L2 threefold, in one CUDA graph,
median over replays): bf16 cuBLAS; slimlm's W4A16 (RTN symmetric g128, core.kernels.dispatch), with and without
programmatic dependent launch (torchao's kernels have none, so "no PDL" is the like-for-like column); torchao's
Int4WeightOnlyConfig(group_size=128) in each packing format that loads:
  - tile_packed_to_4d: tinygemm (torch.ops.aten._weight_int4pack_mm), torchao's int4 path that needs no extra kernels;
  - plain: torchao 0.18's default, MSLK's bf16i4bf16_rowwise (CUTLASS);
  - preshuffled: MSLK's bf16i4bf16_shuffled.
Correctness: each output against the float32 product of x with that method's own dequantized weight (slimlm's
QuantLinear.qweight.dequantize; for torchao, the identity matrix through the layer), and each quantization's
error against its unquantized layer. torchao's quantization is asymmetric (a scale and a zero point per group),
slimlm's here symmetric: the same bytes per weight within 2 %, and the timing does not depend on the values.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_kernels as gk  # puts the repository on sys.path
from gpu_decode import inner_tensors

from core.kernels import pdl
from core.kernels.dispatch import kernel_for, quant_matmul

FORMATS = ("tile_packed_to_4d", "plain", "preshuffled")


def torchao_linears(n, k, fmt, copies):
    """`copies` bf16 nn.Linear(k, n) quantized by torchao's Int4WeightOnlyConfig(128, fmt) (random weights)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    out = []
    for s in range(copies):
        lin = gk.rand_linear(n, k, seed=200 + s).to(torch.bfloat16)
        quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt, set_inductor_config=False))
        out.append(lin)
    return out


def tensor_bytes(t) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (torchao's quantized weights)."""
    return sum(u.numel() * u.element_size() for u in inner_tensors(t))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,4,16,64,256")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--budget-s", type=float, default=400)
    a = ap.parse_args()
    import torchao
    import triton

    dev = torch.device("cuda")
    deadline = time.time() + a.budget_s
    try:
        import mslk
        mslk_version = getattr(mslk, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        mslk_version = f"not loaded: {type(e).__name__}: {str(e)[:200]}"
    out = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": triton.__version__, "torchao": torchao.__version__,
           "mslk": mslk_version, "command": "python3 benchmarks/gpu_torchao.py " + " ".join(sys.argv[1:]),
           "method": "gpu_kernels.graph_time: back-to-back calls over > 3x L2 of weight copies in one CUDA graph",
           "rows": [], "format_errors": {}}
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    ms = [int(v) for v in a.ms.split(",")]
    formats = [f for f in a.formats.split(",") if f]

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))

    for name, (n, k) in gk.SHAPES.items():
        if time.time() > deadline:
            gk.log("budget reached: skipping", name)
            break
        dense = [gk.rand_linear(n, k, seed=s).to(torch.bfloat16) for s in range(gk.n_copies(n * k * 2, l2))]
        q4 = gk.make_qlinear(n, k, 4, 128, True)
        q4s = [q4] + [gk.clone_q(q4) for _ in range(gk.n_copies(gk.qbytes(q4), l2) - 1)]
        ao = {}
        for fmt in formats:
            try:
                lins = torchao_linears(n, k, fmt, 1)
                lins += torchao_linears(n, k, fmt, gk.n_copies(tensor_bytes(lins[0].weight), l2) - 1)
                ao[fmt] = lins
            except Exception as e:  # noqa: BLE001  (a format whose kernel library is missing or refuses the shape)
                out["format_errors"][f"{fmt} {name}"] = f"{type(e).__name__}: {str(e)[:300]}"
                gk.log("torchao", fmt, name, "unavailable:", out["format_errors"][f"{fmt} {name}"][:200])
        ao_dequant = {}  # torchao's tensors have no dequantize(): the identity through the layer gives W^T
        for fmt, lins in ao.items():
            try:
                ao_dequant[fmt] = lins[0](torch.eye(k, device=dev, dtype=torch.bfloat16)).float().t()
            except Exception as e:  # noqa: BLE001
                out["format_errors"][f"{fmt} {name}"] = f"{type(e).__name__}: {str(e)[:300]}"
        ao = {f: v for f, v in ao.items() if f in ao_dequant}
        w_ref = gk.rand_linear(n, k, seed=200).weight.detach().to(torch.bfloat16).float()  # torchao copy 0's source
        q_src = gk.rand_linear(n, k, seed=0).weight.detach().float()  # q4's source
        for m in ms:
            if time.time() > deadline:
                break
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            r = {"shape": name, "N": n, "K": k, "M": m, "us": {}, "rel_err_vs_own_dequant": {},
                 "rel_err_vs_unquantized": {}, "weight_bytes": {"bf16": n * k * 2, "slimlm w4a16": gk.qbytes(q4)}}
            r["us"]["bf16"] = gk.graph_time([lambda d=d, x=x: F.linear(x, d.weight) for d in dense])
            r["slimlm_path"] = kernel_for(x, q4)
            r["us"]["slimlm w4a16"] = gk.graph_time([lambda q=q, x=x: quant_matmul(x, q) for q in q4s])
            pdl.PDL = False
            try:
                r["us"]["slimlm w4a16, no PDL"] = gk.graph_time([lambda q=q, x=x: quant_matmul(x, q) for q in q4s])
            finally:
                pdl.PDL = True
            y = quant_matmul(x, q4)
            dq = q4.qweight.dequantize(torch.float32)
            r["rel_err_vs_own_dequant"]["slimlm w4a16"] = gk.rel(y, x.float() @ dq.t())
            r["rel_err_vs_unquantized"]["slimlm w4a16"] = gk.rel(y, x.float() @ q_src.t())
            for fmt, lins in ao.items():
                key = f"torchao {fmt}"
                try:
                    r["us"][key] = gk.graph_time([lambda lin=lin, x=x: lin(x) for lin in lins])
                    y = lins[0](x)
                    r["rel_err_vs_own_dequant"][key] = gk.rel(y, x.float() @ ao_dequant[fmt].t())
                    r["rel_err_vs_unquantized"][key] = gk.rel(y, x.float() @ w_ref.t())
                    r["weight_bytes"][key] = tensor_bytes(lins[0].weight)
                except Exception as e:  # noqa: BLE001
                    r.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:300]}"
                    r.setdefault("tracebacks", {})[key] = traceback.format_exc()[-1500:]
            base = r["us"]["bf16"]
            r["speedup_vs_bf16"] = {kk: base / v for kk, v in r["us"].items()}
            ao_times = {kk: v for kk, v in r["us"].items() if kk.startswith("torchao")}
            if ao_times:
                best = min(ao_times, key=ao_times.get)
                r["torchao_best"] = best
                r["slimlm_vs_torchao_best"] = {"with PDL": ao_times[best] / r["us"]["slimlm w4a16"],
                                               "no PDL": ao_times[best] / r["us"]["slimlm w4a16, no PDL"]}
            out["rows"].append(r)
            gk.log(f"{name} M={m}: " + ", ".join(f"{kk} {v:.1f}" for kk, v in r["us"].items())
                   + f" | err own {r['rel_err_vs_own_dequant']}")
            save()
        del dense, q4s, ao
        torch.cuda.empty_cache()
    ratios = [r["slimlm_vs_torchao_best"]["no PDL"] for r in out["rows"] if "slimlm_vs_torchao_best" in r]
    out["summary"] = {"slimlm_no_pdl_vs_torchao_best_min": min(ratios, default=None),
                      "slimlm_no_pdl_vs_torchao_best_max": max(ratios, default=None),
                      "max_rel_err_vs_own_dequant": max((v for r in out["rows"]
                                                        for v in r["rel_err_vs_own_dequant"].values()), default=None)}
    save()
    print("\nshape                M    bf16   slimlm (no PDL)   " + "  ".join(f"torchao {f}" for f in formats))
    for r in out["rows"]:
        u = r["us"]
        ratio = r.get("slimlm_vs_torchao_best", {}).get("no PDL", float("nan"))
        print(f"{r['shape']:20s} {r['M']:4d} {u['bf16']:7.1f} {u['slimlm w4a16']:7.1f} "
              f"({u['slimlm w4a16, no PDL']:6.1f}) "
              + "  ".join(f"{u.get('torchao ' + f, float('nan')):10.1f}" for f in formats)
              + f"   slimlm/torchao best (no PDL) {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
