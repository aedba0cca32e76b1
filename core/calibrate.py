"""One sequential, layer-by-layer calibration pass shared by every calibrated method (GPTQ; later AWQ,
SmoothQuant, Wanda, SparseGPT).

1. Capture: each calibration window runs through the model once with every decoder layer's forward swapped for
   a stub that records its (args, kwargs) and passes the hidden states through. That gives layer 0's inputs and
   each layer's own extra inputs (attention mask, position embeddings: they differ between layers in e.g.
   Gemma 3 or sliding-window Qwen2) without computing any layer; the last stub stops the forward.
2. For each layer: move it to the device, run every window through it with pre-hooks on its linears feeding
   the method's observe(), let the method's apply() compress the layer, run the windows through the compressed
   layer (so the next layer sees this one's error), move it back.
   One-forward mode, for methods that support it (Observer.sequential, e.g. GPTQ) when the batched activations
   fit a budget: all windows run through the layer once, batched, and each group of linears that share one
   input (q/k/v, gate/up) is compressed the moment that input reaches them, so the rest of the forward already
   runs on the compressed weights and its output is the compressed layer's ("true-sequential" GPTQ): one
   forward per layer instead of two.

Only one layer, the windows' hidden states and the method's statistics are on the device at any time, plus, in
the one-forward mode, the batched forward's activations (at most the budget); embeddings, final norm and lm_head
stay where they are.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .errors import UnsupportedError
from .quant.memory_accounting import module_bytes, tensor_bytes

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def is_linear(m: nn.Module) -> bool:
    """A float nn.Linear, or GPT-2's Conv1D (a linear with its weight stored transposed)."""
    return (isinstance(m, nn.Linear) and m.weight.is_floating_point()) or isinstance(m, Conv1D)


