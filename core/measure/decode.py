"""Greedy decoding on a static KV cache, with the one-token decode step replayed as a CUDA graph.

Eager transformers decoding issues ~40 small kernels per layer from Python, so at batch 1 a GPU waits on the
host most of the time and a timing measures Python, not kernels. Here:

  - the KV cache is preallocated (StaticKVCache: [B, kv_heads, max_len, head_dim] per layer, written in place
    at a position held in a device tensor), so every decode step has the same shapes and addresses;
  - the attention mask is built on the device from that position (an additive [1, 1, q, max_len] mask that
    hides the not-yet-written slots), passed to the model as a 4-D mask, which transformers uses as is;
  - on CUDA the step (forward, argmax, next token and position written back into its own inputs) is captured
    once in a torch.cuda.CUDAGraph and replayed, timed with CUDA events; optionally the step is first
    compiled with torch.compile (fuses the elementwise kernels); on CPU it runs eagerly (perf_counter).

Custom linears (QuantLinear's Triton kernels, W8A8Linear's _int_mm / _scaled_mm) are warmed up (Triton
compiles on first call, the fast paths probe once) before the capture. If capture (or compilation) fails, the
decoder falls back to eager steps and says so in `warnings`.

Works with transformers 5.x decoder-only models whose forward accepts a 4-D attention_mask and position_ids
and whose attention calls `past_key_values.update(k, v, layer_idx, ...)` (Llama, Qwen2/3, Mistral, ...),
with attn_implementation "sdpa" or "eager". The tokens equal model.generate(do_sample=False) (tests).

    tokens, timings = decode(model, input_ids, new_tokens=32)            # one call
    dec = StaticDecoder(model, batch=1, max_len=256); dec.run(ids, 32)  # reuse cache + graph across runs
"""
from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import os
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager steps before capture: Triton compiles, cuBLAS/probe setup, torch.compile


def _cache_base():
    try:
        from transformers.cache_utils import Cache
        return Cache
    except Exception:  # noqa: BLE001  (an old or broken transformers: duck typing is enough for the forward)
        return object


