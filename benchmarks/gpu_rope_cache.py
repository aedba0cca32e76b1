"""The rotary + KV-cache kernel (core/kernels/rope_cache.py) on a GPU: its outputs against transformers'
apply_rotary_pos_emb + the cache's index_copy_ (bit for bit, bf16 / fp16 / float32), and the time of both inside
a CUDA graph, at Llama-3-8B's heads (32 q, 8 kv, 128 wide) for a decode step (1 token) and a 128-token prefill,
batch 1 and 16.

  python3 benchmarks/gpu_rope_cache.py --out DIR/gpu_rope_cache.json     (exit 1 if any output differs)
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
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from core.kernels import rope_cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    heads, kv, d, length = 32, 8, 128, 512
    rows, bad = [], 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for b, s in ((1, 1), (16, 1), (1, 128)):
            g = torch.Generator(device="cuda").manual_seed(b * 1000 + s)
            qkv = torch.randn(b, s, (heads + 2 * kv) * d, device="cuda", generator=g).to(dtype)
            angle = torch.randn(b, s, d, device="cuda", generator=g) * 3
            cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
            pos = torch.arange(100, 100 + s, device="cuda")
            kc, vc = (torch.randn(b, kv, length, d, device="cuda", generator=g).to(dtype) for _ in range(2))
            k_ref, v_ref = kc.clone(), vc.clone()

            def reference(kc=k_ref, vc=v_ref, qkv=qkv, cos=cos, sin=sin, pos=pos, b=b, s=s):
                q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in qkv.split([heads * d, kv * d, kv * d], -1))
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                kc.index_copy_(2, pos, k)
                vc.index_copy_(2, pos, v)
                return q

            def kernel(kc=kc, vc=vc, qkv=qkv, cos=cos, sin=sin, pos=pos):
                return rope_cache.rope_to_cache(qkv, cos, sin, pos, kc, vc, heads, kv)

            q_ref, q = reference(), kernel()
            same = torch.equal(q, q_ref) and torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
            bad += not same
            row = {"dtype": str(dtype).removeprefix("torch."), "batch": b, "tokens": s, "equal": same,
                   "max_abs_diff_q": float((q.float() - q_ref.float()).abs().max()),
                   "us": {"transformers": gk.graph_time([reference]), "kernel": gk.graph_time([kernel])}}
            rows.append(row)
            gk.log(f"{row['dtype']} b={b} S={s}: equal {same}; transformers {row['us']['transformers']:.1f} us, "
                   f"kernel {row['us']['kernel']:.1f} us")
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "command": "python3 " + " ".join(sys.argv), "not_equal": bad, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
