"""SparseLinear: compressed storage of a pruned linear, so the memory figure shows the saving.

Formats (buffers are what state_dict, .to() and core.quant.memory_accounting.module_bytes see):
- "bitmask": `mask` uint8 [out, ceil(in/8)] (bit j % 8 of byte j // 8, least significant first, is 1 when
  weight[:, j] is non-zero; core.quant.packing 1-bit layout) + `values` [nnz] (the non-zeros, weight dtype,
  row-major order). Bytes: nnz * itemsize + out * ceil(in/8).
- "nm" (N:M, N non-zeros kept in every M consecutive columns): `values` [out, in*N/M] (weight dtype) +
  `indices` uint8: the position (0..M-1) of each kept value inside its group, ceil(log2 M) bits each (2 bits for
  2:4, like the 2:4 semi-structured metadata), packed with core.quant.packing. Bytes: out*in*N/M * itemsize +
  out * packed_size(in*N/M, bits).
- "semi_structured" (fast=True, CUDA, 2:4, fp16/bf16): torch.sparse.to_sparse_semi_structured (sparse tensor
  cores via cuSPARSELt/CUTLASS); its inner tensors are registered as buffers so module_bytes counts them. Made
  on its device; moving it afterwards is not supported.

forward() of bitmask / nm is the reference path: scatter the values into a dense weight (input dtype), F.linear.
Decoding uses only vectorized ops (bit lookup table, prefix count, index_select / scatter; masked_scatter was
~10x slower on CPU) and, when autograd is off, per-thread scratch buffers reused across layers (allocating a
fresh dense weight per call cost more than decoding it on the 2-core test VM).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import as_linear, is_linear
from ..quant.linear import _set_module, shared_weight_names
from ..quant.memory_accounting import tensor_bytes
from ..quant.packing import pack_bits, packed_size, unpack_bits

FORMATS = ("bitmask", "nm", "semi_structured")
NM_CANDIDATES = ((2, 4), (4, 8))  # (N, M) compact layouts compress_sparse tries, in order of preference


_LUTS: dict[torch.device, torch.Tensor] = {}
_BASES: dict[tuple, torch.Tensor] = {}
_WORKSPACE = threading.local()


def _bits_lut(device) -> torch.Tensor:
    """uint8 [256, 8]: bit j of byte b (the 1-bit layout of core.quant.packing)."""
    lut = _LUTS.get(device)
    if lut is None:
        b = torch.arange(256, device=device)
        lut = _LUTS[device] = ((b[:, None] >> torch.arange(8, device=device)) & 1).to(torch.uint8)
    return lut


def _nm_base(in_f: int, n: int, m: int, device) -> torch.Tensor:
    """int64 [in*n/m]: the first column of each kept value's group."""
    key = (in_f, n, m, device)
    if key not in _BASES:
        _BASES[key] = torch.arange(0, in_f, m, device=device).repeat_interleave(n)
    return _BASES[key]


def _scratch(slot: str, numel: int, dtype: torch.dtype, device, reuse: bool) -> torch.Tensor:
    """A 1-D tensor of numel elements: with reuse, a per-thread buffer kept across calls and layers (grown to
    the largest layer; transient memory like activations, not part of the module's bytes), else a fresh one."""
    if not reuse:
        return torch.empty(numel, dtype=dtype, device=device)
    pool = getattr(_WORKSPACE, "pool", None)
    if pool is None:
        pool = _WORKSPACE.pool = {}
    # tensors made under inference_mode cannot be updated in place outside it (and vice versa): one pool each
    key = (slot, dtype, device, torch.is_inference_mode_enabled())
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def bitmask_bytes(weight: torch.Tensor) -> int:
    out_f, in_f = weight.shape
    return int((weight != 0).sum().item()) * weight.element_size() + out_f * packed_size(in_f, 1)


def nm_bytes(shape, n: int, m: int, itemsize: int) -> int:
    out_f, in_f = shape
    kept = in_f * n // m
    return out_f * kept * itemsize + out_f * packed_size(kept, _index_bits(m))


