"""Merged projections for decoding: q/k/v as one linear, gate/up as one.

At batch 1 a decode step is a chain of matrix-vector products, one kernel each, and a small product pays a launch,
a ramp-up and a tail for few bytes: on an H100, Llama-3-8B's 4096 -> 1024 k and v projections reach about a third
of the bandwidth of the big ones, in bf16 (cuBLAS) as in 4 bits (benchmarks/RESULTS.md). Linears that read the
same input can be stacked into one wider product: q/k/v of an attention block, gate/up of a gated MLP, as vLLM and
TensorRT-LLM load them. merge_projections(model) does that in place:

  - for each group it builds one module of the group's own type (nn.Linear, QuantLinear, W8A8Linear, FP8Linear:
    every weight tensor of these is [out_features, ...], so stacking is concatenating along dim 0), and the group's
    modules keep their tensors as row slices of the stacked ones: no second copy of the weights, state_dict and
    the checkpoint format unchanged (the stacked module is a plain attribute, not a submodule);
  - the attention block and the MLP get a forward that runs the stacked module and splits its output; everything
    else is the transformers forward it replaces (Llama-style attention: rotary embedding, cache update, the
    configured attention function, o_proj). At one token on CUDA a 4-bit q/k/v GEMV also rotates q and k and
    writes the KV cache, and a 4-bit gate/up GEMV of a silu MLP writes silu(gate) * up
    (core.kernels.dispatch.rope_matmul / glu_matmul);
  - a decoder layer of DECODER_CLASSES (transformers' Llama forward) whose attention and MLP are merged hands its
    two residual adds to them, so that o_proj's and down_proj's kernels make them (core.fusion.linear_residual).

Attention is merged for transformers' Llama, Mistral, Qwen2 and Qwen3 attention classes (ATTENTION_CLASSES; others
keep their forward), and a block only if its new forward gives its own forward's outputs (and cache writes) on a
random probe, to float rounding (one wider product may sum in another order).
Groups of mixed types (e.g. a layer left in float beside quantized ones), different input widths or hooked modules
(accelerate's offloading) are left alone. unmerge(model) gives every module its own storage back.

The latency measurement merges every model it times on CUDA (core.measure.latency), float and compressed alike,
so each setting is compared with the same decode structure.
"""
from __future__ import annotations

import logging
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import MERGED, SILU, SPLIT, linear_residual, mlp_forward, set_mlp_forward
from .quant.linear import QuantLinear
from .quant.w8a8 import FP8Linear, W8A8Linear

log = logging.getLogger(__name__)

ATTENTION = ("q_proj", "k_proj", "v_proj")
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
DECODER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")  # one forward
DECODER = "_slimlm_decoder"  # a decoder layer given _decoder_forward
RESIDUAL = "_slimlm_residual"  # the keyword _decoder_forward passes the residual to the attention forward under
MLP = ("gate_proj", "up_proj")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _empty(m: nn.Module, out_features: int) -> nn.Module | None:
    """A module like `m` with `out_features` outputs, its tensors on the meta device (to be replaced)."""
    bias = getattr(m, "bias", None) is not None
    if type(m) is nn.Linear:
        return nn.Linear(m.in_features, out_features, bias=bias, device="meta", dtype=m.weight.dtype)
    if type(m) is QuantLinear:
        return QuantLinear(m.in_features, out_features, m.bits, m.group_size, m.symmetric, bias=bias, device="meta")
    if type(m) in (W8A8Linear, FP8Linear):
        return type(m)(m.in_features, out_features, bias=bias, device="meta")
    return None


def _tensors(m: nn.Module) -> dict[str, torch.Tensor | None]:
    return {**m._parameters, **m._buffers}


def _rebind(m: nn.Module, name: str, t: torch.Tensor) -> None:
    """Set a registered parameter or buffer to `t` (a parameter stays a parameter)."""
    if name in m._parameters:
        m._parameters[name] = nn.Parameter(t, requires_grad=m._parameters[name].requires_grad)
    else:
        m._buffers[name] = t


