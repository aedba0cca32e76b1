"""The batch-1 GEMV's epilogues (core/kernels/w4_words.py) on a GPU, each against the separate kernels it replaces:

  - gate/up with silu(gate) * up (gemv(glu=True); core.fusion.mlp_forward through dispatch.glu_matmul): against
    float32 dequantize + matmul then silu * up, at the merged Llama-3-8B gate/up (28672 x 4096), SmolLM2-135M's
    (3072 x 576; 4-bit g32, g128 which does not divide 576, asymmetric), 8-bit; a merged tiny Llama MLP module
    against its own unmerged forward;
  - q/k/v with the rotary embedding and the KV-cache write (gemv(rope=...); core.merge's attention forward through
    StaticKVCache.project_rotary): bit for bit against the plain product followed by core.kernels.rope_cache, at
    Llama-3-8B's q/k/v (32 + 2 x 8 heads of 128) and SmolLM2's (9 + 2 x 3 heads of 64); merged 4-bit tiny Llama,
    Mistral, Qwen2 (biased q/k/v) and Qwen3 decoders through StaticDecoder (CUDA graph) with the epilogue on and
    off: the same tokens (--decoders-only runs just these);
  - the residual add after o_proj / down_proj (gemv(residual=...), core.fusion.linear_residual): bit for bit the
    product followed by PyTorch's add, at Llama-3-8B's o (K in one chunk) and down (K split, summed with the add);
    bf16 nn.Linear's addmm(residual, x, W^T) against mm + add;
  - time inside a CUDA graph over weight copies > 3x L2, fused against separate.

  python3 benchmarks/gpu_gemv_epilogues.py --out DIR/gpu_gemv_epilogues.json     (exit 1 if a case is off)

(Until the rotary part was added this script was benchmarks/gpu_glu_gemv.py: results/gpu_glu_gemv_s12.json.)
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

ROPE_CASES = [  # name, heads, kv heads, head width, K, group, symmetric
    ("Llama-3-8B q/k/v 6144x4096 g128", 32, 8, 128, 4096, 128, True),
    ("Llama-3-8B q/k/v asym", 32, 8, 128, 4096, 128, False),
    ("SmolLM2 q/k/v 960x576 g32 asym", 9, 3, 64, 576, 32, False),
]

RESIDUAL_CASES = [("Llama-3-8B o 4096x4096", 4096, 4096), ("Llama-3-8B down 4096x14336", 4096, 14336)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--decoders-only", action="store_true", help="only the tiny decoders through StaticDecoder")
    a = ap.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows, bad = [], 0
    for name, width, k, bits, gs, sym in [] if a.decoders_only else CASES:
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
    if not a.decoders_only:
        rows.append(module_check())
        bad += not rows[-1]["ok"]
        for name, heads, kv, d, k, gs, sym in ROPE_CASES:
            rows.append(rope_case(name, heads, kv, d, k, gs, sym, l2))
            bad += not rows[-1]["ok"]
        for name, n, k in RESIDUAL_CASES:
            rows.append(residual_case(name, n, k, l2))
            bad += not rows[-1]["ok"]
    for arch in DECODER_ARCHS:
        rows.append(decoder_check(arch))
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


def rope_case(name, heads, kv, d, k, gs, sym, l2) -> dict:
    """bf16: the fused kernel's q and caches equal the product + rope_cache's, bit for bit; times of both."""
    from core.kernels import rope_cache

    n = (heads + 2 * kv) * d
    q = gk.make_qlinear(n, k, 4, gs, sym)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    angle = torch.randn(1, 1, d, device="cuda") * 3
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    pos = torch.tensor([100], device="cuda")
    kc, vc = (torch.randn(1, kv, 192, d, device="cuda").to(torch.bfloat16) for _ in range(2))
    k_ref, v_ref = kc.clone(), vc.clone()
    args = (q.packed, q.scales, q.zeros, q.bits, q.group_size, n)
    q_ref = rope_cache.rope_to_cache(w4_words.gemv(x, *args).view(1, 1, n), cos, sin, pos, k_ref, v_ref, heads, kv)
    got = w4_words.gemv(x, *args, rope=(cos, sin, pos, kc, vc, heads, kv))
    equal = (torch.equal(got.view(1, 1, heads, d).transpose(1, 2), q_ref) and torch.equal(kc, k_ref)
             and torch.equal(vc, v_ref))
    copies = [gk.clone_q(q) for _ in range(gk.n_copies(gk.qbytes(q), l2))]

    def fused(c):
        return lambda: w4_words.gemv(x, c.packed, c.scales, c.zeros, c.bits, c.group_size, n,
                                     rope=(cos, sin, pos, kc, vc, heads, kv))

    def separate(c):
        return lambda: rope_cache.rope_to_cache(
            w4_words.gemv(x, c.packed, c.scales, c.zeros, c.bits, c.group_size, n).view(1, 1, n), cos, sin, pos,
            k_ref, v_ref, heads, kv)

    us = {"fused": gk.graph_time([fused(c) for c in copies]),
          "gemv + rope_cache kernel": gk.graph_time([separate(c) for c in copies])}
    row = {"case": name, "heads": heads, "kv_heads": kv, "head_dim": d, "K": k, "group_size": gs, "symmetric": sym,
           "bit_equal_to_separate": equal, "ok": equal, "us": us,
           "saved_us": us["gemv + rope_cache kernel"] - us["fused"]}
    gk.log(f"{name}: equal {equal}; " + ", ".join(f"{a} {t:.2f} us" for a, t in us.items()))
    return row


@torch.inference_mode()
def residual_case(name, n, k, l2) -> dict:
    """4-bit: gemv(residual=r) bit-equal to r + gemv; bf16: addmm against mm + add (its error); times of each."""
    q = gk.make_qlinear(n, k, 4, 128, True)
    x, r = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16), torch.randn(1, n, device="cuda",
                                                                                  dtype=torch.bfloat16))
    args = (q.packed, q.scales, q.zeros, q.bits, q.group_size, n)
    equal = torch.equal(w4_words.gemv(x, *args, residual=r), r + w4_words.gemv(x, *args))
    copies = [gk.clone_q(q) for _ in range(gk.n_copies(gk.qbytes(q), l2))]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wcopies = [w.clone() for _ in range(gk.n_copies(w.numel() * 2, l2))]
    addmm_err = gk.rel(torch.addmm(r, x, w.t()), (r.float() + x.float() @ w.float().t()))
    sep_err = gk.rel(r + x @ w.t(), (r.float() + x.float() @ w.float().t()))
    us = {"w4 fused": gk.graph_time([lambda c=c: w4_words.gemv(x, c.packed, c.scales, c.zeros, c.bits, c.group_size,
                                                               n, residual=r) for c in copies]),
          "w4 gemv + add": gk.graph_time([lambda c=c: r + w4_words.gemv(x, c.packed, c.scales, c.zeros, c.bits,
                                                                        c.group_size, n) for c in copies]),
          "bf16 addmm": gk.graph_time([lambda w=w: torch.addmm(r, x, w.t()) for w in wcopies]),
          "bf16 mm + add": gk.graph_time([lambda w=w: r + x @ w.t() for w in wcopies])}
    row = {"case": name + " + residual", "N": n, "K": k, "w4_bit_equal": equal, "bf16_addmm_rel_err": addmm_err,
           "bf16_mm_add_rel_err": sep_err, "ok": equal and addmm_err < 8e-3, "us": us}
    gk.log(f"{row['case']}: w4 equal {equal}; bf16 addmm err {addmm_err:.1e} (mm + add {sep_err:.1e}); "
           + ", ".join(f"{a} {t:.2f} us" for a, t in us.items()))
    return row


DECODER_ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # qwen2: biased q/k/v; qwen3: q/k norms (no q/k/v epilogue)


@torch.inference_mode()
def decoder_check(arch: str = "llama") -> dict:
    """A merged 4-bit tiny decoder of transformers' `arch` through StaticDecoder (CUDA graph): the same tokens with
    the q/k/v epilogue and the residual adds in the products on and off; the epilogue taken at every layer of the
    decode step (Qwen3 normalizes q and k per head before the rotation, so there it must never be taken)."""
    import transformers

    from core import merge
    from core.kernels import dispatch
    from core.measure.decode import StaticDecoder
    from core.quant.linear import QuantLinear
    from core.quant.rtn import quantize_rtn

    torch.manual_seed(0)
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    cfg = getattr(transformers, f"{names}Config")(
        vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, head_dim=64)
    model = getattr(transformers, f"{names}ForCausalLM")(cfg).eval()
    biased = False
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for n, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    if lin.bias is not None:
                        biased = True
                        torch.nn.init.normal_(lin.bias, std=0.5)  # transformers initializes biases to zero
                    setattr(parent, n, QuantLinear.from_linear(lin, quantize_rtn(lin.weight.detach(), 4, 128, True)))
    model = model.cuda().to(torch.bfloat16)
    merged = merge.merge_projections(model)
    decoders = merge.merged_decoder_layers(model)
    ids = torch.randint(0, 1000, (1, 12), device="cuda")
    calls = []
    real = dispatch.rope_matmul

    def counting(*args, **kw):
        y = real(*args, **kw)
        calls.append(y is not None)
        return y

    out = {}
    try:
        for on in (True, False):  # the q/k/v epilogue and the residual adds in the products, on and off
            dispatch.ROPE_EPILOGUE = dispatch.RESIDUAL_EPILOGUE = on
            dispatch.rope_matmul = counting
            calls.clear()
            tokens, t = StaticDecoder(model, 1, 64).run(ids, 24)
            out[on] = (tokens.cpu(), list(calls), t.get("mode"), list(t.get("warnings", [])))
    finally:
        dispatch.ROPE_EPILOGUE = dispatch.RESIDUAL_EPILOGUE = True
        dispatch.rope_matmul = real
        merge.unmerge(model)
    same = torch.equal(out[True][0], out[False][0])
    calls_on = out[True][1]
    used = (not calls_on) if arch == "qwen3" else (bool(calls_on) and all(calls_on))
    row = {"case": f"merged 4-bit tiny {names} through StaticDecoder", "arch": arch, "biased_projections": biased,
           "merged_blocks": len(merged), "decoder_layers_with_residual_in_products": decoders,
           "tokens_equal_on_off": same, "epilogue_calls_on": len(calls_on), "epilogue_use_as_expected": used,
           "mode": out[True][2], "warnings": out[True][3] + out[False][3],
           "ok": same and used and decoders == 2 and out[True][2] == out[False][2]}
    gk.log(f"decoder {arch}: {row}")
    return row


if __name__ == "__main__":
    main()
