"""Latency, measured the way optimum-benchmark does: warm up, repeat, synchronize, report the
median and p90. Prefill (one forward over a prompt) and decode (one token at a time on the KV
cache) are timed separately; decode throughput is measured at several batch sizes.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch


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


def _decode_steps(model, ids: torch.Tensor, steps: int, device) -> list[float]:
    """Prefill (untimed), then time each single-token decode step; greedy tokens."""
    cache, tok = _prefill(model, ids)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t)
        cache = out.past_key_values
    return times


@torch.inference_mode()
def measure_latency(model, prompt: torch.Tensor, decode_tokens: int, batch_sizes: list[int],
                    warmup: int, repeats: int, progress=None) -> dict:
    """prompt: 1-D token ids (real text, never zeros). Returns ms figures (median, p90)."""
    device = next(model.parameters()).device
    ids = prompt.unsqueeze(0).to(device)
    total = (warmup + repeats) * (1 + len(batch_sizes))
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress("latency", done, total)

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
    return {
        "device": str(device),
        "prompt_len": int(prompt.numel()),
        "decode_tokens": decode_tokens,
        "prefill_ms": summarize(prefill),
        "decode_ms": decode_b1,
        "throughput": throughput,
        "warmup": warmup,
        "repeats": repeats,
    }
