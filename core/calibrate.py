"""One sequential, layer-by-layer calibration pass shared by every calibrated method (GPTQ; later AWQ,
SmoothQuant, Wanda, SparseGPT).

1. Capture: each calibration window runs through the model once with every decoder layer's forward swapped for
   a stub that records its (args, kwargs) and passes the hidden states through. That gives layer 0's inputs and
   each layer's own extra inputs (attention mask, position embeddings: they differ between layers in e.g.
   Gemma 3 or sliding-window Qwen2) without computing any layer; the last stub stops the forward.
2. For each layer: move it to the device, run every window through it with pre-hooks on its linears feeding
   the method's observe(), let the method's apply() compress the layer, run the windows through the compressed
   layer (so the next layer sees this one's error), move it back.

Only one layer, the windows' hidden states and the method's statistics are on the device at any time;
embeddings, final norm and lm_head stay where they are.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
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


class Observer:
    """What a calibrated method plugs in. observe() accumulates statistics for one linear from a batch of its
    inputs x [..., in_features] (on the device, the model's dtype); apply() compresses the layer from them, may
    replace ctx.linears (by model-level name) and returns per-layer records, freeing the statistics it used."""

    name = "calibrate"
    skip: tuple[str, ...] | list[str] = ()  # substrings of model-level linear names to leave alone

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


def run_calibrated(model: nn.Module, windows: torch.Tensor, method: Observer, device="cpu",
                   progress: Callable | None = None) -> tuple[list[dict], dict]:
    """Run the calibration pass for `method` on windows ([n, window_len] token ids).

    stats: seconds; peak_bytes: torch.cuda.max_memory_allocated on a CUDA device (it includes what was there
    before: device_start_bytes, e.g. the cuBLAS workspace or a model kept on the GPU), else tracked_peak_bytes;
    tracked_peak_bytes = max over layers of the layer's bytes + the cached hidden states and layer inputs +
    the method's statistics + one window's output (transient tensors inside one forward are not counted).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    prefix, layers = find_decoder_layers(model)
    hidden, calls = _capture(model, prefix, layers, windows)
    hidden, calls = _to((hidden, calls), device, {})
    act_bytes = tensor_bytes(_tensors((hidden, calls)))
    records: list[dict] = []
    tracked = 0
    for i, layer in enumerate(layers):
        if progress:
            progress(method.name, i, len(layers))
        if calls[i] is None:
            continue
        home = _home(layer, device)
        layer.to(device)
        name = f"{prefix}.{i}"
        linears = calibration_targets(layer, name, method.skip)

        def run(layer=layer, c=calls[i]):
            with torch.no_grad():
                return [_run(layer, h, t) for h, t in zip(hidden, c)]

        with torch.no_grad():
            if linears:
                _observe(layer, linears, method, hidden, calls[i])
            stats_bytes = method.nbytes()
            layer_bytes = module_bytes(layer)
            if linears:
                records += method.apply(LayerContext(model, i, name, layer, linears, device, run))
            if i < len(layers) - 1:  # the last layer's outputs feed nothing here
                with _dequantized(layer, hidden[0].dtype):
                    for w, t in enumerate(calls[i]):
                        hidden[w] = _run(layer, hidden[w], t)
        tracked = max(tracked, layer_bytes + act_bytes + stats_bytes + tensor_bytes([hidden[-1]]))
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
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
    }
    return records, stats
