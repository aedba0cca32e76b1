"""The app's latency measurement (core.measure.latency.measure_latency) end to end on a GPU, with core.fusion's
norm / SiLU kernels it installs: a SmolLM2-135M-shaped Llama with random weights, bf16, FP8 W8A8 and RTN 4-bit
(group 64, symmetric: the 4-bit GEMV / mma kernels, launched with PDL on sm_90+). Records its
warnings, the static-cache loop's agreement with the dynamic cache, how many modules were fused, which decode
attention ran (its gpu_kernels field), and the logits with and without the fused forwards.

  python3 benchmarks/gpu_latency_smoke.py --out DIR/gpu_latency_smoke.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.fusion import FUSED, unfuse  # noqa: E402
from core.kernels import pdl  # noqa: E402
from core.measure.latency import measure_latency  # noqa: E402
from core.quant.linear import quantize_model_rtn  # noqa: E402
from core.quant.w8a8 import quantize_model_w8a8  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    out = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for scheme in ("bf16", "fp8", "w4a16"):
        model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
        if scheme == "fp8":
            quantize_model_w8a8(model, "fp8")
        elif scheme == "w4a16":
            quantize_model_rtn(model, SimpleNamespace(bits=4, group_size=64, symmetric=True, skip=["lm_head"]))
        prompt = torch.randint(3, 49000, (64,))
        r = measure_latency(model, prompt, 16, [1, 4], 1, 3)
        fused = [n for n, m in model.named_modules() if getattr(m, FUSED, False)]
        with torch.no_grad():
            ids = prompt[None].cuda()
            a = model(ids).logits.float()
            unfuse(model)
            b = model(ids).logits.float()
        out[scheme] = {"prefill_ms": r["prefill_ms"], "decode_ms": r["decode_ms"], "warnings": r["warnings"],
                       "agree": r.get("static_vs_dynamic_token_agreement"), "loop": r["decode_loop"],
                       "fused": len(fused), "gpu_kernels": r["gpu_kernels"],
                       "fused_vs_unfused_logits_rel": float((a - b).norm() / b.norm()),
                       "pdl_sms": dict(pdl._sms)}
        print(scheme, out[scheme], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