class StaticKVCache(_cache_base()):
    """Preallocated per-layer K/V tensors [B, kv_heads, max_len, head_dim], allocated on the first update
    (the prefill) in the dtype/device of the states, then written in place at `write_pos` (a LongTensor of
    positions set by the decoder before each forward). It returns the whole buffers; the decoder's 4-D mask
    hides slots not yet written. Subclasses transformers' Cache for isinstance checks, without its
    constructor (whose arguments differ between versions): nothing but `update` is consulted when the mask
    comes in 4-D and position_ids are given."""

    is_compileable = True

    def __init__(self, max_len: int):  # Cache.__init__ deliberately not called
        self.max_len = int(max_len)
        self.key_cache: dict[int, torch.Tensor] = {}
        self.value_cache: dict[int, torch.Tensor] = {}
        self.write_pos: torch.Tensor | None = None
        self.seen = 0  # host-side count of written positions (for get_seq_length only)
        self.offloading = False
        try:
            self.layers = []  # Cache's per-layer objects: none (keeps its is_sliding etc. empty)
        except AttributeError:
            pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.key_cache.get(layer_idx)
        if k is None or k.shape[0] != key_states.shape[0]:
            b, h, _, d = key_states.shape
            k = key_states.new_zeros(b, h, self.max_len, d)
            self.key_cache[layer_idx] = k
            self.value_cache[layer_idx] = value_states.new_zeros(b, value_states.shape[1], self.max_len,
                                                                 value_states.shape[-1])
        v = self.value_cache[layer_idx]
        k.index_copy_(2, self.write_pos, key_states.to(k.dtype))
        v.index_copy_(2, self.write_pos, value_states.to(v.dtype))
        return k, v

    def _rotary_buffers(self, t: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's K / V buffers where a rotary + cache kernel may write them for input t, else None."""
        k = self.key_cache.get(layer_idx)
        if (not ROPE_KERNEL or k is None or self.write_pos is None or t.device.index in _rope_failed
                or not (t.is_cuda or _interpreted()) or torch.is_grad_enabled() and t.requires_grad):
            return None
        from core.kernels.dispatch import triton_available

        return (k, self.value_cache[layer_idx]) if triton_available() else None

    def project_rotary(self, x: torch.Tensor, proj, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int,
                       heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """update_rotary with the merged q/k/v projection `proj` (a QuantLinear) of one token x [1, 1, K] in the
        same kernel: the batch-1 GEMV rotates and writes the cache in its epilogue (core.kernels.dispatch.
        rope_matmul). Returns (rotated q [1, H, 1, D], K buffer, V buffer), or None where that does not apply."""
        bufs = self._rotary_buffers(x, layer_idx)
        if bufs is None or self.write_pos.numel() != 1:
            return None
        from core.kernels.dispatch import rope_matmul

        q = rope_matmul(x, proj, cos, sin, self.write_pos, *bufs, heads, kv_heads)
        if q is None:
            return None
        rope_kernel_used.add(x.device.index)
        return (q, *bufs)

    def update_rotary(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int, heads: int,
                      kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a merged q/k/v projection (core.merge): the rotary embedding of q and k and this update in one kernel
        (core.kernels.rope_cache). Returns (rotated q [B, H, S, D], K buffer, V buffer), or None where the kernel
        does not apply (no buffers yet, not CUDA, ...): the caller then rotates and calls update()."""
        bufs = self._rotary_buffers(qkv, layer_idx)
        if bufs is None:
            return None
        k, v = bufs
        from core.kernels import rope_cache

        if (not rope_cache.supported(qkv, cos, sin, k, v, heads, kv_heads, k.shape[-1])
                or self.write_pos.shape != qkv.shape[1:2]):
            return None
        try:
            q = rope_cache.rope_to_cache(qkv, cos, sin, self.write_pos, k, v, heads, kv_heads)
            rope_kernel_used.add(qkv.device.index)
            return q, k, v
        except Exception as e:  # noqa: BLE001  (triton's CompilationError is no RuntimeError)
            log.warning("rotary + cache kernel failed (%s); using transformers' rotary and the cache update", e)
            _rope_failed.add(qkv.device.index)
            return None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_len, 0

    def get_query_offset(self, *args, **kwargs) -> int:
        return self.seen

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return self.max_len

    def get_max_length(self) -> int:
        return self.max_len

    def __len__(self) -> int:
        return len(self.key_cache)

    def __repr__(self) -> str:
        return f"StaticKVCache(max_len={self.max_len}, layers={len(self.key_cache)})"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.key_cache, self.value_cache) for t in d.values())


def grouped_decode_sdpa(orig, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers' "sdpa" attention, except for a one-token query with grouped KV heads and a mask shared by
    all heads (the decode step here): the query heads of each KV head attend as a group of n_rep rows, so the
    K/V cache is read once instead of being copied n_rep times (repeat_kv, what transformers < 5.23 does when
    a mask is given: at batch 16 that copy moves more bytes than the weights of a 4-bit model), on CUDA through
    slimlm's split-length kernel (core.kernels.decode_attention) where it applies, else SDPA.
    Same result as repeat_kv + SDPA. Anything else goes to `orig`."""
    n_rep = getattr(module, "num_key_value_groups", 1) or 1
    b, h, q, d = query.shape
    if (q != 1 or n_rep <= 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or attention_mask.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions") or key.shape[1] * n_rep != h or key.shape[-1] != d):
        return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                    **kwargs)
    q = query.reshape(b, h // n_rep, n_rep, d)
    mask = attention_mask[..., : key.shape[-2]]
    out = _decode_kernel(q, key, value, mask, scaling) if query.is_cuda and DECODE_ATTENTION_KERNEL else None
    if out is None:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


DECODE_ATTENTION_KERNEL = True  # False: SDPA for the decode step too (A/B runs)
ROPE_KERNEL = True  # False: transformers' rotary embedding and cache update for merged q/k/v too (A/B runs)
_rope_failed: set = set()
rope_kernel_used: set = set()  # device indices where core.kernels.rope_cache ran (read by core.measure.latency)
_attention_failed: set = set()
attention_kernel_used: set = set()  # device indices where the kernel ran (read by core.measure.latency)


def _interpreted() -> bool:
    """Triton's CPU interpreter is on (tests run the kernels on CPU tensors that way)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _decode_kernel(q, key, value, mask, scaling):
    """slimlm's split-length decode attention (core.kernels.decode_attention) where it applies, else None. A
    kernel that raises is reported once per device and not tried again (SDPA answers)."""
    from core.kernels.dispatch import triton_available

    if q.device.index in _attention_failed or not triton_available():
        return None
    from core.kernels import decode_attention

    if not decode_attention.supported(q, key, value, mask):
        return None
    try:
        out = decode_attention.decode_attention(q, key, value, mask, scaling)
        attention_kernel_used.add(q.device.index)
        return out
    except Exception as e:  # noqa: BLE001  (triton's CompilationError is no RuntimeError)
        log.warning("decode attention kernel failed (%s); using SDPA", e)
        _attention_failed.add(q.device.index)
        return None


_MISSING = object()


@contextlib.contextmanager
def grouped_decode_attention():
    """Within: transformers' "sdpa" attention is grouped_decode_sdpa (restored on exit). Python-level only: a
    CUDA graph or compiled step captured inside keeps it."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        orig = ALL_ATTENTION_FUNCTIONS["sdpa"]
        local = ALL_ATTENTION_FUNCTIONS._local_mapping
    except Exception:  # noqa: BLE001  (another transformers layout: leave attention alone)
        yield
        return
    prev = local.get("sdpa", _MISSING)
    local["sdpa"] = functools.partial(grouped_decode_sdpa, orig)
    try:
        yield
    finally:
        if prev is _MISSING:
            local.pop("sdpa", None)
        else:
            local["sdpa"] = prev


ARGMAX_CHUNK = 1024


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> argmax [B, 1] (the first maximum, as Tensor.argmax). Over a large vocabulary in two
    stages, the maximum of each chunk of ARGMAX_CHUNK, then the best chunk: inductor compiles a one-row argmax
    over 128,256 logits into a single-block reduction that took 20-30 us of a 3 ms decode step on an H100; this
    takes 4-6 us (benchmarks/RESULTS.md)."""
    b, v = logits.shape
    if v <= 4 * ARGMAX_CHUNK:
        return logits.argmax(-1, keepdim=True)
    n = -(-v // ARGMAX_CHUNK)
    if n * ARGMAX_CHUNK != v:
        logits = torch.nn.functional.pad(logits, (0, n * ARGMAX_CHUNK - v), value=float("-inf"))
    best, where = logits.view(b, n, ARGMAX_CHUNK).max(-1)
    chunk = best.argmax(-1, keepdim=True)
    return where.gather(-1, chunk) + chunk * ARGMAX_CHUNK


def _compute_dtype(model) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class StaticDecoder:
    """Greedy decoding of `batch` sequences of up to `max_len` tokens (prompt + generated) on a static cache.
    On CUDA the decode step is a CUDA graph (use_graph) captured on the first run() and replayed on every
    later one (same batch, any prompt of any length that fits). compile=True: torch.compile the step first
    (mode "default": fused elementwise kernels, cuBLAS matmuls; takes a while on the first run)."""

    def __init__(self, model, batch: int, max_len: int, use_graph: bool = True, compile: bool = False):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            raise ValueError(f"static decode supports attn_implementation sdpa or eager, not {impl!r}")
        self.model = model
        self.device = next(model.parameters()).device
        self.is_cuda = self.device.type == "cuda"
        self.batch = int(batch)
        self.max_len = _round_up(int(max_len), 64)  # a mask row of whole 128-byte lines: SDPA's fused kernels
        self.dtype = _compute_dtype(model)
        self.use_graph = bool(use_graph) and self.is_cuda
        self.compile = bool(compile)
        self.cache = StaticKVCache(self.max_len)
        d = self.device
        self.tok = torch.zeros(self.batch, 1, dtype=torch.long, device=d)  # the token fed to the next step
        self.pos = torch.zeros(1, dtype=torch.long, device=d)              # its position
        self.slots = torch.arange(self.max_len, device=d)
        self.open = torch.zeros(1, 1, 1, self.max_len, dtype=self.dtype, device=d)
        self.shut = torch.full((1, 1, 1, self.max_len), torch.finfo(self.dtype).min, dtype=self.dtype, device=d)
        params = inspect.signature(model.forward).parameters
        self._cache_position = "cache_position" in params  # transformers versions that still take it
        self._logits_to_keep = "logits_to_keep" in params
        self.graph: torch.cuda.CUDAGraph | None = None
        self._step_fn = self._step
        self._ready = False
        self.warnings: list[str] = []
        self.mode = "eager"
        self.setup_s = 0.0

    # -- one forward -------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.cache.write_pos = pos
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos.unsqueeze(0).expand(ids.shape[0], -1),
              "past_key_values": self.cache, "use_cache": True}
        if self._cache_position:
            kw["cache_position"] = pos
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1
        return self.model(**kw).logits[:, -1]

    def _step(self) -> None:
        """One decode step, entirely on device tensors (capturable): feed tok at pos, write the argmax back
        into tok, advance pos."""
        mask = torch.where(self.slots.view(1, 1, 1, -1) <= self.pos, self.open, self.shut)
        logits = self._forward(self.tok, self.pos, mask)
        self.tok.copy_(greedy_token(logits))
        self.pos.add_(1)

    def prefill(self, ids: torch.Tensor) -> None:
        """Run the prompt ids [batch, P] through the model, filling cache slots 0..P-1; tok = first new token."""
        b, p = ids.shape
        if b != self.batch:
            raise ValueError(f"this decoder was built for batch {self.batch}, got {b}")
        pos = torch.arange(p, device=self.device)
        mask = torch.where(self.slots.view(1, -1) <= pos.view(-1, 1), self.open.view(1, -1), self.shut.view(1, -1))
        logits = self._forward(ids.to(self.device), pos, mask.view(1, 1, p, self.max_len))
        self.tok.copy_(greedy_token(logits))
        self.pos.fill_(p)
        self.cache.seen = p

    # -- setup: warm-up, compile, capture ----------------------------------------------------------
    def _setup(self, ids: torch.Tensor) -> None:
        t = time.perf_counter()
        self._ready = True
        if self.compile:
            try:
                self._step_fn = torch.compile(self._step, mode="default", dynamic=False)
            except Exception as e:  # noqa: BLE001
                self._warn(f"torch.compile unavailable ({type(e).__name__}: {str(e)[:200]}); stepping uncompiled")
                self._step_fn, self.compile = self._step, False
        if not self.is_cuda and not self.compile:
            self.setup_s = time.perf_counter() - t
            return
        self.prefill(ids)
        try:
            if self.is_cuda:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_STEPS):
                        self._step_fn()
                        self.cache.seen += 1
                torch.cuda.current_stream(self.device).wait_stream(side)
                torch.cuda.synchronize(self.device)
            else:
                for _ in range(WARMUP_STEPS):
                    self._step_fn()
        except Exception as e:
            if not self.compile:
                raise
            self._warn(f"compiled decode step failed ({type(e).__name__}: {str(e)[:300]}); stepping uncompiled")
            self._step_fn, self.compile = self._step, False
            self.prefill(ids)
            if self.is_cuda:
                for _ in range(WARMUP_STEPS):
                    self._step()
                torch.cuda.synchronize(self.device)
        if self.use_graph:
            self.prefill(ids)  # state the capture starts from (capture itself runs no kernel)
            g = torch.cuda.CUDAGraph()
            # An earlier decoder's graph freed by Python's cycle collector during the capture would be destroyed
            # there, which CUDA does not permit: it invalidated a capture once (benchmarks/RESULTS.md, session 12).
            # So collect first, and not during the capture.
            gc.collect()
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(g):
                    self._step_fn()
                self.graph = g
            except Exception as e:  # noqa: BLE001
                self.graph = None
                self._warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:300]}); eager decode steps")
                try:
                    torch.cuda.synchronize(self.device)
                except Exception as e2:  # noqa: BLE001
                    self._warn(f"after the failed capture: {type(e2).__name__}: {str(e2)[:200]}")
            finally:
                if collecting:
                    gc.enable()
        self.mode = ("compiled+" if self.compile else "") + ("cuda_graph" if self.graph is not None else "eager")
        self.setup_s = time.perf_counter() - t

    def _warn(self, msg: str) -> None:
        log.warning(msg)
        self.warnings.append(msg)

    # -- a timed generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict]:
        """Greedy-generate new_tokens (>= 1) after input_ids [batch, P]: one prefill (gives the first token)
        and new_tokens - 1 decode steps. Returns (tokens [batch, new_tokens], timings: prefill_ms, step_ms
        (one per decode step), timer, mode, setup_s (first run only), warnings)."""
        ids = input_ids.to(self.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        p = ids.shape[1]
        if new_tokens < 1 or p + new_tokens > self.max_len:
            raise ValueError(f"{p} prompt + {new_tokens} new tokens do not fit max_len {self.max_len}")
        with grouped_decode_attention():
            return self._run(ids, new_tokens)

    def _run(self, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict]:
        p = ids.shape[1]
        first = not self._ready
        if first:
            self._setup(ids)
        out = torch.empty(self.batch, new_tokens, dtype=torch.long, device=self.device)
        if self.is_cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * new_tokens)]
            ev[0].record()
            self.prefill(ids)
            ev[1].record()
            out[:, 0] = self.tok[:, 0]
            for i in range(1, new_tokens):
                ev[2 * i].record()
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step_fn()
                ev[2 * i + 1].record()
                out[:, i] = self.tok[:, 0]
                self.cache.seen += 1
            torch.cuda.synchronize(self.device)
            ms = [ev[2 * i].elapsed_time(ev[2 * i + 1]) for i in range(new_tokens)]
        else:
            t = time.perf_counter()
            self.prefill(ids)
            ms = [(time.perf_counter() - t) * 1e3]
            out[:, 0] = self.tok[:, 0]
            for i in range(1, new_tokens):
                t = time.perf_counter()
                self._step_fn()
                ms.append((time.perf_counter() - t) * 1e3)
                out[:, i] = self.tok[:, 0]
                self.cache.seen += 1
        timings = {"prefill_ms": ms[0], "step_ms": ms[1:], "timer": "cuda_events" if self.is_cuda else "perf_counter",
                   "mode": self.mode, "batch": self.batch, "prompt_len": p, "max_len": self.max_len,
                   "setup_s": self.setup_s if first else 0.0, "warnings": list(self.warnings)}
        return out, timings


def decode(model, input_ids: torch.Tensor, new_tokens: int, use_graph: bool = True, compile: bool = False,
           max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy-generate new_tokens after input_ids ([P] or [batch, P]) with a fresh StaticDecoder (its setup,
    i.e. warm-up and capture on CUDA, is not in the timings). Returns (tokens [batch, new_tokens], timings)."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    dec = StaticDecoder(model, ids.shape[0], max_len or ids.shape[1] + new_tokens, use_graph, compile)
    return dec.run(ids, new_tokens)
