"""Where a compiled decode step's time goes, on a GPU: Dynamo's graph count (a graph break splits the compiled step
and stops fusion across it) and a kernel-by-kernel breakdown from torch.profiler, per configuration.

  python3 benchmarks/gpu_decode_profile.py --out results.json [--layers 4] [--configs bf16,w4a16]

Llama-3-8B shapes with random weights (benchmarks/gpu_decode.py builds them), `--layers` decoder layers (the
per-layer costs are what matter; the lm_head and sampling are counted once per step). The step is compiled but not
graphed, so the profiler sees every kernel; kernel times do not depend on the launch gaps a CUDA graph removes.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--configs", default="bf16,w4a16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=192, help="cache length (gpu_decode.py: prompt 128 + 64 tokens)")
    ap.add_argument("--no-merge", dest="merge", action="store_false", help="q/k/v and gate/up as separate linears")
    ap.add_argument("--no-glu", dest="glu", action="store_false", help="gate/up GEMV without silu in its epilogue")
    ap.add_argument("--no-rope-epilogue", dest="rope_epilogue", action="store_false",
                    help="q/k/v GEMV without the rotary embedding and cache write in its epilogue")
    ap.add_argument("--no-residual-in-product", dest="residual_in_product", action="store_false",
                    help="residual adds after o_proj / down_proj instead of in their kernels")
    a = ap.parse_args()
    command = "python3 " + " ".join(["benchmarks/gpu_decode_profile.py"] + sys.argv[1:])
    sys.argv = sys.argv[:1]  # gpu_decode parses nothing at import, but keep its view clean
    import torch

    import gpu_decode as gd
    from core.kernels import dispatch
    from core.measure.decode import StaticDecoder, grouped_decode_attention

    dispatch.GLU_EPILOGUE = a.glu
    dispatch.ROPE_EPILOGUE = a.rope_epilogue
    from core import fusion

    fusion.RESIDUAL_IN_PRODUCT = a.residual_in_product

    dev = torch.device("cuda")
    args = types.SimpleNamespace(tiny=False, seed=0, batches=[1], merge=a.merge)
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "command": command,
           "layers": a.layers, "max_len": a.max_len, "merged_projections": a.merge, "glu_epilogue": a.glu,
           "rope_epilogue": a.rope_epilogue, "residual_in_product": a.residual_in_product,
           "configs": {}}
    for name in a.configs.split(","):
        with torch.inference_mode(), grouped_decode_attention():  # as StaticDecoder.run steps
            out["configs"][name] = profile(a, gd, StaticDecoder, args, name, dev)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


def profile(a, gd, decoder_cls, args, name, dev) -> dict:
    """Graph count and kernel breakdown of one configuration's compiled decode step."""
    import torch

    model, _ = gd.build(args, name, a.layers, dev)
    dec = decoder_cls(model, 1, a.max_len, use_graph=False, compile=False)
    dec.prefill(torch.randint(0, 1000, (1, 128), device=dev))
    ex = torch._dynamo.explain(dec._step)()
    row = {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
           "break_reasons": sorted({str(b.reason).splitlines()[0][:200] for b in ex.break_reasons})}
    torch._dynamo.reset()
    step = torch.compile(dec._step, mode="default", dynamic=False)
    for _ in range(5):  # compile + warm up
        step()
        dec.cache.seen += 1
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
            dec.cache.seen += 1
        torch.cuda.synchronize()
    agg = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name[:100]][0] += 1
            agg[e.name[:100]][1] += e.device_time_total
    kernels = sorted(({"kernel": k, "per_step": n / a.steps, "us_per_step": t / a.steps}
                      for k, (n, t) in agg.items()), key=lambda r: -r["us_per_step"])
    row["kernel_us_per_step"] = sum(r["us_per_step"] for r in kernels)
    row["kernels"] = kernels
    print(f"== {name}: {row['graphs']} graph(s), {row['graph_breaks']} break(s); "
          f"{row['kernel_us_per_step']:.1f} us of kernels per step ({a.layers} layers)", flush=True)
    for r in kernels[:15]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['per_step']:4.1f}  {r['kernel'][:80]}", flush=True)
    return row


if __name__ == "__main__":
    main()