def _stackable(mods: list[nn.Module]) -> bool:
    first = mods[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features or list(m.children())
           or any(getattr(m, h, None) for h in _HOOKS) or getattr(m, "fast", True) != getattr(first, "fast", True)
           for m in mods):
        return False
    if type(first) is QuantLinear and any((m.bits, m.group_size, m.symmetric) !=
                                          (first.bits, first.group_size, first.symmetric) for m in mods):
        return False
    ref = _tensors(first)
    for m in mods:
        ts = _tensors(m)
        if ts.keys() != ref.keys():
            return False
        for name, t in ts.items():
            r = ref[name]
            if (t is None) != (r is None):
                return False
            if t is not None and (type(t) not in (torch.Tensor, nn.Parameter)  # a tensor subclass: torchao, 2:4
                                  or t.shape[0] != m.out_features or t.shape[1:] != r.shape[1:] or t.dtype != r.dtype
                                  or t.device != r.device):
                return False
    return True


@torch.no_grad()
def stack_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([m(x) for m in mods], -1), or None if they cannot be stacked. The modules'
    tensors become row slices of the stacked module's (no second copy)."""
    if not mods or not _stackable(mods):
        return None
    stacked = _empty(mods[0], sum(m.out_features for m in mods))
    if stacked is None:
        return None
    if hasattr(mods[0], "fast"):
        stacked.fast = mods[0].fast
    with torch.inference_mode(False):  # called under inference mode too (latency): keep ordinary tensors
        for name, t in _tensors(mods[0]).items():
            if t is None:
                continue
            _rebind(stacked, name, torch.cat([getattr(m, name) for m in mods]))
            start, whole = 0, getattr(stacked, name)
            for m in mods:
                _rebind(m, name, whole.detach()[start:start + m.out_features])
                start += m.out_features
    return stacked


@torch.no_grad()
def _unstack(mods: list[nn.Module]) -> None:
    with torch.inference_mode(False):
        for m in mods:
            for name, t in _tensors(m).items():
                if t is not None:
                    _rebind(m, name, t.detach().clone())


# --- forwards --------------------------------------------------------------------------------------------------

def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       **kwargs):
    """transformers' Llama-style attention forward with q/k/v from one stacked product; also the variants that norm
    each head of q and k before the rotary embedding (Qwen3's q_norm / k_norm) or pass a sliding window (Qwen2,
    Mistral): the probe in _merge_block checks the result against the block's own forward."""
    fns = self._slimlm_fns
    residual = kwargs.pop(RESIDUAL, None)  # _decoder_forward's: returned as residual + o_proj(...)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    stacked = getattr(self, MERGED)
    cos, sin = position_embeddings
    sizes = getattr(self, SPLIT)
    heads, kv_heads = sizes[0] // self.head_dim, sizes[1] // self.head_dim
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    fused = qkv = None
    if (fns.standard_rope and q_norm is None and k_norm is None and past_key_values is not None
            and hasattr(past_key_values, "update_rotary")):
        # slimlm's static cache: rotary embedding and cache write as one kernel (core.kernels.rope_cache), or in
        # the epilogue of a quantized q/k/v GEMV (one token)
        if isinstance(stacked, QuantLinear) and hidden_states.is_cuda:
            fused = past_key_values.project_rotary(hidden_states, stacked, cos, sin, self.layer_idx, heads, kv_heads)
        if fused is None:
            qkv = stacked(hidden_states)
            fused = past_key_values.update_rotary(qkv, cos, sin, self.layer_idx, heads, kv_heads)
    if fused is not None:
        q, k, v = fused
    else:
        qkv = stacked(hidden_states) if qkv is None else qkv
        q, k, v = (t.view(hidden_shape) for t in qkv.split(sizes, dim=-1))
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        q, k = fns.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
    attention = fns.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          fns.eager_attention_forward)
    kwargs.setdefault("sliding_window", getattr(self, "sliding_window", getattr(self.config, "sliding_window", None)))
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                             self.attention_dropout, scaling=self.scaling, **kwargs)
    return linear_residual(self.o_proj, out.reshape(*input_shape, -1).contiguous(), residual), weights


