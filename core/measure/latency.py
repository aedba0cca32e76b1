"""Latency, measured the way optimum-benchmark does: warm up, repeat, synchronize, report the
median and p90. Prefill (one forward over a prompt) and decode (one token at a time on the KV
cache) are timed separately; decode throughput is measured at several batch sizes.

On a GPU the decode loop is core.measure.decode's: a static KV cache and the one-token step replayed
as a CUDA graph, timed with CUDA events, so the figures are the kernels' and not Python's launch
overhead; the card is recorded. Elsewhere (CPU) each step is the model's plain forward on
transformers' dynamic cache, timed with perf_counter. Either way the result has the same keys.
"""
from __future__ import annotations

import inspect
import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times_s: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times_s)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return {"median": statistics.median(ms), "p90": p90, "n": len(ms)}


def _prefill(model, ids: torch.Tensor):
    # only the last position's logits, as generate() does: full-sequence logits would dominate
    # both the time and the peak memory of a small-model prefill
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(ids, use_cache=True, **kw)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def _decode_steps(model, ids: torch.Tensor, steps: int, device, tokens: list | None = None) -> list[float]:
    """Prefill (untimed), then time each single-token decode step; greedy tokens (appended to `tokens`,
    prefill's first, when given)."""
    cache, tok = _prefill(model, ids)
    if tokens is not None:
        tokens.append(tok)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t)
        cache = out.past_key_values
        if tokens is not None:
            tokens.append(tok)
    return times


def _dynamic(model, ids, decode_tokens, batch_sizes, warmup, repeats, device, tick) -> dict:
    prefill = []
    for i in range(warmup + repeats):
        _sync(device)
        t = time.perf_counter()
        _prefill(model, ids)
        _sync(device)
        if i >= warmup:
            prefill.append(time.perf_counter() - t)
        tick()

    throughput, decode_b1 = [], None
    for b in batch_sizes:
        batch = ids.expand(b, -1).contiguous()
        steps = []
        for i in range(warmup + repeats):
            times = _decode_steps(model, batch, decode_tokens, device)
            if i >= warmup:
                steps.extend(times)
            tick()
        s = summarize(steps)
        throughput.append({"batch": b, "tokens_per_s": b * 1000 / s["median"], "step_ms_median": s["median"], "step_ms_p90": s["p90"]})
        if b == 1:
            decode_b1 = s
    if decode_b1 is None:
        decode_b1 = summarize(_decode_steps(model, ids, decode_tokens, device))
    return {"prefill_ms": summarize(prefill), "decode_ms": decode_b1, "throughput": throughput,
            "timer": "perf_counter", "decode_loop": "dynamic_cache_eager"}


def _static(model, ids, decode_tokens, batch_sizes, warmup, repeats, tick, use_graph, compile) -> dict:
    """The same measurements with core.measure.decode.StaticDecoder (CUDA events on a GPU). The batch-1
    decoder times the prefill (runs that generate one token) and then its own decode."""
    from .decode import StaticDecoder

    max_len = ids.shape[1] + decode_tokens + 1
    decoders: dict[int, StaticDecoder] = {}

    def decoder(b: int) -> StaticDecoder:
        if b not in decoders:
            decoders[b] = StaticDecoder(model, b, max_len, use_graph=use_graph, compile=compile)
        return decoders[b]

    prefill = []
    for i in range(warmup + repeats):
        _, t = decoder(1).run(ids, 1)
        if i >= warmup:
            prefill.append(t["prefill_ms"] / 1e3)
        tick()
    throughput, decode_b1, modes, setup, tokens_b1 = [], None, {}, {}, None
    for b in batch_sizes:
        dec = decoder(b)
        batch = ids.expand(b, -1).contiguous()
        steps, pre = [], []
        for i in range(warmup + repeats):
            toks, t = dec.run(batch, decode_tokens + 1)
            setup[b] = setup.get(b, 0.0) + t["setup_s"]
            if i >= warmup:
                steps.extend(s / 1e3 for s in t["step_ms"])
                pre.append(t["prefill_ms"] / 1e3)
            tick()
        if b == 1:
            tokens_b1 = toks
        modes[b] = dec.mode
        s = summarize(steps)
        throughput.append({"batch": b, "tokens_per_s": b * 1000 / s["median"], "step_ms_median": s["median"],
                           "step_ms_p90": s["p90"], "prefill_ms_median": summarize(pre)["median"], "mode": dec.mode,
                           "setup_s": setup[b]})
        if b == 1:
            decode_b1 = s
    if decode_b1 is None:
        toks, t = decoder(1).run(ids, decode_tokens + 1)
        tokens_b1 = toks
        decode_b1 = summarize([s / 1e3 for s in t["step_ms"]])
    warnings = sorted({w for d in decoders.values() for w in d.warnings})
    mode = "static_cache+" + ("/".join(sorted(set(modes.values()))) or decoder(1).mode)
    return {"prefill_ms": summarize(prefill), "decode_ms": decode_b1, "throughput": throughput,
            "timer": "cuda_events" if ids.is_cuda else "perf_counter", "decode_loop": mode, "warnings": warnings,
            "_tokens_b1": tokens_b1}


