"""Round-to-nearest (RTN) weight quantization and the generic quantized-weight format.

Pure functions on tensors. Format (shared by every weight-only method: RTN, GPTQ, AWQ, ...):
  codes   uint8 in [0, 2**bits - 1], packed row-wise with core.quant.packing (each row starts on a byte)
  scales  float16 [out, n_groups], n_groups = ceil(in / group_size); the last group may be shorter
  zeros   uint8 [out, n_groups] for asymmetric; None for symmetric (implicit zero 2**(bits-1))
  w_hat = (code - zero) * scale
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_bits, unpack_bits


@dataclass
class QuantizedWeight:
    packed: torch.Tensor  # uint8 [out, packed_size(in, bits)]
    shape: tuple[int, int]  # (out, in)
    bits: int
    group_size: int  # effective: == in_features for per-output-channel
    symmetric: bool
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor | None  # uint8 [out, n_groups], None when symmetric

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.bits, self.group_size).to(dtype)


def effective_group_size(in_features: int, group_size: int | None) -> int:
    return in_features if group_size is None or group_size >= in_features else int(group_size)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size]; a short last group is padded by repeating its last column,
    which leaves that group's min/max/absmax unchanged."""
    out, n = w.shape
    pad = -n % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out, -1, group_size)


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Round positive float32 up to float16, so the stored scale still covers the group's range
    (rounding it down could push the extreme values one step past the clamp)."""
    h = x.clamp(max=torch.finfo(torch.float16).max).half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def compute_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scales (float16 [out, G]) and zeros (uint8 [out, G] or None) from min/max of each group."""
    g = group_view(w.float(), group_size)
    if symmetric:
        scale = g.abs().amax(-1) / (2 ** (bits - 1) - 1)
    else:
        # the range always includes 0, so that 0.0 is exactly representable
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
    scale = _fp16_ceil(torch.where(scale > 0, scale, torch.ones_like(scale)))  # all-zero group -> scale 1
    if symmetric:
        return scale, None
    return scale, torch.round(-lo / scale.float()).clamp(0, 2**bits - 1).to(torch.uint8)


def _expand(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, G] per-group values -> [out, in] per-element (float32)."""
    return t.float().repeat_interleave(group_size, dim=1)[:, :in_features]


def _zero_point(zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor | float:
    return float(2 ** (bits - 1)) if zeros is None else _expand(zeros, group_size, in_features)


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Round w [out, in] to uint8 codes on a given grid (GPTQ-style methods call this column block by block)."""
    w = w.float()
    q = torch.round(w / _expand(scales, group_size, w.shape[1])) + _zero_point(zeros, bits, group_size, w.shape[1])
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """uint8 codes [out, in] -> float32 weights. Broadcasts per-group scales over a [out, G, group] view
    (no per-element expansion), since this runs on every forward of a QuantLinear."""
    out, n = codes.shape
    pad = -n % group_size
    c = codes.float()
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(out, -1, group_size)
    zero = float(2 ** (bits - 1)) if zeros is None else zeros.float().unsqueeze(-1)
    w = ((c - zero) * scales.float().unsqueeze(-1)).view(out, -1)
    return w[:, :n] if pad else w


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> QuantizedWeight:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    w = weight.detach().float()
    gs = effective_group_size(w.shape[1], group_size)
    scales, zeros = compute_qparams(w, bits, gs, symmetric)
    codes = quantize_codes(w, scales, zeros, bits, gs)
    return QuantizedWeight(pack_bits(codes, bits), tuple(w.shape), bits, gs, symmetric, scales, zeros)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Quantize then dequantize, in the weight's dtype."""
    return quantize_rtn(weight, bits, group_size, symmetric).dequantize(weight.dtype)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||w - w_hat||_F / ||w||_F (computed in float64)."""
    w, w_hat = w.detach().double(), w_hat.detach().double()
    return float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w).clamp(min=1e-300))
