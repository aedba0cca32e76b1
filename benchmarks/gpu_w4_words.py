"""Tile sweep for the word-reading 4-bit GEMV (core/kernels/w4_words.py, M = 1) on a GPU, against bf16 cuBLAS and
what the dispatcher runs ("dispatch" = whatever quant_matmul picks), at Llama-3-8B shapes.

  python benchmarks/gpu_w4_words.py --out results.json [--budget-s 300] [--quick] [--bits 8]

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
    for rows, bn, bkw, w in itertools.product((8, 16, 32, 64, 128), (2, 4, 8, 16), (128, 256, 512), (2, 4, 8)):
        per_thread = bn * bkw / (32 * w)
        if 4 <= per_thread <= 64 and rows >= bn:
            out.append({"ROWS": rows, "BN": bn, "BKW": bkw, "num_warps": w, "num_stages": 1})
    return out if full else out[:3]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8], help="weight bits (group 128)")
    ap.add_argument("--dry-cpu", action="store_true")
    a = ap.parse_args()
    from core.kernels import w4_words
    from core.kernels.dispatch import quant_matmul

    deadline = time.time() + a.budget_s
    ceil = gk.ceilings()
    gk.log("ceilings", ceil)
    l2 = 1 << 16 if gk.DRY else torch.cuda.get_device_properties(0).L2_cache_size
    ms = [1]
    rows = []
    order = ["gate/up 14336x4096", "down 4096x14336", "q/o 4096x4096", "k/v 1024x4096"]
    shapes = sorted(gk.SHAPES.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else -1)
    for name, (n, k) in shapes:
        dense = [gk.rand_linear(n, k, seed=s).to(torch.bfloat16) for s in range(gk.n_copies(n * k * 2, l2))]
        for sym in (True, False):
            q = gk.make_qlinear(n, k, a.bits, 128, sym)
            qs = [q] + [gk.clone_q(q) for _ in range(gk.n_copies(gk.qbytes(q), l2) - 1)]
            oracle = q.qweight.dequantize(torch.float32)
            for m in ms:
                x = torch.randn(m, k, device=gk.DEV, dtype=torch.bfloat16)
                ref = x.float() @ oracle.t()
                r = {"shape": name, "N": n, "K": k, "M": m, "symmetric": sym, "weight_bytes": gk.qbytes(q),
                     "us": {}, "sweep": {}, "errors": {}, "rel_err": {}}
                if sym:
                    r["us"]["bf16"] = gk.graph_time([lambda d=d: F.linear(x, d.weight) for d in dense])
                r["us"]["dispatch"] = gk.graph_time([lambda qq=qq: quant_matmul(x, qq) for qq in qs])
                cands = [("default", {}),  # the tile rule the dispatcher uses
                         # the same tiles with the session-4 inner loop: a scale per word, two LOP3s per code
                         ("default-gather-noasm", {"GROUPED": False, "USE_ASM": False}),
                         ("default-nopairs", {"PAIRS": False})]  # codes in float32 (the 8-bit / fp16 path)
                if sym:
                    cands += [("sweep", c) for c in gemv_configs(not a.quick)]
                else:  # asymmetric: the best symmetric config only
                    done = [rr for rr in rows if rr["shape"] == name and rr["M"] == m]
                    if done and done[0].get("best_cfg"):
                        cands.append(("sweep", done[0]["best_cfg"]))
                best = {}
                for kind, cfg in cands:
                    if time.time() > deadline:
                        r["errors"]["budget"] = "budget reached; sweep cut short"
                        break
                    label = kind + " " + " ".join(f"{kk}{v}" for kk, v in cfg.items())
                    try:
                        def call(qq, cfg=cfg):
                            return w4_words.gemv(x, qq.packed, qq.scales, qq.zeros, a.bits, qq.group_size, n, None,
                                                 config=cfg or None)
                        err = gk.rel(call(qs[0]), ref)
                        r["rel_err"][label] = err
                        if err > 1.2e-2:
                            r["errors"][label] = f"rel error {err:.3g}"
                            continue
                        us = gk.graph_time([lambda qq=qq, call=call: call(qq) for qq in qs])
                    except Exception as e:  # noqa: BLE001
                        r["errors"][label] = repr(e)[:300]
                        continue
                    r["sweep"][label] = us
                    if kind.startswith("default"):
                        r["us"][kind.replace("default", "default tiles")] = us
                    elif "best" not in r["us"] or us < r["us"]["best"]:
                        r["us"]["best"], r["best_config"], r["best_cfg"] = us, label, cfg
                rows.append(r)
                base = next((rr["us"]["bf16"] for rr in rows if rr["shape"] == name and rr["M"] == m and "bf16" in rr["us"]),
                            None)
                gk.log(f"{name} M={m} sym={sym}: " + ", ".join(f"{kk} {v:.1f}" for kk, v in r["us"].items())
                       + (" | x bf16: " + ", ".join(f"{kk} {base / v:.2f}" for kk, v in r["us"].items()) if base else "")
                       + f" | {r.get('best_config')} errors {len(r['errors'])}")
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
