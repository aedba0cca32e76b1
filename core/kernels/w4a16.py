"""Triton kernels for weight-only quantized matmul on slimlm's packed format (W4A16 and W8A16).

    y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias),   dequant(W)[n, k] = (code[n, k] - zero[n, g]) * scale[n, g]

The weight is read exactly as core.quant stores it, with no repacking: codes bit-packed row-wise by
core.quant.packing (4-bit: byte j of a row holds code 2j in its low nibble and code 2j+1 in its high nibble;
8-bit: one code per byte), float16 scales [N, G], uint8 zeros [N, G] or None (symmetric: zero = 2**(bits-1)),
group g = k // group_size (the last group may be shorter). Every K step a kernel takes lies inside one group
(the launchers pick steps that divide group_size, or any step when a row is one group), so a scale and a zero
are loaded once per (row, step). Nibbles are unpacked with tl.join (low, high) -> natural code order.
Codes become floats without an int->float conversion: float32 bits 0x4B000000 | c are 2**23 + c (and bf16
0x4300 | c = 128 + c, fp16 0x6400 | c = 1024 + c), exact.

Kernels
  _gemv_kernel     M <= 8, CUDA-core FMAs: one program streams BN rows once, UNROLL steps of [BN, BKB] bytes
                   in flight per loop iteration; y = sum_steps scale * sum_k (c - z) x. Not the dispatcher's
                   default (the tensor-core kernel with split-K was as fast or faster on the H200 sweep).
  _dot_kernel      any M, tensor cores: out^T [BN, BM] = W_tile [BN, BK] @ x_tile^T (the weight tile fills the
                   MMA rows, so M = 1..16 wastes no more than the 16-wide MMA column). FOLD (small M): the tile
                   holds c + off and scale / zero are applied to its dot product,
                   s * (dot(c + off, x) - (off + z) * sum_k x); otherwise the tile is dequantized to
                   (c - z) * s (float32, rounded once to the activation dtype, like the reference) and
                   accumulated in place. Split-K writes float32 partials that the launcher sums.
  _dequant_kernel  codes -> dense weight in the activation dtype, for dequantize + cuBLAS at large M.

Importing this module imports triton; core.kernels imports it only on first use. For CPU tests set
TRITON_INTERPRET=1 before importing it (Triton reads it when the kernels are decorated).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .w4_words import split_output, sum_splits

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Tile sizes: by default a fixed table (default_gemv_config / default_gemm_config / default_split_k, chosen
# from the sweep in benchmarks/gpu_kernels.py on an H200); SLIMLM_AUTOTUNE=1 benchmarks candidate configs per
# shape instead (the first call of each new shape then takes seconds).
AUTOTUNE = os.environ.get("SLIMLM_AUTOTUNE", "0") == "1"


# --- kernels ---------------------------------------------------------------------------------------------

@triton.jit
def _nibbles(w, IS_BF16: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 bytes -> (low nibble, high nibble) as bf16 (128 + code) or fp16 (1024 + code), exact.
    USE_ASM (GPU): 4 bytes at a time in PTX, two prmt + two lop3 + two shr + two lop3 for 8 codes, i.e. one
    instruction per code; the plain-Triton form (used by the interpreter) computes the same values."""
    if USE_ASM:
        if IS_BF16:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t0, t1; prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342; "
                "lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA; lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA; "
                "shr.b32 t0, t0, 4; shr.b32 t1, t1, 4; "
                "lop3.b32 $2, t0, 0x000F000F, 0x43004300, 0xEA; lop3.b32 $3, t1, 0x000F000F, 0x43004300, 0xEA; }",
                "=r,=r,=r,=r,r", [w], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t0, t1; prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342; "
                "lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA; lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA; "
                "shr.b32 t0, t0, 4; shr.b32 t1, t1, 4; "
                "lop3.b32 $2, t0, 0x000F000F, 0x64006400, 0xEA; lop3.b32 $3, t1, 0x000F000F, 0x64006400, 0xEA; }",
                "=r,=r,=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        wi = w.to(tl.int16)
        if IS_BF16:
            lo = ((wi & 15) | 0x4300).to(tl.bfloat16, bitcast=True)
            hi = ((wi >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        else:
            lo = ((wi & 15) | 0x6400).to(tl.float16, bitcast=True)
            hi = ((wi >> 4) | 0x6400).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 M, N, K, KB, gsize, MB,
                 stride_xm, stride_wn, stride_sn, stride_ym,
                 BITS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, UNROLL: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """One program: BN output rows x all M (<= BM) rows of x. Each step reads a [BN, BKB]-byte tile (BK codes
    per row, inside one quantization group); UNROLL steps per loop iteration put more loads in flight."""
    PER: tl.constexpr = 8 // BITS  # codes per byte
    BK: tl.constexpr = BKB * PER
    SYM_ZERO: tl.constexpr = 1 << (BITS - 1)
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    nmask = rn < N
    rb = tl.arange(0, BKB)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    mmask = rm < M
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc1 = tl.zeros([BN], dtype=tl.float32)  # M == 1: a plain vector keeps x 1-D (fewer layout conversions)
    for k0 in range(0, K, BK * UNROLL):
        for u in tl.static_range(UNROLL):
            kk = k0 + u * BK
            boff = kk // PER + rb
            w = tl.load(w_ptr + rn[:, None] * stride_wn + boff[None, :], mask=nmask[:, None] & (boff < KB)[None, :],
                        other=0)  # uint8 [BN, BKB]
            g = kk // gsize
            smask = nmask & (kk < K)
            s = tl.load(s_ptr + rn * stride_sn + g, mask=smask, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + rn * stride_sn + g, mask=smask, other=0).to(tl.float32)
            else:
                z = tl.full([BN], SYM_ZERO, tl.float32)
            if BITS == 4:  # low nibble = code 2j, high nibble = code 2j+1: join restores the natural order
                lo, hi = _nibbles(w, True, USE_ASM)  # bf16 128 + c
                wf = tl.reshape(tl.join(lo, hi), [BN, BK]).to(tl.float32) - (128.0 + z)[:, None]  # c - z, exact
            else:
                wf = (w.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)[:, None]
            kx = kk + rk
            if BM == 1:
                xv = tl.load(x_ptr + kx, mask=kx < K, other=0.0).to(tl.float32)  # [BK]
                acc1 += tl.sum(wf * xv[None, :], axis=1) * s
            else:
                xv = tl.load(x_ptr + rm[:, None] * stride_xm + kx[None, :], mask=mmask[:, None] & (kx < K)[None, :],
                             other=0.0).to(tl.float32)  # [BM, BK]
                acc += tl.sum(wf[None, :, :] * xv[:, None, :], axis=2) * s[None, :]
    if BM == 1:
        if HAS_BIAS:
            acc1 += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, acc1.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        ymask = mmask[:, None] & nmask[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                M, N, K, KB, gsize, MB,
                stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                BITS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr,
                SPLIT_K: tl.constexpr, FOLD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                USE_ASM: tl.constexpr):
    """Program (pid over M x N tiles, M fastest so the M tiles of one weight tile run together; axis 1: K split).
    out^T [BN, BM] += W_tile [BN, BK] @ x_tile^T [BK, BM]. FOLD (small M): the tile holds codes + OFF, exact in
    16 bits, and scale / zero are applied to the tile's dot product; else the tile is dequantized
    ((c - z) * s in float32, rounded once, as the reference does) and accumulated in place."""
    PER: tl.constexpr = 8 // BITS
    BKB: tl.constexpr = BK // PER  # bytes per row per K tile
    SYM_ZERO: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    n_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)
    rb = tl.arange(0, BKB)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for t in range(t0, t1):
        k0 = t * BK
        boff = k0 // PER + rb
        w = tl.load(w_ptr + rn[:, None] * stride_wn + boff[None, :], mask=nmask[:, None] & (boff < KB)[None, :],
                    other=0)  # uint8 [BN, BKB]
        g = k0 // gsize
        s = tl.load(s_ptr + rn * stride_sn + g, mask=nmask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rn * stride_sn + g, mask=nmask, other=0).to(tl.float32)
        else:
            z = tl.full([BN], SYM_ZERO, tl.float32)
        kx = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + kx[None, :], mask=mmask[:, None] & (kx < K)[None, :],
                     other=0.0)  # [BM, BK]
        if FOLD:
            if BITS == 4:
                lo, hi = _nibbles(w, IS_BF16, USE_ASM)  # 128 + c (bf16) or 1024 + c (fp16), exact
                wq = tl.reshape(tl.join(lo, hi), [BN, BK])
                OFF: tl.constexpr = 128.0 if IS_BF16 else 1024.0
            else:  # codes 0..255 are exact in fp16 and bf16
                wq = ((w.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(xt.dtype)
                OFF: tl.constexpr = 0.0
            d = tl.dot(wq, tl.trans(xt))  # [BN, BM] = sum_k (c + OFF) x
            xsum = tl.sum(xt.to(tl.float32), axis=1)  # [BM]
            acc += s[:, None] * (d - (OFF + z)[:, None] * xsum[None, :])
        else:
            wi = w.to(tl.int32)
            if BITS == 4:
                wf = tl.reshape(tl.join(((wi & MASK) | 0x4B000000).to(tl.float32, bitcast=True),
                                        ((wi >> 4) | 0x4B000000).to(tl.float32, bitcast=True)), [BN, BK])
            else:
                wf = (wi | 0x4B000000).to(tl.float32, bitcast=True)
            wd = ((wf - (8388608.0 + z)[:, None]) * s[:, None]).to(xt.dtype)
            acc = tl.dot(wd, tl.trans(xt), acc)
    ymask = mmask[None, :] & nmask[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:  # float32 partials [SPLIT_K, M, N]; the launcher sums them
        tl.store(y_ptr + pid_k * stride_ys + rm[None, :] * stride_ym + rn[:, None], acc, mask=ymask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, o_ptr, N, K, KB, gsize, stride_wn, stride_sn, stride_on,
                    BITS: tl.constexpr, HAS_Z: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr):
    """Dense weight (code - zero) * scale in float32, rounded once: bit-identical to core.quant.rtn.dequantize.
    A [BN, BK] tile lies inside one group."""
    PER: tl.constexpr = 8 // BITS
    BK: tl.constexpr = BKB * PER
    SYM_ZERO: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    nmask = rn < N
    boff = k0 // PER + tl.arange(0, BKB)
    w = tl.load(w_ptr + rn[:, None] * stride_wn + boff[None, :], mask=nmask[:, None] & (boff < KB)[None, :], other=0)
    g = k0 // gsize
    s = tl.load(s_ptr + rn * stride_sn + g, mask=nmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rn * stride_sn + g, mask=nmask, other=0).to(tl.float32)
    else:
        z = tl.full([BN], SYM_ZERO, tl.float32)
    wi = w.to(tl.int32)
    if BITS == 4:
        wf = tl.reshape(tl.join(((wi & MASK) | 0x4B000000).to(tl.float32, bitcast=True),
                                ((wi >> 4) | 0x4B000000).to(tl.float32, bitcast=True)), [BN, BK])
    else:
        wf = (wi | 0x4B000000).to(tl.float32, bitcast=True)
    out = (wf - (8388608.0 + z)[:, None]) * s[:, None]
    rk = k0 + tl.arange(0, BK)
    tl.store(o_ptr + rn[:, None] * stride_on + rk[None, :], out.to(o_ptr.dtype.element_ty),
             mask=nmask[:, None] & (rk < K)[None, :])


# --- tile-size rules ---------------------------------------------------------------------------------------

def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def max_chunk(bits: int, group_size: int, in_features: int, cap: int) -> int:
    """Largest power-of-two number of codes (<= cap) such that chunks aligned to multiples of it never straddle
    a group: any when a row is one group, else a divisor of group_size."""
    return cap if group_size >= in_features else _pow2_divisor(group_size, cap)


def supported(bits: int, group_size: int, in_features: int) -> bool:
    """Shapes these kernels take: 4 or 8 bits, and chunks of >= 32 codes (4-bit: two dots of >= 16) or >= 16
    codes (8-bit) that stay inside a group."""
    if bits not in (4, 8):
        return False
    return max_chunk(bits, group_size, in_features, 256) >= (32 if bits == 4 else 16)


def _mbucket(m: int) -> int:
    return 1 if m <= 1 else triton.next_power_of_2(m)


# --- configs: a default table, or autotuning (GPU only) ----------------------------------------------------

def chunk_bytes(bits: int, group_size: int, in_features: int) -> int:
    """Bytes per row of one K step (gemv / dequantize): 128 codes at most, inside one group."""
    per = 8 // bits
    return max_chunk(bits, group_size, in_features, 128) // per


def default_gemv_config(m: int, n: int, k: int, bits: int, group_size: int) -> dict:
    return {"BN": 16, "BKB": chunk_bytes(bits, group_size, k), "UNROLL": 4, "num_warps": 4}


def default_split_k(m: int, n: int, k: int, sms: int, bn: int = 64, bm: int = 16) -> int:
    """Split K (a power of two, <= 8, >= 4 K tiles of 128 per split) until the M x N tiles give >= 4 programs
    per SM for M <= 32, >= 1 above: at decode sizes one program per tile leaves too few loads in flight (H200
    sweep: split 4 beat split 1 on all four Llama-3-8B shapes at M = 1..16); from M = 64 the larger tiles are
    best at about one program per SM (H100 sweep, benchmarks/RESULTS.md session 10)."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    target = (4 if m <= 32 else 1) * sms
    split = 1
    while tiles * split < target and split < 8 and k // (split * 2) >= 512:
        split *= 2
    return split


def default_gemm_config(m: int, n: int, k: int, bits: int, group_size: int) -> dict:
    bk_max = max_chunk(bits, group_size, k, 256)
    if m <= 16:
        c = {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4, "FOLD": True}
    elif m <= 32:
        c = {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4, "FOLD": True}
    elif m <= 64:  # M > 32: from a sweep of 64-128 configs per M on an H100 (RESULTS.md, session 10)
        c = {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3, "FOLD": False}
    elif m <= 128:
        c = {"BM": 128, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3, "FOLD": False}
    else:
        c = {"BM": 128, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3, "FOLD": False}
    c["BK"] = min(c["BK"], bk_max)
    if c["num_warps"] == 8 and c["BK"] < 128:  # this tile at BK 64 with 3+ stages wrote wrong output tiles on an
        c["num_stages"] = 2                    # H100 (Triton 3.6, RESULTS.md session 10); 2 stages were right
    return c


def _gemv_configs():
    return [triton.Config({"BN": bn, "UNROLL": u}, num_warps=w, num_stages=1)
            for bn, u, w in [(8, 4, 2), (16, 2, 4), (16, 4, 4), (32, 2, 4), (32, 4, 8), (64, 2, 8)]]


def _dot_configs():
    spec = [  # BM, BN, BK, warps, stages, FOLD
        (16, 64, 128, 4, 4, True), (16, 128, 128, 4, 3, True), (16, 64, 128, 4, 4, False), (16, 32, 128, 4, 4, True),
        (32, 64, 128, 4, 4, True), (64, 128, 64, 4, 4, False), (64, 64, 128, 4, 3, False),
        (128, 64, 128, 4, 3, False), (128, 128, 128, 8, 3, False),
    ]  # not (128, 128, 64, 8, 3): it wrote wrong output tiles on an H100 (benchmarks/RESULTS.md, session 10)
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "FOLD": f}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st, f in spec]


def _prune_dot(configs, named_args, **kw):
    bits = kw.get("BITS", named_args.get("BITS"))
    mb, gsize, k = named_args["MB"], named_args["gsize"], named_args["K"]
    bk_max = max_chunk(bits, gsize, k, 256)
    bms = {1: (16,), 2: (16,), 4: (16,), 8: (16,), 16: (16,), 32: (16, 32), 64: (32, 64)}.get(mb, (64, 128))
    return [c for c in configs if c.kwargs["BM"] in bms and c.kwargs["BK"] <= bk_max] or \
        [c for c in configs if c.kwargs["BM"] in bms and c.kwargs["BK"] == 64]


def _bench(fn, quantiles):
    # Triton's do_bench clears L2 before every run, so configs are ranked on weights read from HBM
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_TUNED = {}


def _tuned(name: str):
    """The autotuned kernel (configs benchmarked once per key: M bucket, N, K, group size, format; results cached
    in Triton's cache directory)."""
    if name not in _TUNED:
        common = dict(do_bench=_bench, cache_results=True)
        if name == "gemv":
            _TUNED[name] = triton.autotune(_gemv_configs(), key=["MB", "N", "K", "gsize", "BITS", "HAS_Z"],
                                           **common)(_gemv_kernel)
        else:
            _TUNED[name] = triton.autotune(_dot_configs(), key=["MB", "N", "K", "gsize", "BITS", "HAS_Z", "SPLIT_K"],
                                           prune_configs_by={"early_config_prune": _prune_dot}, **common)(_dot_kernel)
    return _TUNED[name]


def best_config(name: str) -> str | None:
    """The config the autotuner chose on its last run ('gemv' or 'gemm'), for reports."""
    t = _TUNED.get(name)
    c = getattr(t, "best_config", None)
    return None if c is None else f"{c.kwargs} w{c.num_warps} s{c.num_stages}"


# --- launchers ---------------------------------------------------------------------------------------------

def _dummy(t: torch.Tensor) -> torch.Tensor:
    return t  # any valid pointer for an operand the kernel never reads (constexpr flag off)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
         group_size: int, n_out: int, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8, contiguous rows) -> y [M, N] in x.dtype. config: {'BN','BKB','UNROLL','num_warps'}
    (default: default_gemv_config, or the autotuner when AUTOTUNE)."""
    m, k = x.shape
    if m > 8:
        raise ValueError("gemv takes at most 8 rows; use gemm")
    y = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    bm = _mbucket(m)
    args = (x, packed, scales, _dummy(scales) if zeros is None else zeros, _dummy(scales) if bias is None else bias, y,
            m, n_out, k, packed.shape[1], group_size, bm, x.stride(0), packed.stride(0), scales.stride(0), y.stride(0))
    flags = dict(BITS=bits, HAS_Z=zeros is not None, HAS_BIAS=bias is not None, BM=bm)
    cfg_asm = (config or {}).get("USE_ASM", not INTERPRET)
    if config is None and AUTOTUNE and not INTERPRET:
        _tuned("gemv")[lambda meta: (triton.cdiv(n_out, meta["BN"]),)](
            *args, **flags, BKB=chunk_bytes(bits, group_size, k), USE_ASM=cfg_asm)
        return y
    cfg = {**default_gemv_config(m, n_out, k, bits, group_size), **(config or {}), "USE_ASM": cfg_asm}
    warps = cfg.pop("num_warps", 4)
    cfg.pop("num_stages", None)
    if cfg["BKB"] * (8 // bits) > max_chunk(bits, group_size, k, 1 << 20):
        raise ValueError(f"K step of {cfg['BKB'] * (8 // bits)} codes straddles groups of {group_size}")
    _gemv_kernel[(triton.cdiv(n_out, cfg["BN"]),)](*args, **flags, **cfg, num_warps=warps)
    return y


def gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
         group_size: int, n_out: int, bias: torch.Tensor | None = None, config: dict | None = None,
         split_k: int | None = None) -> torch.Tensor:
    """Tensor-core kernel for any M. x [M, K] fp16/bf16 -> y [M, N] in x.dtype. config: {'BM','BN','BK','FOLD',
    'num_warps','num_stages'} (default: default_gemm_config, or the autotuner when AUTOTUNE)."""
    m, k = x.shape
    tuned = config is None and AUTOTUNE and not INTERPRET
    cfg = {**default_gemm_config(m, n_out, k, bits, group_size), **(config or {})}
    cfg["USE_ASM"] = cfg.get("USE_ASM", not INTERPRET)
    if split_k is None:
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 8
        split_k = default_split_k(m, n_out, k, sms, cfg["BN"], cfg["BM"])
    split_k = max(1, int(split_k))
    y, stride_ys = split_output(x, m, n_out, split_k)
    mb = _mbucket(m)
    args = (x, packed, scales, _dummy(scales) if zeros is None else zeros, _dummy(scales) if bias is None else bias, y,
            m, n_out, k, packed.shape[1], group_size, mb,
            x.stride(0), packed.stride(0), scales.stride(0), y.stride(-2), stride_ys)
    flags = dict(BITS=bits, HAS_Z=zeros is not None, HAS_BIAS=bias is not None and split_k == 1,
                 IS_BF16=x.dtype == torch.bfloat16, SPLIT_K=split_k)
    if tuned:
        flags["USE_ASM"] = cfg["USE_ASM"]
        def grid(meta):
            return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n_out, meta["BN"]), split_k)
        _tuned("gemm")[grid](*args, **flags)
    else:
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
        if cfg["BK"] > max_chunk(bits, group_size, k, 1 << 20):
            raise ValueError(f"K tile of {cfg['BK']} codes straddles groups of {group_size}")
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n_out, cfg["BN"]), split_k)
        _dot_kernel[grid](*args, **flags, **cfg, num_warps=warps, num_stages=stages)
    return y if split_k == 1 else sum_splits(y, x.dtype, bias)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype, bn: int = 32, num_warps: int = 4) -> torch.Tensor:
    """Dense [N, K] weight in `dtype`, equal to QuantizedWeight.dequantize(dtype)."""
    n = packed.shape[0]
    out = torch.empty(n, in_features, device=packed.device, dtype=dtype)
    bkb = chunk_bytes(bits, group_size, in_features)
    grid = (triton.cdiv(n, bn), triton.cdiv(in_features, bkb * (8 // bits)))
    _dequant_kernel[grid](packed, scales, scales if zeros is None else zeros, out, n, in_features, packed.shape[1],
                          group_size, packed.stride(0), scales.stride(0), out.stride(0),
                          BITS=bits, HAS_Z=zeros is not None, BN=bn, BKB=bkb, num_warps=num_warps)
    return out