@torch.inference_mode()
def measure_latency(model, prompt: torch.Tensor, decode_tokens: int, batch_sizes: list[int],
                    warmup: int, repeats: int, progress=None, static_decode: bool | None = None,
                    use_graph: bool = True, compile: bool = False) -> dict:
    """prompt: 1-D token ids (real text, never zeros). Returns ms figures (median, p90).

    static_decode: None (default) = on CUDA, the static-cache decode loop with a CUDA graph (use_graph) and
    CUDA events; on CPU, the dynamic-cache loop. True / False force either (the static loop on CPU runs
    eagerly). If the static loop fails, or its first greedy tokens differ from the dynamic loop's, the
    dynamic loop measures instead and `warnings` says why.

    On CUDA every model is timed with q/k/v and gate/up merged (core.merge), undone before returning."""
    gpu_kernels = merged = None
    warnings: list[str] = []
    if next(model.parameters()).is_cuda:  # the same fused kernels and merged projections for every model
        gpu_kernels, merged, warnings = install_gpu_forwards(model)
    try:
        res = _measure_latency(model, prompt, decode_tokens, batch_sizes, warmup, repeats, progress, static_decode,
                               use_graph, compile, gpu_kernels)
    finally:
        if merged:
            from ..merge import unmerge

            unmerge(model)
    res["warnings"] = warnings + res["warnings"]
    return res


def install_gpu_forwards(model) -> tuple[dict, list[str], list[str]]:
    """core.fusion's fused norm / SiLU forwards, then core.merge's merged projections (after: the fusion traces
    which linears read each norm). A merge that fails (e.g. out of memory for one block's stacked copy) is undone
    and the model is timed unmerged, with a warning. Returns (gpu_kernels record, merged blocks, warnings)."""
    from ..fusion import fuse_producers
    from ..merge import merge_projections, merged_decoder_layers, unmerge

    gpu_kernels = {"fused_modules": len(fuse_producers(model))}
    try:
        merged, warnings = merge_projections(model), []
    except Exception as e:  # noqa: BLE001
        log.warning("merging projections failed: %r", e)
        unmerge(model)
        merged = []
        reason = f"{type(e).__name__}: {str(e)[:200]}"
        warnings = [f"q/k/v and gate/up were not merged ({reason}): timed as separate linears"]
    gpu_kernels["merged_blocks"] = len(merged)
    gpu_kernels["decoder_layers_residual_in_product"] = merged_decoder_layers(model)
    return gpu_kernels, merged, warnings


def _measure_latency(model, prompt, decode_tokens, batch_sizes, warmup, repeats, progress, static_decode, use_graph,
                     compile, gpu_kernels) -> dict:
    device = next(model.parameters()).device
    ids = prompt.unsqueeze(0).to(device)
    total = (warmup + repeats) * (1 + len(batch_sizes))
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress("latency", done, total)

    if device.type == "cuda":
        from . import decode as decode_mod

        decode_mod.attention_kernel_used.discard(device.index)
        decode_mod.rope_kernel_used.discard(device.index)
    static = device.type == "cuda" if static_decode is None else static_decode
    res, warnings = None, []
    if static:
        try:
            res = _static(model, ids, decode_tokens, batch_sizes, warmup, repeats, tick, use_graph, compile)
            warnings += res.pop("warnings")
            # guard against an architecture the static loop mishandles: its greedy tokens must start like the
            # dynamic cache's (later ones may part on float ties)
            ref: list = []
            _decode_steps(model, ids, decode_tokens, device, ref)
            ref = torch.cat(ref, dim=1)
            got = res.pop("_tokens_b1")
            n = min(4, ref.shape[1])
            res["static_vs_dynamic_token_agreement"] = float((got == ref).float().mean())
            if not torch.equal(got[:, :n], ref[:, :n]):
                warnings.append(f"static-cache decode disagreed with the dynamic cache within the first {n} tokens "
                                f"({got[0, :n].tolist()} vs {ref[0, :n].tolist()}): measured with the dynamic loop")
                res = None
        except Exception as e:  # noqa: BLE001
            log.warning("static decode failed: %r", e)
            warnings.append(f"static-cache decode failed ({type(e).__name__}: {str(e)[:300]}): measured with the "
                            "dynamic loop")
            res = None
        if res is None:
            done = 0
    if res is None:
        res = _dynamic(model, ids, decode_tokens, batch_sizes, warmup, repeats, device, tick)
    if gpu_kernels is not None:  # what ran, so runs measured before or without a kernel can be told apart
        in_static = res["decode_loop"].startswith("static")
        used = in_static and device.index in decode_mod.attention_kernel_used
        gpu_kernels["decode_attention"] = "slimlm kernel" if used else "sdpa"
        used = in_static and device.index in decode_mod.rope_kernel_used
        gpu_kernels["rotary_and_cache_write"] = "slimlm kernel" if used else "transformers"
    return {
        "device": str(device),
        "prompt_len": int(prompt.numel()),
        "decode_tokens": decode_tokens,
        "prefill_ms": res["prefill_ms"],
        "decode_ms": res["decode_ms"],
        "throughput": res["throughput"],
        "warmup": warmup,
        "repeats": repeats,
        "timer": res["timer"],
        "decode_loop": res["decode_loop"],
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "static_vs_dynamic_token_agreement": res.get("static_vs_dynamic_token_agreement"),
        "gpu_kernels": gpu_kernels,
        "warnings": warnings,
    }