def fits_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """At most n non-zeros in every m consecutive columns of each row."""
    out_f, in_f = weight.shape
    return in_f % m == 0 and bool(((weight != 0).reshape(out_f, in_f // m, m).sum(-1) <= n).all())


def semi_structured_available(weight: torch.Tensor) -> bool:
    return (weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)
            and hasattr(torch.sparse, "to_sparse_semi_structured"))


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str = "bitmask", n: int | None = None,
                 m: int | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.in_features, self.out_features, self.format, self.n, self.m = in_features, out_features, fmt, n, m
        self.bias = None
        self._ss = None  # the semi-structured weight (fast format)

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str = "bitmask", n: int = 2, m: int = 4) -> SparseLinear:
        """From an nn.Linear (or GPT-2 Conv1D) whose pruned weights are zero. fmt "nm" needs the weight to fit
        n:m; "semi_structured" needs 2:4 and a CUDA fp16/bf16 weight (see semi_structured_available)."""
        lin = as_linear(linear)
        W = lin.weight.detach()
        out_f, in_f = W.shape
        if fmt == "bitmask":
            mod = cls(in_f, out_f, "bitmask")
            nz = W != 0
            mod.register_buffer("mask", pack_bits(nz.to(torch.uint8), 1))
            mod.register_buffer("values", W[nz].clone())
        elif fmt == "nm":
            if not fits_nm(W, n, m):
                raise ValueError(f"weight {tuple(W.shape)} is not {n}:{m} sparse")
            mod = cls(in_f, out_f, "nm", n, m)
            g = W.reshape(out_f, in_f // m, m)
            # the n largest |w| of each group, in column order (zeros fill groups with fewer non-zeros)
            idx = torch.topk(g.abs().float(), n, dim=-1).indices.sort(dim=-1).values
            mod.register_buffer("values", g.gather(-1, idx).reshape(out_f, -1).clone())
            mod.register_buffer("indices", pack_bits(idx.reshape(out_f, -1).to(torch.uint8), _index_bits(m)))
        elif fmt == "semi_structured":
            if not (semi_structured_available(W) and fits_nm(W, 2, 4)):
                raise ValueError("the semi-structured format needs a 2:4-sparse fp16/bf16 weight on a CUDA device")
            mod = cls(in_f, out_f, "semi_structured", 2, 4)
            mod._ss = torch.sparse.to_sparse_semi_structured(W.contiguous())
            for name in mod._ss.__tensor_flatten__()[0]:  # packed values + metadata: counted by module_bytes
                mod.register_buffer(f"ss_{name}", getattr(mod._ss, name), persistent=False)
        else:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if lin.bias is not None:
            mod.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return mod

    def dense_weight(self, dtype: torch.dtype | None = None, reuse: bool = False) -> torch.Tensor:
        """The dense [out, in] weight (reference path). reuse: decode into per-thread scratch buffers shared by
        every SparseLinear (no allocation per call; the result is overwritten by the next call)."""
        if self.format == "semi_structured":
            W = self._ss.to_dense()
            return W if dtype is None else W.to(dtype)
        dtype = dtype or self.values.dtype
        dev = self.values.device
        out_f, in_f = self.out_features, self.in_features
        vals = self.values if self.values.dtype == dtype else self.values.to(dtype)
        if self.format == "bitmask":
            nb = self.mask.numel()
            codes = _scratch("codes", nb, torch.int64, dev, reuse)
            codes.copy_(self.mask.view(-1))
            bits = torch.index_select(_bits_lut(dev), 0, codes, out=_scratch("bits", nb * 8, torch.uint8, dev, reuse)
                                      .view(nb, 8))
            keep = bits.view(out_f, -1)[:, :in_f].reshape(-1)  # 0/1 per weight, row-major
            if vals.numel() == 0:
                return torch.zeros(out_f, in_f, dtype=dtype, device=dev)
            # position of each weight's value among the non-zeros: inclusive prefix count - 1
            pos = torch.cumsum(keep, 0, dtype=torch.int32, out=_scratch("pos", keep.numel(), torch.int32, dev, reuse))
            pos.sub_(1).clamp_min_(0)
            W = torch.index_select(vals, 0, pos, out=_scratch("w", keep.numel(), dtype, dev, reuse))
            return W.mul_(keep).view(out_f, in_f)
        kept = in_f * self.n // self.m
        idx = unpack_bits(self.indices, _index_bits(self.m), kept)
        cols = torch.add(idx, _nm_base(in_f, self.n, self.m, dev),
                         out=_scratch("cols", out_f * kept, torch.int64, dev, reuse).view(out_f, kept))
        W = _scratch("w", out_f * in_f, dtype, dev, reuse).view(out_f, in_f).zero_()
        return W.scatter_(1, cols, vals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.format == "semi_structured" and x.dtype == self._ss.dtype:
            return F.linear(x, self._ss, bias)
        # without autograd nothing keeps the decoded weight after F.linear: decode into shared scratch buffers
        return F.linear(x, self.dense_weight(x.dtype, reuse=not torch.is_grad_enabled()), bias)

    @property
    def sparsity(self) -> float:
        nnz = self.values.numel() if self.format == "bitmask" else None
        if nnz is None:
            nnz = int((self.dense_weight() != 0).sum().item())
        return 1 - nnz / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        f = self.format if self.format == "bitmask" else f"{self.format} {self.n}:{self.m}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {f}, bias={self.bias is not None}"


def best_format(weight: torch.Tensor, fast: bool = False) -> tuple[str, int | None, int | None, int]:
    """(format, n, m, bytes) of the smallest storage of this weight; ties go to N:M (hardware-friendly)."""
    best = ("bitmask", None, None, bitmask_bytes(weight))
    for n, m in NM_CANDIDATES:
        if fits_nm(weight, n, m):
            b = nm_bytes(weight.shape, n, m, weight.element_size())
            if b <= best[3]:
                best = ("nm", n, m, b)
            break  # 2:4 fits -> 4:8 fits too but costs a wider index
    if fast and best[0] == "nm" and (best[1], best[2]) == (2, 4) and semi_structured_available(weight):
        best = ("semi_structured", 2, 4, best[3])
    return best


def compress_sparse(model: nn.Module, min_sparsity: float = 0.1, skip=(), fast: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Replace every float linear (not matched by `skip`, weight not shared with another module) whose fraction
    of zero weights is >= min_sparsity with a SparseLinear in its smallest format, only where that stores fewer
    bytes than the dense weight. fast: use the CUDA 2:4 semi-structured format where available (falls back to
    the reference format if torch refuses the shape). Returns one record per replaced linear: name, format,
    n, m, sparsity, bytes (compressed weight + index data), dense_bytes."""
    cands = [(n, m) for n, m in model.named_modules() if is_linear(m) and not any(s in n for s in skip)]
    tied = shared_weight_names(model, [n for n, _ in cands])
    records = []
    for i, (name, module) in enumerate(cands):
        if progress:
            progress("sparse storage", i, len(cands))
        if name in tied:
            continue
        W = as_linear(module).weight.detach()
        dense = W.numel() * W.element_size()
        sparsity = (W == 0).float().mean().item()
        if sparsity < min_sparsity or sparsity == 0:
            continue
        fmt, n, m, nbytes = best_format(W, fast)
        if nbytes >= dense:
            continue
        try:
            new = SparseLinear.from_linear(module, fmt, n or 2, m or 4)
        except (RuntimeError, ValueError):  # e.g. a shape the semi-structured kernels refuse
            fmt = "nm"
            new = SparseLinear.from_linear(module, fmt, n, m)
        _set_module(model, name, new)
        nbytes = tensor_bytes(t for k, t in new.named_buffers())  # what the new storage really holds
        records.append({"name": name, "format": fmt, "n": n, "m": m, "sparsity": sparsity, "bytes": nbytes,
                        "dense_bytes": dense})
    if progress:
        progress("sparse storage", len(cands), len(cands))
    return records
