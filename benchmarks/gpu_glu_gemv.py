"""The batch-1 gate/up GEMV with silu(gate) * up in its epilogue (w4_words.gemv(glu=True), used by
core.fusion.mlp_forward through core.kernels.dispatch.glu_matmul) on a GPU:

  - correctness against float32 dequantize + matmul, then silu(gate) * up, at the merged Llama-3-8B gate/up
    (28672 x 4096), SmolLM2-135M's (3072 x 576; 4-bit g32, g128 which does not divide 576, asymmetric), 8-bit;
    and a merged tiny Llama MLP module (QuantLinear) against its own unmerged forward;
  - time inside a CUDA graph over weight copies > 3x L2: the fused kernel against the GEMV of the stacked weight
    followed by slimlm's silu * up kernel (what the CUDA-graph loop ran before) and by PyTorch's silu and mul.

  python3 benchmarks/gpu_glu_gemv.py --out DIR/gpu_glu_gemv.json     (exit 1 if a case is off)
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

from core.kernels import w4_words
from core.kernels.fp8_quant import silu_mul_fp8

CASES = [  # name, width (gate rows = up rows), K, bits, group, symmetric
    ("Llama-3-8B gate/up 2x14336x4096 g128", 14336, 4096, 4, 128, True),
    ("Llama-3-8B gate/up asym", 14336, 4096, 4, 128, False),
    ("SmolLM2 gate/up 2x1536x576 g32 asym", 1536, 576, 4, 32, False),
    ("SmolLM2 g128 (does not divide 576)", 1536, 576, 4, 128, True),
    ("8-bit SmolLM2 2x1536x576 g64 asym", 1536, 576, 8, 64, False),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows, bad = [], 0
    for name, width, k, bits, gs, sym in CASES:
        q = gk.make_qlinear(2 * width, k, bits, gs, sym)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x += 0.1 * torch.sign(x)
        ref = (x.float() @ q.qweight.dequantize(torch.float32).t()).to(torch.bfloat16).float()
        ref = F.silu(ref[:, :width]) * ref[:, width:]
        args = (q.packed, q.scales, q.zeros, q.bits, q.group_size, 2 * width)
        y = w4_words.gemv(x, *args, glu=True)
        plain = w4_words.gemv(x, *args).float()
        sep = F.silu(plain[:, :width]) * plain[:, width:]
        err, err_sep = gk.rel(y, ref), gk.rel(sep.to(torch.bfloat16), ref)
        ok = err < 8e-3 and err <= 1.5 * err_sep + 1e-3
        bad += not ok
        copies = [gk.clone_q(q) for _ in range(gk.n_copies(gk.qbytes(q), l2))]

        def fused(c, x=x, n=2 * width):
            return lambda: w4_words.gemv(x, c.packed, c.scales, c.zeros, c.bits, c.group_size, n, glu=True)

        def separate(c, x=x, w=width):
            def run():
                gu = w4_words.gemv(x, c.packed, c.scales, c.zeros, c.bits, c.group_size, 2 * w)
                return silu_mul_fp8(gu[:, :w], gu[:, w:], quantize=False)
            return run

        def separate_torch(c, x=x, w=width):
            def run():
                g, u = w4_words.gemv(x, c.packed, c.scales, c.zeros, c.bits, c.group_size, 2 * w).split(w, -1)
                return F.silu(g) * u
            return run

        us = {"fused": gk.graph_time([fused(c) for c in copies]),
              "gemv + slimlm silu*up kernel": gk.graph_time([separate(c) for c in copies]),
              "gemv + torch silu, mul": gk.graph_time([separate_torch(c) for c in copies])}
        row = {"case": name, "width": width, "K": k, "bits": bits, "group_size": gs, "symmetric": sym,
               "rel_err": err, "rel_err_separate": err_sep, "ok": ok, "us": us,
               "saved_us_vs_slimlm_kernel": us["gemv + slimlm silu*up kernel"] - us["fused"]}
        rows.append(row)
        gk.log(f"{name}: rel err {err:.2e} (separate {err_sep:.2e}) ok={ok}; "
               + ", ".join(f"{n} {t:.2f} us" for n, t in us.items()))
        del copies
    rows.append(module_check())
    bad += not rows[-1]["ok"]
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "command": "python3 " + " ".join(sys.argv), "failed": bad, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    sys.exit(1 if bad else 0)


@torch.inference_mode()
def module_check() -> dict:
    """A 4-bit tiny Llama's MLP, merged: at one token its forward takes the fused kernel (counted) and matches the
    unmerged module; at three tokens the stacked product and silu run apart."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from core import merge
    from core.kernels import dispatch
    from core.quant.linear import QuantLinear
    from core.quant.rtn import quantize_rtn

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=512, intermediate_size=1376, hidden_act="silu"))
    for n in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, n)
        setattr(mlp, n, QuantLinear.from_linear(lin, quantize_rtn(lin.weight.detach(), 4, 128, True)))
    mlp = mlp.cuda().to(torch.bfloat16)
    x1, x3 = (torch.randn(1, n, 512, device="cuda", dtype=torch.bfloat16) for n in (1, 3))
    ref1, ref3 = mlp(x1), mlp(x3)
    calls = []
    real = w4_words.gemv

    def counting(*args, **kw):
        calls.append(kw.get("glu", False))
        return real(*args, **kw)

    w4_words.gemv = counting
    try:
        merged = merge.merge_projections(mlp)
        calls.clear()
        got1 = mlp(x1)
        glu1 = list(calls)
        got3 = mlp(x3)
    finally:
        w4_words.gemv = real
        merge.unmerge(mlp)
    ok = (merged == [""] and glu1 == [True, False] and gk.rel(got1, ref1.float()) < 1e-2
          and gk.rel(got3, ref3.float()) < 1e-2 and dispatch.GLU_EPILOGUE)
    row = {"case": "merged tiny Llama MLP module (4-bit g128, 512 -> 1376)", "merged": merged,
           "gemv_calls_at_one_token_glu": glu1, "rel_err_1": gk.rel(got1, ref1.float()),
           "rel_err_3": gk.rel(got3, ref3.float()), "ok": ok}
    gk.log(f"module: {row}")
    return row


if __name__ == "__main__":
    main()
