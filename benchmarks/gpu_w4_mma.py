"""Tensor-core W4A16 for 2 <= M <= 16 (core/kernels/w4_mma.py) on a GPU: correctness on odd shapes, then per-layer
time at Llama-3-8B shapes against bf16 cuBLAS and the older tensor-core kernel (dispatch path "gemm"), with a small
sweep of the K split and warps per program.

  python3 benchmarks/gpu_w4_mma.py --out results.json [--quick]

Method as benchmarks/gpu_kernels.py (its helpers are imported): per-call µs inside a CUDA graph over weight copies
that together exceed 3x L2; outputs checked against dequantize + matmul in float32 (relative error < 1.2e-2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_kernels as gk  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [("gate/up 14336x4096", 14336, 4096), ("down 4096x14336", 4096, 14336), ("q/o 4096x4096", 4096, 4096),
          ("k/v 1024x4096", 1024, 4096)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="M = 16 only, default config only")
    a = ap.parse_args()
    from core.kernels import w4_mma
    from core.kernels.dispatch import kernel_for, quant_matmul

    t0 = time.time()
    torch.manual_seed(0)
    checks = []
    for n, k, gs, m in [(40, 256, 128, 2), (48, 512, 128, 16), (100, 384, None, 9), (64, 1024, 256, 5),
                        (333, 640, 128, 16), (16, 128, 128, 8)]:
        q = gk.make_qlinear(n, k, 4, gs or k, True, bias=True)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ q.qweight.dequantize(torch.float32).t() + q.bias.float()
        for split in (1, 2):
            if (k // 128) % split:
                continue
            gk.poison()
            y = w4_mma.matmul(x, q.packed, q.scales, q.group_size, n, q.bias, config={"SPLIT_K": split})
            err = gk.rel(y, ref)
            checks.append({"N": n, "K": k, "group": gs, "M": m, "split": split, "rel_err": err, "ok": err < 1.2e-2})
            print(f"check N={n} K={k} g={gs} M={m} split={split}: rel {err:.4f}", flush=True)
        y = quant_matmul(x, q)  # through the dispatcher (QuantLinear's path)
        checks.append({"N": n, "K": k, "group": gs, "M": m, "dispatch": kernel_for(x, q), "rel_err": gk.rel(y, ref)})
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for name, n, k in SHAPES:
        dense = [gk.rand_linear(n, k, seed=s).to(torch.bfloat16) for s in range(gk.n_copies(n * k * 2, l2))]
        q = gk.make_qlinear(n, k, 4, 128, True)
        qs = [q] + [gk.clone_q(q) for _ in range(gk.n_copies(gk.qbytes(q), l2) - 1)]
        for m in ((16,) if a.quick else (2, 4, 8, 16)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ q.qweight.dequantize(torch.float32).t()
            r = {"shape": name, "N": n, "K": k, "M": m, "us": {}, "sweep": {}, "rel_err": {}}
            r["us"]["bf16"] = gk.graph_time([lambda d=d: F.linear(x, d.weight) for d in dense])
            r["us"]["gemm (older kernel)"] = gk.graph_time([lambda qq=qq: quant_matmul(x, qq, path="gemm")
                                                            for qq in qs])
            r["us"]["dispatch"] = gk.graph_time([lambda qq=qq: quant_matmul(x, qq) for qq in qs])
            r["dispatch_path"] = kernel_for(x, q)
            d = w4_mma.default_config(m, n, k)
            cfgs = [{}] if a.quick else [{}] + [{"SPLIT_K": s, "NW": w, "num_warps": w, "TILES": tt}
                                                for s in (2, 4, 8) for w in (4, 8) for tt in (1, 2)
                                                if (k // 128) % s == 0]
            for cfg in cfgs:
                label = "default" if not cfg else f"split{cfg['SPLIT_K']} nw{cfg['NW']} tiles{cfg['TILES']}"

                def call(qq, cfg=cfg):
                    return w4_mma.matmul(x, qq.packed, qq.scales, 128, n, config=cfg or None)
                r["rel_err"][label] = gk.rel(call(qs[0]), ref)
                r["sweep"][label] = gk.graph_time([lambda qq=qq, call=call: call(qq) for qq in qs])
            r["us"]["mma default"] = r["sweep"]["default"]
            r["default_config"] = d
            best = min(r["sweep"].items(), key=lambda kv: kv[1])
            r["us"]["mma best"], r["best_config"] = best[1], best[0]
            rows.append(r)
            bf = r["us"]["bf16"]
            print(f"[{time.time() - t0:6.1f}s] {name} M={m}: " + ", ".join(f"{kk} {v:.1f} ({bf / v:.2f}x)"
                                                                          for kk, v in r["us"].items())
                  + f" | best {r['best_config']} | err {r['rel_err']['default']:.4f}", flush=True)
        del qs, q, dense
        torch.cuda.empty_cache()
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "command": "python3 benchmarks/gpu_w4_mma.py " + " ".join(sys.argv[1:]),
           "checks": checks, "checks_ok": all(c.get("ok", c["rel_err"] < 1.2e-2) for c in checks), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("checks ok:", out["checks_ok"])


if __name__ == "__main__":
    main()
