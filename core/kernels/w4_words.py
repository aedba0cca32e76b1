"""A weight-only GEMV for 4- and 8-bit codes (M = 1, decode) that reads each packed row as 32-bit words.

    y[N] = x[K] @ dequant(W)[N, K]^T (+ bias),   dequant(W)[n, k] = (code[n, k] - zero[n, g]) * scale[n, g]

slimlm's packed rows (core.quant.packing: 4-bit byte j holds code 2j low, 2j+1 high; 8-bit one code per byte)
read as little-endian int32 are words of 8 (4-bit) or 4 (8-bit) codes in order: code i of word j is k = PER j + i.
So the stored format needs no repacking. A program owns one chunk of BKW words of K and ROWS rows: it loads x's
chunk into registers once, as PER vectors (x[PER j + i] for each position i) in the weight tile's layout, then
walks its rows BN at a time with 16-byte loads (the next rows' words fetched before the current ones are used).
Each code is one shift and one mask (a LOP3) into the bits of an exact float32 — 128 + code (4-bit) or
128 + code / 2 (8-bit) — and one FMA:

    y[n] = sum_words s * (UNIT sum_i f_i x_i - (128 UNIT + z) sum_i x_i),   UNIT = 1 (4-bit) or 2 (8-bit)

Scales / zeros are gathered per (row, word), so any group size that is a multiple of PER works (including a last
group the group size does not divide); a group of 2**p words is found with a shift. K longer than one chunk is
split over programs, whose float32 partials one small kernel sums (+ bias, cast).

Tried and dropped on an H100 (benchmarks/RESULTS.md): a version whose programs walk K with x loaded per step
(x reached each thread through shared memory every step; 1.65-1.78x bf16) and tensor-core versions that feed
tl.dot per nibble position (0.5-0.94x bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _code_f32(wu, i: tl.constexpr, BITS: tl.constexpr):
    """Code i of each uint32 word as an exact float32, without an int->float conversion: a 4-bit code moved to
    bits 16..19 of 0x43000000 is 128 + code; an 8-bit code moved to bits 15..22 is 128 + code / 2."""
    if BITS == 4:
        if i < 4:
            t = wu << (16 - 4 * i)
        elif i == 4:
            t = wu
        else:
            t = wu >> (4 * i - 16)
        return ((t & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)
    if i < 2:
        t = wu << (15 - 8 * i)
    else:
        t = wu >> (8 * i - 15)
    return ((t & 0x007F8000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _group_of_word(kw, gsize, PER: tl.constexpr, GSHIFT: tl.constexpr):
    """Quantization group of word kw (PER codes per word): a shift when a group is 2**GSHIFT words (an integer
    division costs ~20 instructions per element on the GPU), else a division."""
    if GSHIFT >= 0:
        return kw >> GSHIFT
    return (kw * PER) // gsize


@triton.jit
def _load_x(x_ptr, k, K, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(x_ptr + k).to(tl.float32)
    return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 N, K, KW, gsize, stride_wn, stride_sn, stride_ys, ROWS,
                 HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BN: tl.constexpr, BKW: tl.constexpr, GSHIFT: tl.constexpr, EVEN: tl.constexpr,
                 BITS: tl.constexpr):
    """Program (axis 0: a block of ROWS rows, axis 1: a chunk of BKW words of K); see the module docstring.
    EVEN: N is a multiple of ROWS and every K chunk is full, so no load needs a mask."""
    PER: tl.constexpr = 32 // BITS  # codes per word
    UNIT: tl.constexpr = 1.0 if BITS == 4 else 2.0  # 1 / the weight of a code in _code_f32's float
    SYM_ZERO: tl.constexpr = 8.0 if BITS == 4 else 128.0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    kw = pid_k * BKW + tl.arange(0, BKW)
    kmask = kw < KW
    k0 = kw * PER
    x0 = _load_x(x_ptr, k0, K, EVEN)
    x1 = _load_x(x_ptr, k0 + 1, K, EVEN)
    x2 = _load_x(x_ptr, k0 + 2, K, EVEN)
    x3 = _load_x(x_ptr, k0 + 3, K, EVEN)
    xs = (x0 + x1) + (x2 + x3)
    if BITS == 4:
        x4 = _load_x(x_ptr, k0 + 4, K, EVEN)
        x5 = _load_x(x_ptr, k0 + 5, K, EVEN)
        x6 = _load_x(x_ptr, k0 + 6, K, EVEN)
        x7 = _load_x(x_ptr, k0 + 7, K, EVEN)
        xs += (x4 + x5) + (x6 + x7)
    g = _group_of_word(kw, gsize, PER, GSHIFT)
    r0 = pid_n * ROWS
    rb = tl.arange(0, BN)
    rn = r0 + rb
    if EVEN:
        wu = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :])
    else:
        wu = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :], mask=(rn < N)[:, None] & kmask[None, :], other=0)
    for r in range(r0, r0 + ROWS, BN):
        rn = r + rb
        nmask = rn < N
        wmask = nmask[:, None] & kmask[None, :]
        nxt = r + BN + rb  # prefetch the next rows' words (masked off past this program's rows)
        nxt_mask = (nxt < r0 + ROWS)[:, None]
        if not EVEN:
            nxt_mask = nxt_mask & (nxt < N)[:, None] & kmask[None, :]
        wn = tl.load(w_ptr + nxt[:, None] * stride_wn + kw[None, :], mask=nxt_mask, other=0)
        u = wu.to(tl.uint32, bitcast=True)
        part = _code_f32(u, 0, BITS) * x0[None, :]  # one FMA per code: accumulate in sequence
        part += _code_f32(u, 1, BITS) * x1[None, :]
        part += _code_f32(u, 2, BITS) * x2[None, :]
        part += _code_f32(u, 3, BITS) * x3[None, :]
        if BITS == 4:
            part += _code_f32(u, 4, BITS) * x4[None, :]
            part += _code_f32(u, 5, BITS) * x5[None, :]
            part += _code_f32(u, 6, BITS) * x6[None, :]
            part += _code_f32(u, 7, BITS) * x7[None, :]
        if EVEN:
            s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :]).to(tl.float32)
        else:
            s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0).to(tl.float32)
        else:
            z = tl.full([BN, BKW], SYM_ZERO, tl.float32)
        # part = 128 sum(x) + sum(c x) / UNIT, so sum((c - z) x) = UNIT part - (128 UNIT + z) sum(x)
        y = tl.sum(s * (UNIT * part - (128.0 * UNIT + z) * xs[None, :]), axis=1)
        if SPLIT_K == 1:
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)
        else:
            tl.store(y_ptr + pid_k * stride_ys + rn, y, mask=nmask)
        wu = wn


@triton.jit
def _sum_splits_kernel(p_ptr, b_ptr, y_ptr, N, stride_ps, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """y[n] = sum_s partial[s, n] (+ bias), in y's dtype: one launch instead of sum + add + cast."""
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sp in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + sp * stride_ps + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=mask)


