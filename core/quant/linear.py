"""QuantLinear: an nn.Linear replacement that stores a QuantizedWeight as buffers, and RTN over a model.

Buffers (what state_dict / .to() / memory accounting see): `packed` uint8, `scales` float16, `zeros` uint8
(asymmetric only), plus an optional float `bias` parameter. forward() dequantizes to the input dtype and
calls F.linear: the reference path that faster kernels must match. On CUDA, forward() goes through
core.kernels.quant_matmul, which runs a Triton kernel for 4/8-bit weights and fp16/bf16 inputs and the reference
path for everything else.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from ..kernels import quant_matmul
from .packing import packed_size
from .rtn import QuantizedWeight, effective_group_size, quantize_rtn, relative_error

Progress = Callable[[str, int, int], None]


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 symmetric: bool = True, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.fast = True  # False: always the reference path (dequantize + F.linear), e.g. to time or check it
        self.group_size = effective_group_size(in_features, group_size)
        n_groups = -(-in_features // self.group_size)
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("packed", torch.zeros(out_features, packed_size(in_features, bits), **u8))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, n_groups, **u8))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedWeight) -> "QuantLinear":
        out_f, in_f = qweight.shape
        if (out_f, in_f) != (linear.out_features, linear.in_features):
            raise ValueError(f"quantized shape {qweight.shape} does not match {linear}")
        m = cls(in_f, out_f, qweight.bits, qweight.group_size, qweight.symmetric, bias=False, device="meta")
        m.packed, m.scales, m.zeros = qweight.packed, qweight.scales, qweight.zeros
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.packed, (self.out_features, self.in_features), self.bits, self.group_size,
                               self.symmetric, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and getattr(self, "fast", True):
            return quant_matmul(x, self)  # Triton kernel where one applies (4/8-bit, fp16/bf16), else the reference
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize to x's dtype, then F.linear: the oracle the kernels are tested against."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.qweight.dequantize(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # model.half()/.to(bf16) casts float buffers; keep scales float16 and only follow the device move.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.scales.device)
        return self

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == self.in_features else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"{'sym' if self.symmetric else 'asym'}, bias={self.bias is not None}")


def find_linears(model: nn.Module, skip: list[str] = ()) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear with a float weight whose qualified name contains none of `skip`
    (bitsandbytes layers subclass nn.Linear but hold int weights, so they are left out)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.is_floating_point() and not any(s in name for s in skip)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _untie(model: nn.Module, names: set[str]) -> None:
    """Stop transformers from re-tying the replaced layers' weights (e.g. lm_head -> embed_tokens) later."""
    for module in model.modules():
        tied = getattr(module, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            for key in [k for k, v in tied.items() if k.rsplit(".", 1)[0] in names or v.rsplit(".", 1)[0] in names]:
                tied.pop(key)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
        if text_config is not None and text_config is not config:
            text_config.tie_word_embeddings = False


def replace_linear(model: nn.Module, name: str, linear: nn.Linear, new: nn.Module, w_hat: torch.Tensor,
                   bits: int, group_size: int | None, nbytes: int, **extra) -> dict:
    """Swap `name` for `new` (any nn.Linear replacement) and return its per-layer record. `w_hat` is the weight
    `new` effectively computes with; `nbytes` what its weight costs (bias, unchanged, excluded on both sides)."""
    w = linear.weight.detach()
    record = {
        "name": name,
        "shape": [w.shape[0], w.shape[1]],
        "bits": bits,
        "group_size": group_size,
        "rel_error": relative_error(w, w_hat),
        "bytes": nbytes,
        "orig_bytes": w.numel() * w.element_size(),
        **extra,
    }
    _set_module(model, name, new)
    return record


def replace_with_quantized(model: nn.Module, name: str, linear: nn.Linear, qweight: QuantizedWeight,
                           w_hat: torch.Tensor | None = None) -> dict:
    """Swap `name` for a QuantLinear and return its record. Methods other than RTN reuse this. w_hat: the
    dequantized weight when the caller has it already (qweight.dequantize() otherwise)."""
    q = QuantLinear.from_linear(linear, qweight)
    if w_hat is None:
        w_hat = qweight.dequantize(torch.float32)
    # qweight.nbytes: codes + scales + zeros
    return replace_linear(model, name, linear, q, w_hat, qweight.bits, qweight.group_size, qweight.nbytes)


def shared_weight_names(model: nn.Module, names: list[str]) -> set[str]:
    """Which of these modules' weights are also referenced elsewhere (tied)."""
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return {n for n in names if count.get(id(model.get_submodule(n).weight), 0) > 1}


def convert_linears(model: nn.Module, skip, convert: Callable[[str, nn.Linear], dict], stage: str,
                    progress: Progress | None = None) -> list[dict]:
    """Call `convert(name, linear)` (which swaps the layer and returns its record) on every float nn.Linear not
    matched by `skip`, reporting progress as `stage`; returns the records."""
    layers = find_linears(model, skip)
    if not layers:
        raise UnsupportedError(f"{stage.upper()} found no floating-point linear layers to quantize (skip={skip}).")
    tied = shared_weight_names(model, [n for n, _ in layers])
    records = []
    for i, (name, linear) in enumerate(layers):
        if progress:
            progress(stage, i, len(layers))
        with torch.no_grad():
            records.append(convert(name, linear))
    if progress:
        progress(stage, len(layers), len(layers))
    if tied:
        _untie(model, tied)  # the other owner (e.g. the embedding) keeps its float weight
    return records


def quantize_model_rtn(model: nn.Module, step, progress: Progress | None = None) -> list[dict]:
    """Replace each float nn.Linear not matched by step.skip with an RTN QuantLinear; returns per-layer records."""
    def convert(name: str, linear: nn.Linear) -> dict:
        qw = quantize_rtn(linear.weight, step.bits, step.group_size, step.symmetric)
        return replace_with_quantized(model, name, linear, qw)

    return convert_linears(model, step.skip, convert, "rtn", progress)