def _decoder_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                     use_cache=False, position_embeddings=None, **kwargs):
    """transformers' Llama decoder layer forward (DECODER_CLASSES share it) for a layer whose attention and MLP are
    merged: the two residual adds go to their forwards, which let o_proj's and down_proj's kernels make them
    (core.fusion.linear_residual): two kernels fewer per layer in the uncompiled CUDA decode loop."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **{RESIDUAL: residual}, **kwargs)
    return mlp_forward(self.mlp, self.post_attention_layernorm(hidden_states), residual=hidden_states)


def _merge_decoder(layer: nn.Module) -> bool:
    """_decoder_forward for a transformers decoder layer of DECODER_CLASSES whose attention and MLP run core.merge's
    forwards and nothing is hooked."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if (type(layer).__name__ not in DECODER_CLASSES or not type(layer).__module__.startswith("transformers.models.")
            or DECODER in layer.__dict__ or attn is None or mlp is None
            or getattr(attn.__dict__.get("forward"), "__func__", None) is not _attention_forward
            or getattr(mlp.__dict__.get("forward"), "__func__", None) is not mlp_forward
            or any(getattr(m, h, None) for m in (layer, attn, mlp, layer.post_attention_layernorm) for h in _HOOKS)):
        return False
    object.__setattr__(layer, DECODER, True)
    layer.forward = types.MethodType(_decoder_forward, layer)
    return True


def merged_decoder_layers(model: nn.Module) -> int:
    """How many decoder layers run _decoder_forward."""
    return sum(DECODER in m.__dict__ for m in model.modules())


class _RecordingCache:
    """A cache for the probe: update() returns what it is given and keeps it."""

    def __init__(self):
        self.written = []

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.written += [k, v]
        return k, v


def _near(got: torch.Tensor, ref: torch.Tensor) -> bool:
    got, ref = got.float(), ref.float()
    return got.shape == ref.shape and bool((got - ref).abs().max() <= 2 ** -6 * ref.abs().max() + 1e-6)


def _device(m: nn.Module) -> torch.device:
    return next(iter([*m.parameters(), *m.buffers()])).device