# --- launchers -------------------------------------------------------------------------------------------------


def supported(bits: int, group_size: int, in_features: int, packed: torch.Tensor) -> bool:
    """4- or 8-bit rows whose bytes fill whole 32-bit words, groups of whole words (or one group per row)."""
    return (bits in (4, 8) and packed.dim() == 2 and packed.shape[1] % 4 == 0 and packed.stride(-1) == 1
            and packed.stride(0) % 4 == 0 and packed.storage_offset() % 4 == 0
            and (group_size >= in_features or group_size % (32 // bits) == 0))


def group_shift(group_size: int, in_features: int, bits: int = 4) -> int:
    """log2(words per group) when that is a power of two (one group per row counts: any shift past the row),
    else -1 (the kernels divide)."""
    if group_size >= in_features:
        return 30
    words = group_size // (32 // bits)
    return words.bit_length() - 1 if words & (words - 1) == 0 else -1


def _check(bits, group_size, k, packed, bkw):
    if not supported(bits, group_size, k, packed):
        raise ValueError(f"w4_words takes 4/8-bit rows of whole 32-bit words and groups of whole words; got {bits} "
                         f"bits, group {group_size}, {packed.shape[1]} bytes per row")
    if bkw & (bkw - 1):
        raise ValueError(f"BKW must be a power of two, got {bkw}")


def default_gemv_config(n: int, k: int, bits: int = 4) -> dict:
    """Tile rule from benchmarks/gpu_w4_words.py on an H100 (results/gpu_w4_words.json; each Llama-3-8B shape's best
    config or within 5 % of it): K in one chunk when a row has at most 512 words, else chunks of 256 (split K,
    2 warps); 4 rows at a time, 16 rows per program for wide layers (N >= 8192) or a split K, else 8."""
    kw = -(-k // (32 // bits))
    split = kw > 512
    bkw = 256 if split else min(512, max(32, triton.next_power_of_2(kw)))
    return {"ROWS": 16 if split or n >= 8192 else 8, "BN": 4, "BKW": bkw, "num_warps": 2 if split else 4,
            "num_stages": 1}


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
         group_size: int, n_out: int, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [1, K] (contiguous) -> y [1, N] in x.dtype; K is split into chunks of BKW words (one per program column)."""
    m, k = x.shape
    if m != 1:
        raise ValueError("gemv_words takes one row of x")
    cfg = {**default_gemv_config(n_out, k, bits), **(config or {})}
    _check(bits, group_size, k, packed, cfg["BKW"])
    if cfg["ROWS"] % cfg["BN"]:
        raise ValueError("ROWS must be a multiple of BN")
    w = packed.view(torch.int32)
    kw = w.shape[1]
    split = triton.cdiv(kw, cfg["BKW"])
    y = (torch.empty(1, n_out, device=x.device, dtype=x.dtype) if split == 1
         else torch.empty(split, n_out, device=x.device, dtype=torch.float32))
    _gemv_kernel[(triton.cdiv(n_out, cfg["ROWS"]), split)](
        x, w, scales, scales if zeros is None else zeros, scales if bias is None else bias, y,
        n_out, k, kw, group_size, w.stride(0), scales.stride(0), y.stride(0) if split > 1 else 0, cfg["ROWS"],
        HAS_Z=zeros is not None, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
        BN=cfg["BN"], BKW=cfg["BKW"], GSHIFT=group_shift(group_size, k, bits), BITS=bits,
        EVEN=n_out % cfg["ROWS"] == 0 and kw % cfg["BKW"] == 0 and k == (32 // bits) * kw,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split == 1:
        return y
    out = torch.empty(1, n_out, device=x.device, dtype=x.dtype)
    _sum_splits_kernel[(triton.cdiv(n_out, 1024),)](y, scales if bias is None else bias, out, n_out, y.stride(0),
                                                    SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=1024)
    return out