def as_linear(m: nn.Module) -> nn.Linear:
    """The module as an nn.Linear (a Conv1D becomes one sharing its transposed weight), so the QuantLinear that
    replaces it (same forward on [..., in] inputs) and its record are built like any linear's."""
    if isinstance(m, nn.Linear):
        return m
    in_f, out_f = m.weight.shape
    lin = nn.Linear(in_f, out_f, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(m.weight.detach().t(), requires_grad=False)
    if m.bias is not None:
        lin.bias = m.bias
    return lin


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder layers: the nn.ModuleList, each of whose blocks holds a linear, with the most
    parameters (model.layers, transformer.h, model.decoder.layers, ...; an MoE experts list lives inside it)."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(any(is_linear(x) for x in b.modules()) for b in m):
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[0]:
                best = (size, name, m)
    if best is None:
        raise UnsupportedError("Found no stack of decoder layers with floating-point linear layers in this model.")
    return best[1], best[2]


def calibration_targets(layer: nn.Module, prefix: str, skip=()) -> dict[str, nn.Module]:
    """Linears of one decoder layer by model-level name, those matching `skip` left out."""
    out = {}
    for n, m in layer.named_modules():
        full = f"{prefix}.{n}"
        if is_linear(m) and not any(s in full for s in skip):
            out[full] = m
    return out


@dataclass
class LayerContext:
    model: nn.Module
    index: int
    name: str  # e.g. "model.layers.3"
    layer: nn.Module  # on the compute device
    linears: dict[str, nn.Module]  # model-level name -> nn.Linear / Conv1D
    device: torch.device
    run: Callable[[], list[torch.Tensor]]  # the layer's outputs for every window with its current weights


ONE_FORWARD_BYTES = 1 << 30  # default budget of the one-forward mode's batched activations (see run_calibrated)


class Observer:
    """What a calibrated method plugs in. observe() accumulates statistics for one linear from a batch of its
    inputs x [..., in_features] (on the device, the model's dtype); apply() compresses the layer from them, may
    replace ctx.linears (by model-level name) and returns per-layer records, freeing the statistics it used.

    sequential: the method also works in the one-forward mode, where apply() is called in the middle of the
    layer's forward on a LayerContext whose linears are one group that shares an input (q/k/v), right after
    observe() got that input for all windows at once; the linears it leaves in the model then run next
    (ctx.run is unavailable). Off by default: the method then sees the whole layer at once, as described."""

    name = "calibrate"
    skip: tuple[str, ...] | list[str] = ()  # substrings of model-level linear names to leave alone
    sequential = False

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        raise NotImplementedError

    def apply(self, ctx: LayerContext) -> list[dict]:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of statistics held now (memory accounting)."""
        return 0


class CalibrationRecords(list):
    """Per-layer records (a plain list to the pipeline) with the pass's `stats` attached."""

    def __init__(self, records, stats: dict):
        super().__init__(records)
        self.stats = stats


class _Stop(Exception):
    pass


def _split(args: tuple, kwargs: dict):
    """A layer call -> (hidden_states, template of the other inputs)."""
    if args:
        return args[0], ((None,) + tuple(args[1:]), kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), ((), kwargs)


def _run(layer: nn.Module, hidden: torch.Tensor, template) -> torch.Tensor:
    args, kwargs = template
    out = layer(hidden, *args[1:], **kwargs) if args else layer(hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except Exception:  # noqa: BLE001 (an object whose == raises or is not a bool: not the same)
        return False


def _to(obj, device, memo: dict):
    """Move the tensors of a nested structure, moving each distinct tensor once (layers share masks etc.)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        items = [_to(x, device, memo) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _capture(model: nn.Module, prefix: str, layers: nn.ModuleList, windows: torch.Tensor):
    """-> (layer-0 hidden states per window, per layer: per window input template or None if never called)."""
    n = len(layers)
    seen: dict[int, tuple] = {}

    def stub(i, *args, **kwargs):
        seen[i] = (args, kwargs)
        if i == n - 1:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]

    saved = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = partial(stub, i)
    hidden, calls = [], [[] for _ in range(n)]
    dev = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for w, ids in enumerate(windows):
                seen.clear()
                try:
                    model(input_ids=ids.view(1, -1).to(dev), use_cache=False)
                except _Stop:
                    pass
                if 0 not in seen:
                    raise UnsupportedError(f"The model's forward never called its first decoder layer ({prefix}.0).")
                hidden.append(_split(*seen[0])[0])
                for i in range(n):
                    t = _split(*seen[i])[1] if i in seen else None
                    if w and t is not None and _same(t, calls[i][0]):
                        t = calls[i][0]  # the same for every window (same length, no padding): keep one copy
                    calls[i].append(t)
    finally:
        for layer, f in zip(layers, saved):
            layer.__dict__.pop("forward", None)
            if f is not None:
                layer.forward = f
    for i, c in enumerate(calls):
        if any(t is None for t in c) and not all(t is None for t in c):
            raise UnsupportedError(f"Decoder layer {prefix}.{i} ran for some calibration windows only.")
    return hidden, [None if c[0] is None else c for c in calls]


@contextmanager
def _dequantized(layer: nn.Module, dtype: torch.dtype):
    """Swap the layer's QuantLinears for float nn.Linears holding their dequantized weights while the windows
    run through it again: the same outputs (QuantLinear's forward is dequantize + F.linear) without unpacking
    the codes once per window."""
    from .quant.linear import QuantLinear, _set_module

    quant = [(n, m) for n, m in layer.named_modules() if isinstance(m, QuantLinear)]
    for n, q in quant:
        lin = nn.Linear(q.in_features, q.out_features, bias=False, device="meta")
        lin.weight = nn.Parameter(q.qweight.dequantize(dtype), requires_grad=False)
        lin.bias = None if q.bias is None else nn.Parameter(q.bias.to(dtype), requires_grad=False)
        _set_module(layer, n, lin)
    try:
        yield
    finally:
        for n, q in quant:
            _set_module(layer, n, q)


def _home(layer: nn.Module, default):
    t = next(iter(layer.parameters()), None)
    if t is None:
        t = next(iter(layer.buffers()), None)
    return default if t is None else t.device


def _observe(layer: nn.Module, linears: dict, method: Observer, hidden: list, calls: list) -> None:
    """Run every window through the layer, feeding its linears' inputs to method.observe. The layer's output is
    not needed here: when the first window showed every linear called exactly once, each later window's
    forward stops (raises _Stop) right after the last of them has been observed, skipping that linear's matmul
    and whatever follows it (the MLP's down projection, ~1/4 of a Llama layer's linear flops)."""
    seen: dict[str, int] = {}
    stop_early = False

    def hook(mod, inp, n):
        method.observe(n, mod, inp[0])
        seen[n] = seen.get(n, 0) + 1
        if stop_early and len(seen) == len(linears):
            raise _Stop

    hooks = [m.register_forward_pre_hook(partial(hook, n=n)) for n, m in linears.items()]
    try:
        for w, (h, t) in enumerate(zip(hidden, calls)):
            seen.clear()
            try:
                _run(layer, h, t)
            except _Stop:
                pass
            if w == 0:
                stop_early = len(seen) == len(linears) and all(c == 1 for c in seen.values())
    finally:
        for hook_ in hooks:
            hook_.remove()


def _probe(layer: nn.Module, linears: dict, hidden: torch.Tensor, template) -> tuple[list[list[str]], int] | None:
    """Run one window through the layer until each linear has been called: -> (the linears grouped by the input
    tensor they were fed, in call order; bytes of their inputs and outputs for this window), or None unless
    every linear was called exactly once (the condition of the one-forward mode)."""
    inputs: dict[str, torch.Tensor] = {}
    twice = False

    def hook(mod, inp, n):
        nonlocal twice
        twice = twice or n in inputs
        inputs[n] = inp[0]
        if twice or len(inputs) == len(linears):
            raise _Stop

    hooks = [m.register_forward_pre_hook(partial(hook, n=n)) for n, m in linears.items()]
    try:
        _run(layer, hidden, template)
    except _Stop:
        pass
    finally:
        for hook_ in hooks:
            hook_.remove()
    if twice or len(inputs) < len(linears):
        return None
    groups: dict[int, list[str]] = {}
    for n, x in inputs.items():
        groups.setdefault(id(x), []).append(n)
    outputs = sum(x.numel() // x.shape[-1] * as_linear(linears[n]).out_features * x.element_size()
                  for n, x in inputs.items())
    return list(groups.values()), tensor_bytes(inputs.values()) + outputs


class _StandIn(nn.Module):
    """Takes a linear's place in the module tree during a one-forward pass (see _compress_in_forward)."""

    def __init__(self, call: Callable):
        super().__init__()
        self.call = call

    def forward(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def _no_run():
    raise RuntimeError("ctx.run is not available in the one-forward mode (Observer.sequential)")


def _compress_in_forward(ctx: LayerContext, method: Observer, groups: list[list[str]], template, hidden: list,
                         stop_when_done: bool) -> tuple[list | None, list[dict], int]:
    """The one-forward mode for one layer: all windows run through it batched (they share one input template),
    with every linear standing in for itself: the first call to a linear of a group observes the group's input
    and lets method.apply() compress the group; each call then runs whatever module sits at the linear's name
    (the compressed one). -> (the layer's outputs per window, or None with stop_when_done (the forward stops
    once every group is compressed), the records in ctx.linears' order, the largest method.nbytes() seen)."""
    from .quant.linear import _set_module

    linears, model = ctx.linears, ctx.model
    group_of = {n: g for g in groups for n in g}
    pending = {id(g) for g in groups}
    records, peak, stand_ins = [], 0, {}

    def compress(names, x):
        nonlocal peak
        if x is not None:
            for n in names:
                method.observe(n, linears[n], x)
            peak = max(peak, method.nbytes())
        records.extend(method.apply(replace(ctx, linears={n: linears[n] for n in names})))

    def call(name, x, *args, **kwargs):
        group = group_of[name]
        if id(group) in pending:
            pending.discard(id(group))
            compress(group, x)
            if stop_when_done and not pending:
                raise _Stop
        current = model.get_submodule(name)
        return (linears[name] if current is stand_ins[name] else current)(x, *args, **kwargs)

    for n in linears:
        stand_ins[n] = _StandIn(partial(call, n))
        _set_module(model, n, stand_ins[n])
    out = None
    try:
        try:
            out = _run(ctx.layer, torch.cat(hidden), template)
        except _Stop:
            pass
    finally:
        for n, s in stand_ins.items():
            if model.get_submodule(n) is s:
                _set_module(model, n, linears[n])
    left = [n for g in groups if id(g) in pending for n in g]
    if left:  # never called in the batched forward: compressed from no statistics (e.g. GPTQ falls back to RTN)
        compress(left, None)
    order = {n: k for k, n in enumerate(linears)}
    records.sort(key=lambda r: order.get(r.get("name"), len(order)))
    if out is None:
        return None, records, peak
    if out.shape[0] != len(hidden):
        raise UnsupportedError(f"The batched forward of {ctx.name} returned {out.shape[0]} windows, not {len(hidden)}.")
    return list(out.split(1)), records, peak


def _one_forward_budget(device: torch.device, batch_bytes: int | None) -> int:
    budget = ONE_FORWARD_BYTES if batch_bytes is None else batch_bytes
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    return budget


def run_calibrated(model: nn.Module, windows: torch.Tensor, method: Observer, device="cpu",
                   progress: Callable | None = None, batch_bytes: int | None = None) -> tuple[list[dict], dict]:
    """Run the calibration pass for `method` on windows ([n, window_len] token ids).

    stats: seconds; peak_bytes: torch.cuda.max_memory_allocated on a CUDA device (it includes what was there
    before: device_start_bytes, e.g. the cuBLAS workspace or a model kept on the GPU), else tracked_peak_bytes;
    tracked_peak_bytes = max over layers of the layer's bytes + the cached hidden states and layer inputs +
    the method's statistics + one window's output (transient tensors inside one forward are not counted).

    One-forward mode (see the module docstring) for a layer when method.sequential, all windows share one input
    template, every linear of the layer is called exactly once per forward (probed on one window, once per
    layer class and set of linears; _probe also groups the linears fed one tensor), and the batched forward's
    activations fit batch_bytes (default ONE_FORWARD_BYTES; on CUDA also at most half the free memory; 0: never).
    Those activations are estimated as windows x (bytes of one window's linear inputs and outputs + attention
    scores, num_attention_heads x window_len^2) + the batched input and output hidden states, and counted in
    tracked_peak_bytes in place of one window's output.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    prefix, layers = find_decoder_layers(model)
    hidden, calls = _capture(model, prefix, layers, windows)
    shared = [c is not None and all(t is c[0] for t in c) for c in calls]  # one input template for all windows
    hidden, calls = _to((hidden, calls), device, {})
    act_bytes = tensor_bytes(_tensors((hidden, calls)))
    records: list[dict] = []
    tracked, one_forward, plans = 0, 0, {}
    budget = _one_forward_budget(device, batch_bytes) if method.sequential else 0
    heads = getattr(getattr(model, "config", None), "num_attention_heads", 0) or 0
    for i, layer in enumerate(layers):
        if progress:
            progress(method.name, i, len(layers))
        if calls[i] is None:
            continue
        home = _home(layer, device)
        layer.to(device)
        name = f"{prefix}.{i}"
        linears = calibration_targets(layer, name, method.skip)

        def run(layer=layer, c=calls[i], hidden=hidden):
            with torch.no_grad():
                return [_run(layer, h, t) for h, t in zip(hidden, c)]

        with torch.no_grad():
            layer_bytes = module_bytes(layer)
            plan, batch = None, 0
            if linears and budget > 0 and shared[i]:
                # a layer of the same class with the same linears calls them the same way: probe the first
                key = (type(layer), tuple(n[len(name):] for n in linears))
                if key not in plans:
                    found = _probe(layer, linears, hidden[0], calls[i][0])
                    if found is not None:
                        plans[key] = [[n[len(name):] for n in g] for g in found[0]], found[1]
                plan = plans.get(key)
                if plan is not None:
                    h = hidden[0]
                    tokens = h.numel() // h.shape[-1]
                    batch = len(hidden) * (plan[1] + heads * tokens**2 * h.element_size()) + 2 * act_bytes
                    plan = plan if batch <= budget else None
            if plan is not None:
                ctx = LayerContext(model, i, name, layer, linears, device, _no_run)
                groups = [[name + n for n in g] for g in plan[0]]
                out, recs, stats_bytes = _compress_in_forward(ctx, method, groups, calls[i][0], hidden,
                                                              stop_when_done=i == len(layers) - 1)
                records += recs
                hidden = out if out is not None else hidden
                one_forward += 1
            else:
                if linears:
                    _observe(layer, linears, method, hidden, calls[i])
                stats_bytes = method.nbytes()
                if linears:
                    records += method.apply(LayerContext(model, i, name, layer, linears, device, run))
                if i < len(layers) - 1:  # the last layer's outputs feed nothing here
                    with _dequantized(layer, hidden[0].dtype):
                        for w, t in enumerate(calls[i]):
                            hidden[w] = _run(layer, hidden[w], t)
                batch = tensor_bytes([hidden[-1]])
        tracked = max(tracked, layer_bytes + act_bytes + stats_bytes + batch)
        layer.to(home)
    if progress:
        progress(method.name, len(layers), len(layers))
    stats = {
        "seconds": time.perf_counter() - t0,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else tracked,
        "peak_source": "cuda.max_memory_allocated" if cuda else "tracked",
        "device_start_bytes": start if cuda else None,  # on CUDA, what the process held there before the pass
        "tracked_peak_bytes": tracked,
        "device": str(device),
        "layers": len(layers),
        "one_forward_layers": one_forward,  # layers calibrated in the one-forward mode (the rest: two forwards)
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
    }
    return records, stats