def _attention_ok(attn: nn.Module, dtype: torch.dtype) -> bool:
    """The merged forward reproduces the block's own on a 3-token probe: output and cache writes."""
    device = _device(attn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, attn.q_proj.in_features, generator=g).to(device, dtype)
    angle = torch.randn(1, 3, attn.head_dim, generator=g).to(device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    outs = []
    for forward in (type(attn).forward, _attention_forward):
        cache = _RecordingCache()
        try:
            y = forward(attn, x, position_embeddings=(cos, sin), attention_mask=None, past_key_values=cache)
        except (RuntimeError, TypeError, ValueError, AttributeError, KeyError):
            return False
        outs.append([y[0] if isinstance(y, tuple) else y, *cache.written])
    return len(outs[0]) == len(outs[1]) and all(_near(a, b) for a, b in zip(outs[1], outs[0]))


def _mlp_ok(mlp: nn.Module, dtype: torch.dtype) -> bool:
    """Three tokens and one (a quantized MLP's batch-1 step takes the gate/up GEMV with silu on CUDA)."""
    device = _device(mlp)
    x = torch.randn(1, 3, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    try:
        return all(_near(mlp_forward(mlp, t), type(mlp).forward(mlp, t)) for t in (x, x[:, :1]))
    except (RuntimeError, TypeError, ValueError):
        return False


@torch.no_grad()
def _is_silu(act) -> bool:
    t = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4
    try:
        return torch.equal(act(t), F.silu(t))
    except (RuntimeError, TypeError, ValueError):
        return False


def _attention_fns(attn: nn.Module):
    """The functions the block's own module uses (rotary, attention registry), for the attention classes whose
    forward _attention_forward reproduces. A probe cannot stand in for this list: what other classes add (Gemma2's
    logit soft-capping, OLMo's clamped q/k/v, attention sinks) changes nothing at a random probe's small scores."""
    if type(attn).__name__ not in ATTENTION_CLASSES or not type(attn).__module__.startswith("transformers.models."):
        return None
    ns = sys.modules.get(type(attn).__module__)
    names = ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
    if ns is None or not all(hasattr(ns, n) for n in names) or not all(
            hasattr(attn, a) for a in ("head_dim", "layer_idx", "config", "scaling", "o_proj")):
        return None
    fns = types.SimpleNamespace(**{n: getattr(ns, n) for n in names})
    fns.standard_rope = _standard_rope(fns.apply_rotary_pos_emb)
    return fns


@torch.no_grad()
def _standard_rope(apply) -> bool:
    """Whether the module's rotary function is q * cos + rotate_half(q) * sin over the whole head (Llama's), the
    form core.kernels.rope_cache computes."""
    g = torch.Generator().manual_seed(0)
    q, k, cos, sin = (torch.randn(shape, generator=g) for shape in ((1, 2, 3, 8), (1, 1, 3, 8), (1, 3, 8), (1, 3, 8)))

    def ref(x):
        return x * cos[:, None] + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin[:, None]

    try:
        got = apply(q, k, cos, sin)
    except (RuntimeError, TypeError, ValueError):
        return False
    return len(got) == 2 and torch.equal(got[0], ref(q)) and torch.equal(got[1], ref(k))


def _merge_block(block: nn.Module, names: tuple[str, ...], dtype: torch.dtype) -> bool:
    mods = [getattr(block, n, None) for n in names]
    if not all(isinstance(m, nn.Module) for m in mods):
        return False
    attention = names == ATTENTION
    fns = _attention_fns(block) if attention else None
    if attention and fns is None:
        return False
    if not attention and not (callable(getattr(block, "act_fn", None))
                              and isinstance(getattr(block, "down_proj", None), nn.Module)):
        return False
    stacked = stack_linears(mods)
    if stacked is None:
        return False
    if attention:
        block._slimlm_fns = fns
    else:
        object.__setattr__(block, SILU, _is_silu(block.act_fn))
    object.__setattr__(block, MERGED, stacked)  # not a submodule: state_dict, .modules() and memory sums unchanged
    object.__setattr__(block, SPLIT, [m.out_features for m in mods])
    if (_attention_ok if attention else _mlp_ok)(block, dtype):
        if attention:
            block.forward = types.MethodType(_attention_forward, block)
        else:
            set_mlp_forward(block)
        return True
    log.info("merge: %s's merged forward differs from its own; left unmerged", type(block).__name__)
    _drop(block, mods)
    return False


def _drop(block: nn.Module, mods: list[nn.Module]) -> None:
    _unstack(mods)
    for attr in (MERGED, SPLIT, SILU, "_slimlm_fns"):
        block.__dict__.pop(attr, None)


def merge_projections(model: nn.Module) -> list[str]:
    """Stack q/k/v and gate/up wherever the result equals the model's own forward (see the module docstring);
    returns the names of the merged blocks. Idempotent."""
    from .measure.decode import _compute_dtype

    dtype, merged = _compute_dtype(model), []
    for name, block in model.named_modules():
        if MERGED in block.__dict__:
            continue
        for names in (ATTENTION, MLP):
            if all(isinstance(getattr(block, n, None), nn.Module) for n in names) and _merge_block(block, names, dtype):
                merged.append(name)
    for layer in model.modules():
        _merge_decoder(layer)
    return merged


def unmerge(model: nn.Module) -> None:
    """Undo merge_projections: every module owns its tensors again and runs its own forward (or core.fusion's)."""
    for block in model.modules():
        if block.__dict__.pop(DECODER, None):
            block.__dict__.pop("forward", None)
        if MERGED not in block.__dict__:
            continue
        names = ATTENTION if block.__dict__.get("_slimlm_fns") is not None else MLP
        _drop(block, [getattr(block, n) for n in names])
        if names == ATTENTION:
            block.__dict__.pop("forward", None)
        else:
            set_mlp_forward(block)
