"""SparseLinear: compressed storage of a pruned linear, so the memory figure shows the saving.

Formats (buffers are what state_dict, .to() and core.quant.memory_accounting.module_bytes see):
- "bitmask": `mask` uint8 [out, ceil(in/8)] (bit j % 8 of byte j // 8, least significant first, is 1 when
  weight[:, j] is non-zero; core.quant.packing 1-bit layout) + `values` [nnz] (the non-zeros, weight dtype,
  row-major order). Bytes: nnz * itemsize + out * ceil(in/8).
- "nm" (N:M, N non-zeros kept in every M consecutive columns): `values` [out, in*N/M] (weight dtype) +
  `indices` uint8: the position (0..M-1) of each kept value inside its group, ceil(log2 M) bits each (2 bits for
  2:4, like the 2:4 semi-structured metadata), packed with core.quant.packing. Bytes: out*in*N/M * itemsize +
  out * packed_size(in*N/M, bits).
- "csr" (blocked CSR with one-byte column indices): the columns are cut into nb = ceil(in/256) blocks of
  `block` = ceil(in/nb) columns (the last one may be narrower); each block is a CSR matrix [out, width] whose
  column indices (0..255) fit a uint8. `values` [nnz] (weight dtype) and `cols` uint8 [nnz] hold block 0's
  non-zeros row-major, then block 1's, ...; `crow` int32 [nb, out+1] the row pointers of each block (each row
  starts at 0: block b's non-zeros are the crow[b, -1] entries after those of blocks < b).
  Bytes: nnz * (itemsize + 1) + nb * (out+1) * 4.
- "semi_structured" (fast=True, CUDA, 2:4, fp16/bf16): torch.sparse.to_sparse_semi_structured (sparse tensor
  cores via cuSPARSELt/CUTLASS); its inner tensors are registered as buffers so module_bytes counts them. Made
  on its device; moving it afterwards is not supported. portable() gives its "nm" 2:4 equivalent (what a
  checkpoint stores).

forward():
- "csr" on CPU, float32/float64 input of the values' dtype, no autograd through x, at most CSR_MAX_ROWS rows
  (decoding, short prompts): the fast path. The uint8 column indices are widened into a per-thread int32
  scratch buffer (one pass over nnz; the torch sparse views of it are kept between calls, see _csr_blocks) and
  each block is multiplied by torch.sparse (torch.mv / torch.mm, then addmv / addmm accumulating in place; MKL's
  sparse kernels on x86 builds). No dense weight is made. CSR_MAX_ROWS = 128 from per-layer timings at 50 %
  (576x576, 1536x576, 576x1536, one thread): at 128 rows the fast path still wins (1.0 / 2.7 / 2.7 ms against
  1.2 / 3.4 / 3.2 ms for decoding + F.linear), at 256 the reference path does (1.6 / 4.7 / 4.9 against
  2.0 / 5.4 / 5.3 ms).
  Measured (SmolLM2-135M, magnitude 50 %, float32, one decode step at batch 1 after a 128-token prompt,
  OMP_NUM_THREADS=1, dense / bitmask / csr interleaved in one process, median of 15, on the shared 2-core VM,
  load ~2): dense 55.3 ms, bitmask (reference path) 286.2 ms (5.2x), csr 83.7 ms (1.5x); weights 538.1 / 339.0 /
  380.9 MB; prefill of the 128 tokens 278 / 524 / 434 ms. 2:4 (nm vs csr): 55.9 / 303.1 / 82.5 ms. The sparse
  mat-vecs themselves cost about what the dense ones do (in float32 at 50 % a CSR row reads as many bytes as a
  dense one: 4-byte value + 4-byte index per non-zero); the rest is the index widening (~15 % of the step) and
  per-layer Python.
- otherwise (every format; "csr" with more rows, other dtypes, CUDA, autograd) the reference path: scatter the
  values into a dense weight (input dtype), F.linear. Decoding uses only vectorized ops (bit lookup table, prefix
  count, index_select / scatter; masked_scatter was ~10x slower on CPU, index_put_ ~3x slower than scatter_) and,
  when autograd is off, per-thread scratch buffers reused across layers (allocating a fresh dense weight per call
  cost more than decoding it on the 2-core test VM).
Why the bitmask / N:M layouts get no CPU fast path: any per-call decode of them is several vectorized passes over
all out*in positions (unpacking the 1-bit data alone costs 2-3 dense mat-vecs at batch 1; turning it into
column indices for torch.sparse, 40-60; the 2:4 positions, through a lookup table, 3-4), while torch.sparse needs
int32 column indices, which cached would cost 4 bytes per non-zero: as much as the whole saving at 50 % sparsity
in float32. One byte per non-zero (blocked "csr") is the compromise: 2.5 bytes per weight at 50 % float32 instead
of 2.125 (bitmask) or 4 (dense); int16 global indices (one CSR, no blocks) measured 10-40 % faster per layer
but cost 3 bytes per weight. No CPU sparse kernel takes bfloat16 / float16 (MKL: float32 / float64), so half-precision
models keep the smallest layout and the reference path.
compress_sparse / best_format pick "csr" where its fast path runs (layout="auto"), else the smallest layout.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import as_linear, is_linear
from ..quant.linear import _set_module, shared_weight_names
from ..quant.memory_accounting import tensor_bytes
from ..quant.packing import pack_bits, packed_size, unpack_bits

FORMATS = ("bitmask", "nm", "csr", "semi_structured")
LAYOUTS = ("auto", "smallest", "csr")  # compress_sparse / best_format: which storage to choose
NM_CANDIDATES = ((2, 4), (4, 8))  # (N, M) compact layouts compress_sparse tries, in order of preference
CSR_MAX_BLOCK = 256  # column indices of a "csr" block fit a uint8
CSR_MAX_ROWS = 128  # "csr": up to this many input rows (tokens) the torch.sparse path, above it the reference path
CSR_DTYPES = (torch.float32, torch.float64)  # dtypes of torch's CPU sparse mat-vec / mat-mat kernels


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


def csr_block(in_f: int) -> int:
    """Column block width of the "csr" layout: ceil(in / nb) with nb = ceil(in / 256) blocks (at most 256)."""
    return -(-in_f // -(-in_f // CSR_MAX_BLOCK))


def bitmask_bytes(weight: torch.Tensor) -> int:
    out_f, in_f = weight.shape
    return int((weight != 0).sum().item()) * weight.element_size() + out_f * packed_size(in_f, 1)


def nm_bytes(shape, n: int, m: int, itemsize: int) -> int:
    out_f, in_f = shape
    kept = in_f * n // m
    return out_f * kept * itemsize + out_f * packed_size(kept, _index_bits(m))


def csr_bytes(weight: torch.Tensor) -> int:
    out_f, in_f = weight.shape
    nb = -(-in_f // csr_block(in_f))
    return int((weight != 0).sum().item()) * (weight.element_size() + 1) + nb * (out_f + 1) * 4


def fits_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """At most n non-zeros in every m consecutive columns of each row."""
    out_f, in_f = weight.shape
    return in_f % m == 0 and bool(((weight != 0).reshape(out_f, in_f // m, m).sum(-1) <= n).all())


def semi_structured_available(weight: torch.Tensor) -> bool:
    return (weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)
            and hasattr(torch.sparse, "to_sparse_semi_structured"))


def csr_fast_available(weight: torch.Tensor) -> bool:
    """Whether the "csr" fast path runs for this weight where it is: a CPU float32/float64 weight, and torch built
    with MKL (whose sparse kernels it was measured with; torch's own CPU fallback was not)."""
    return weight.device.type == "cpu" and weight.dtype in CSR_DTYPES and torch.backends.mkl.is_available()


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str = "bitmask", n: int | None = None,
                 m: int | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.in_features, self.out_features, self.format, self.n, self.m = in_features, out_features, fmt, n, m
        self.block = csr_block(in_features) if fmt == "csr" else None
        self.bias = None
        self._ss = None  # the semi-structured weight (fast format)
        self._csr_cache = None  # "csr": the torch sparse views of the last fast-path call (see _csr_blocks)

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str = "bitmask", n: int = 2, m: int = 4) -> SparseLinear:
        """From an nn.Linear (or GPT-2 Conv1D) whose pruned weights are zero. fmt "nm" needs the weight to fit
        n:m; "semi_structured" needs 2:4 and a CUDA fp16/bf16 weight (see semi_structured_available)."""
        lin = as_linear(linear)
        return cls.from_weight(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), fmt, n, m)

    @classmethod
    def from_weight(cls, W: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "bitmask", n: int = 2,
                    m: int = 4) -> SparseLinear:
        """From a dense [out, in] weight whose pruned entries are zero (see from_linear)."""
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
        elif fmt == "csr":
            mod = cls(in_f, out_f, "csr")
            values, cols, crow = [], [], []
            for b0 in range(0, in_f, mod.block):
                sub = W[:, b0:b0 + mod.block]
                nz = sub != 0
                counts = nz.sum(1)
                crow.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32))
                cols.append(nz.nonzero()[:, 1].to(torch.uint8))  # row-major, like sub[nz]
                values.append(sub[nz])
            mod.register_buffer("values", torch.cat(values))
            mod.register_buffer("cols", torch.cat(cols))
            mod.register_buffer("crow", torch.stack(crow))
        elif fmt == "semi_structured":
            if not (semi_structured_available(W) and fits_nm(W, 2, 4)):
                raise ValueError("the semi-structured format needs a 2:4-sparse fp16/bf16 weight on a CUDA device")
            mod = cls(in_f, out_f, "semi_structured", 2, 4)
            mod._ss = torch.sparse.to_sparse_semi_structured(W.contiguous())
            for name in mod._ss.__tensor_flatten__()[0]:  # packed values + metadata: counted by module_bytes
                mod.register_buffer(f"ss_{name}", getattr(mod._ss, name), persistent=False)
        else:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return mod

    @classmethod
    def empty(cls, in_features: int, out_features: int, fmt: str, n: int | None = None, m: int | None = None,
              bias: bool = False, dtype: torch.dtype = torch.float32, nnz: int | None = None,
              bias_dtype: torch.dtype | None = None, device="meta") -> SparseLinear:
        """An instance with uninitialized storage of these shapes (meta device by default: what a checkpoint
        loader fills). nnz: the number of stored values ("bitmask", "csr"; "nm" derives it)."""
        if fmt not in ("bitmask", "nm", "csr"):
            raise ValueError(f"format must be bitmask, nm or csr, got {fmt!r}")
        if min(in_features, out_features) < 1:
            raise ValueError(f"bad shape [{out_features}, {in_features}]")
        mod = cls(in_features, out_features, fmt, n, m)

        def buf(name, shape, dt):
            mod.register_buffer(name, torch.empty(shape, dtype=dt, device=device))

        if fmt == "nm":
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= 256 and in_features % m == 0):
                raise ValueError(f"bad N:M {n}:{m} for in_features {in_features}")
            kept = in_features * n // m
            buf("values", (out_features, kept), dtype)
            buf("indices", (out_features, packed_size(kept, _index_bits(m))), torch.uint8)
        else:
            if not (isinstance(nnz, int) and 0 <= nnz <= in_features * out_features):
                raise ValueError(f"nnz must be an integer between 0 and {in_features * out_features}, got {nnz!r}")
            buf("values", (nnz,), dtype)
            if fmt == "bitmask":
                buf("mask", (out_features, packed_size(in_features, 1)), torch.uint8)
            else:
                buf("cols", (nnz,), torch.uint8)
                buf("crow", (-(-in_features // mod.block), out_features + 1), torch.int32)
        if bias:
            mod.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype or dtype, device=device),
                                    requires_grad=False)
        return mod

    def portable(self) -> SparseLinear:
        """The module a checkpoint stores: itself, or for "semi_structured" (CUDA-only, not movable) the equivalent
        "nm" 2:4 module on the CPU (same values; loads as "nm")."""
        if self.format != "semi_structured":
            return self
        bias = None if self.bias is None else self.bias.detach().cpu()
        return SparseLinear.from_weight(self._ss.to_dense().cpu(), bias, "nm", 2, 4)

    def check(self) -> str | None:
        """Why the stored data is inconsistent (a corrupt checkpoint), or None. Cheap: one pass over the indices."""
        out_f, in_f = self.out_features, self.in_features
        if self.format == "bitmask":
            bits = unpack_bits(self.mask, 1, self.mask.shape[1] * 8)
            if in_f % 8 and bool(bits[:, in_f:].any()):
                return "its mask has bits set beyond the last column"
            set_bits = int(bits.sum())
            if set_bits != self.values.numel():
                return f"its mask marks {set_bits} non-zeros but it holds {self.values.numel()} values"
        elif self.format == "nm":
            idx = unpack_bits(self.indices, _index_bits(self.m), self.values.shape[1]).view(out_f, -1, self.n)
            if bool((idx >= self.m).any()):
                return f"a stored position is not below M = {self.m}"
            if self.n > 1 and not bool((idx[..., 1:] > idx[..., :-1]).all()):
                return "its positions are not increasing inside every group"
        elif self.format == "csr":
            crow = self.crow.long()
            if bool((crow[:, 0] != 0).any()) or bool((crow[:, 1:] < crow[:, :-1]).any()):
                return "its row pointers do not start at 0 and increase"
            sizes = crow[:, -1].tolist()
            if sum(sizes) != self.values.numel():
                return f"its row pointers count {sum(sizes)} non-zeros but it holds {self.values.numel()} values"
            start = 0
            for b, size in enumerate(sizes):
                cols = self.cols[start:start + size].long()
                if size and int(cols.max()) >= min(self.block, in_f - b * self.block):
                    return f"a column index of block {b} is beyond the block"
                # strictly increasing inside each row: a step down (or repeat) only where a row starts
                down = torch.nonzero(cols[1:] <= cols[:-1]).view(-1) + 1
                row_starts = torch.zeros(size + 1, dtype=torch.bool)
                row_starts[crow[b]] = True
                if bool((~row_starts[down]).any()):
                    return f"its column indices repeat or decrease inside a row (block {b})"
                start += size
        return None

    def _csr_blocks(self, cols32: torch.Tensor, cache: bool) -> list[tuple]:
        """Per non-empty block: (first column, torch sparse CSR [out, width] viewing `values`, `crow` and cols32,
        its slice of cols32, its slice of `cols`): the caller widens `cols` into cols32 (int32, what torch.sparse
        takes) block by block, just before each product (measured ~1 % faster than widening the whole layer
        first: the block's indices are still in cache). cache: cols32 is the per-thread scratch buffer, rewritten
        with the same indices on every call, so the views stay valid while none of these tensors is replaced;
        keep them (building them cost ~10 us per block, a tenth of a 576x576 mat-vec). Never kept for a fresh
        cols32: that would hold 4 bytes per non-zero per module."""
        key = (cols32.data_ptr(), self.values.data_ptr(), self.crow.data_ptr(), self.cols.data_ptr(),
               torch.is_inference_mode_enabled())
        hit = self._csr_cache
        if cache and hit is not None and hit[0] == key:
            return hit[1]
        blocks, start = [], 0
        with warnings.catch_warnings():  # torch warns that sparse CSR is "in beta"; only mv / mm / addmv / addmm used
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            for b, size in enumerate(self.crow[:, -1].tolist()):
                if size:
                    b0 = b * self.block
                    width = min(self.block, self.in_features - b0)
                    blocks.append((b0, torch.sparse_csr_tensor(self.crow[b], cols32[start:start + size],
                                                               self.values[start:start + size],
                                                               (self.out_features, width), check_invariants=False),
                                   cols32[start:start + size], self.cols[start:start + size]))
                start += size
        if cache:
            self._csr_cache = (key, blocks)
        return blocks

    def __getstate__(self):  # deepcopy / pickle: not the views of the scratch buffer
        return {**super().__getstate__(), "_csr_cache": None}

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
        if self.format == "csr":
            W = _scratch("w", out_f * in_f, dtype, dev, reuse).view(out_f, in_f).zero_()
            if vals.numel() == 0:
                return W
            # flat position of each non-zero: its stacked row (block b, row r) gives r * in + b * block
            counts = self.crow.diff(dim=1).reshape(-1)
            nblocks = self.crow.shape[0]
            row_base = (torch.arange(out_f, device=dev) * in_f).repeat(nblocks) + \
                torch.arange(0, nblocks * self.block, self.block, device=dev).repeat_interleave(out_f)
            flat = torch.repeat_interleave(row_base, counts, output_size=vals.numel()).add_(self.cols)
            return W.view(-1).scatter_(0, flat, vals).view(out_f, in_f)  # scatter_: ~3x faster than index_put_
        kept = in_f * self.n // self.m
        idx = unpack_bits(self.indices, _index_bits(self.m), kept)
        cols = torch.add(idx, _nm_base(in_f, self.n, self.m, dev),
                         out=_scratch("cols", out_f * kept, torch.int64, dev, reuse).view(out_f, kept))
        W = _scratch("w", out_f * in_f, dtype, dev, reuse).view(out_f, in_f).zero_()
        return W.scatter_(1, cols, vals)

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the torch.sparse path (see the module docstring)."""
        return (self.format == "csr" and x.device.type == "cpu" and x.dtype == self.values.dtype
                and x.dtype in CSR_DTYPES and x.numel() <= CSR_MAX_ROWS * self.in_features
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _csr_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        reuse = not torch.is_grad_enabled()
        cols32 = _scratch("cols32", self.cols.numel(), torch.int32, self.cols.device, reuse)
        blocks = self._csr_blocks(cols32, cache=reuse)
        if rows == 1:  # decoding one token: mat-vec
            xv, y = x2[0].contiguous(), None
            for b0, A, c32, c8 in blocks:
                c32.copy_(c8)  # widened block by block: still in cache when the mat-vec reads it
                xb = xv[b0:b0 + A.shape[1]]
                y = torch.mv(A, xb) if y is None else torch.addmv(y, A, xb, out=y)
        else:  # Y^T [out, rows] = sum over blocks of A_b @ X_b^T
            xt, y = x2.t().contiguous(), None
            for b0, A, c32, c8 in blocks:
                c32.copy_(c8)
                xb = xt[b0:b0 + A.shape[1]]
                y = torch.mm(A, xb) if y is None else torch.addmm(y, A, xb, out=y)
            y = None if y is None else y.t().contiguous()  # [rows, out], laid out like F.linear's result
        if y is None:  # no non-zero at all
            y = x.new_zeros(rows, self.out_features)
        y = y.reshape(*lead, self.out_features)
        return y if bias is None else y.add_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.format == "semi_structured" and x.dtype == self._ss.dtype:
            return F.linear(x, self._ss, bias)
        if self.uses_fast_path(x):
            return self._csr_forward(x, bias)
        # without autograd nothing keeps the decoded weight after F.linear: decode into shared scratch buffers
        return F.linear(x, self.dense_weight(x.dtype, reuse=not torch.is_grad_enabled()), bias)

    @property
    def sparsity(self) -> float:
        nnz = self.values.numel() if self.format in ("bitmask", "csr") else None
        if nnz is None:
            nnz = int((self.dense_weight() != 0).sum().item())
        return 1 - nnz / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        f = self.format if self.format in ("bitmask", "csr") else f"{self.format} {self.n}:{self.m}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {f}, bias={self.bias is not None}"


def best_format(weight: torch.Tensor, fast: bool = False, layout: str = "auto"
                ) -> tuple[str, int | None, int | None, int]:
    """(format, n, m, bytes) of the storage of this weight. layout "smallest": the smallest of bitmask / N:M (ties
    go to N:M, hardware-friendly); "csr": the blocked CSR; "auto" (default): "csr" where its CPU fast path runs
    (csr_fast_available) and it is smaller than the dense weight, else the smallest. fast: the CUDA 2:4
    semi-structured format where available (before any layout)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    best = ("bitmask", None, None, bitmask_bytes(weight))
    for n, m in NM_CANDIDATES:
        if fits_nm(weight, n, m):
            b = nm_bytes(weight.shape, n, m, weight.element_size())
            if b <= best[3]:
                best = ("nm", n, m, b)
            break  # 2:4 fits -> 4:8 fits too but costs a wider index
    if fast and best[0] == "nm" and (best[1], best[2]) == (2, 4) and semi_structured_available(weight):
        return ("semi_structured", 2, 4, best[3])
    if layout == "csr" or (layout == "auto" and csr_fast_available(weight)):
        b = csr_bytes(weight)
        if layout == "csr" or b < weight.numel() * weight.element_size():
            best = ("csr", None, None, b)
    return best


def compress_sparse(model: nn.Module, min_sparsity: float = 0.1, skip=(), fast: bool = False, layout: str = "auto",
                    progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Replace every float linear (not matched by `skip`, weight not shared with another module) whose fraction
    of zero weights is >= min_sparsity with a SparseLinear in the format best_format(weight, fast, layout) picks,
    only where that stores fewer bytes than the dense weight. fast: use the CUDA 2:4 semi-structured format where
    available (falls back to the reference format if torch refuses the shape). Returns one record per replaced
    linear: name, format, n, m, sparsity, bytes (compressed weight + index data), dense_bytes."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
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
        fmt, n, m, nbytes = best_format(W, fast, layout)
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
