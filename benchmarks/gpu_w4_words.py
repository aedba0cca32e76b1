"""Config sweep for the word-reading 4-bit kernels (core/kernels/w4_words.py) on a GPU, against bf16 cuBLAS and
the older kernels (core/kernels/w4a16.py, what the dispatcher ran before), at Llama-3-8B shapes.

  python benchmarks/gpu_w4_words.py --out results.json [--budget-s 300] [--ms 1,16]

Same method as benchmarks/gpu_kernels.py (its helpers are imported): per-call µs inside a CUDA graph over weight
copies that together exceed 3x L2, so weights come from HBM; every config's output is checked against
dequantize + matmul in float32 (relative error < 1.2e-2) and a config that fails is not ranked.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_kernels as gk  # noqa: E402  (sets DEV / DRY from sys.argv)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def gemv_configs(full):
    out = []
    for bn, bkw, w, st in itertools.product((8, 16, 32, 64), (32, 64, 128), (2, 4, 8), (1, 2)):
        per_thread = bn * bkw / (32 * w)
        if 4 <= per_thread <= 32:
            out.append({"BN": bn, "BKW": bkw, "num_warps": w, "num_stages": st})
    return out if full else out[:3]


def dot_configs(m, full):
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    out = []
    for bn, bkw, w, st in itertools.product((32, 64, 128), (16, 32, 64), (4, 8), (2, 3, 4)):
        if bn * bkw <= 4096 and not (w == 8 and bn < 64):
            out.append({"BM": bm, "BN": bn, "BKW": bkw, "num_warps": w, "num_stages": st})
    return out if full else out[:3]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--splits", default="auto,1,4")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-dot", action="store_true", help="time only the CUDA-core GEMV (M = 1)")
    ap.add_argument("--dry-cpu", action="store_true")
    a = ap.parse_args()
    from core.kernels import w4_words
    from core.kernels.dispatch import quant_matmul

    deadline = time.time() + a.budget_s
    ceil = gk.ceilings()
    gk.log("ceilings", ceil)
    l2 = 1 << 16 if gk.DRY else torch.cuda.get_device_properties(0).L2_cache_size
    ms = [int(v) for v in a.ms.split(",")]
    splits = [None if s == "auto" else int(s) for s in a.splits.split(",")]
    rows = []
    order = ["gate/up 14336x4096", "down 4096x14336", "q/o 4096x4096", "k/v 1024x4096"]
    shapes = sorted(gk.SHAPES.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else -1)
    for name, (n, k) in shapes:
        dense = [gk.rand_linear(n, k, seed=s).to(torch.bfloat16) for s in range(gk.n_copies(n * k * 2, l2))]
        for sym in (True, False):
            q = gk.make_qlinear(n, k, 4, 128, sym)
            qs = [q] + [gk.clone_q(q) for _ in range(gk.n_copies(gk.qbytes(q), l2) - 1)]
            oracle = q.qweight.dequantize(torch.float32)
            for m in ms:
                x = torch.randn(m, k, device=gk.DEV, dtype=torch.bfloat16)
                ref = x.float() @ oracle.t()
                r = {"shape": name, "N": n, "K": k, "M": m, "symmetric": sym, "weight_bytes": gk.qbytes(q),
                     "us": {}, "sweep": {}, "errors": {}}
                if sym:
                    r["us"]["bf16"] = gk.graph_time([lambda d=d: F.linear(x, d.weight) for d in dense])
                r["us"]["old dispatch"] = gk.graph_time([lambda qq=qq: quant_matmul(x, qq) for qq in qs])
                cands = []
                if not sym:  # asymmetric: the best symmetric configs only
                    done = [rr for rr in rows if rr["shape"] == name and rr["M"] == m]
                    for kind in ("gemv", "dot"):
                        lab = done[0].get(f"{kind}_cfg") if done else None
                        if lab:
                            cands.append((kind, lab[0], lab[1]))
                elif m == 1:
                    cands += [("gemv", c, s) for c in gemv_configs(not a.quick) for s in splits]
                if sym and not a.no_dot:
                    cands += [("dot", c, s) for c in dot_configs(m, not a.quick) for s in splits[:2]]
                best = {}
                for kind, cfg, sk in cands:
                    if time.time() > deadline:
                        r["errors"]["budget"] = "budget reached; sweep cut short"
                        break
                    fn = w4_words.gemv if kind == "gemv" else w4_words.gemm
                    label = f"{kind} " + " ".join(f"{kk}{v}" for kk, v in cfg.items()) + f" sk{sk or 'auto'}"
                    try:
                        call = lambda qq, fn=fn, cfg=cfg, sk=sk: fn(x, qq.packed, qq.scales, qq.zeros, 4, qq.group_size,
                                                                    n, None, config=cfg, split_k=sk)
                        err = gk.rel(call(qs[0]), ref)
                        if err > 1.2e-2:
                            r["errors"][label] = f"rel error {err:.3g}"
                            continue
                        us = gk.graph_time([lambda qq=qq: call(qq) for qq in qs])
                    except Exception as e:  # noqa: BLE001
                        r["errors"][label] = repr(e)[:300]
                        continue
                    r["sweep"][label] = us
                    if kind not in best or us < best[kind][1]:
                        best[kind] = (label, us, cfg, sk)
                for kind, (label, us, cfg, sk) in best.items():
                    r["us"][f"{kind} best"] = us
                    r[f"{kind}_best_config"] = label
                    r[f"{kind}_cfg"] = (cfg, sk)
                rows.append(r)
                base = next((rr["us"]["bf16"] for rr in rows if rr["shape"] == name and rr["M"] == m and "bf16" in rr["us"]),
                            None)
                gk.log(f"{name} M={m} sym={sym}: " + ", ".join(f"{kk} {v:.1f}" for kk, v in r["us"].items())
                       + (" | x bf16: " + ", ".join(f"{kk} {base / v:.2f}" for kk, v in r["us"].items()) if base else "")
                       + f" | {[r.get(f'{kk}_best_config') for kk in ('gemv', 'dot')]} errors {len(r['errors'])}")
            del qs, q
        del dense
        if not gk.DRY:
            torch.cuda.empty_cache()
    out = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name(0) if not gk.DRY else "cpu (dry run)",
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "command": "python3 " + " ".join(sys.argv), "ceilings": ceil, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
