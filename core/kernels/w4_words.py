"""4-bit weight-only matmul kernels that read each packed row as 32-bit words (decode sizes, M <= 64).

    y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias),   dequant(W)[n, k] = (code[n, k] - zero[n, g]) * scale[n, g]

slimlm's 4-bit rows (core.quant.packing: byte j holds code 2j low, 2j+1 high) read as little-endian int32 are
words of 8 codes in order: nibble i of word j is code 8j + i. So the stored format needs no repacking: a program
loads a [BN rows, BKW words] tile with 16-byte vector loads along K and takes the 8 codes of every word with one
shift and one mask each, keeping everything in the load's register layout (the older kernels in w4a16.py unpack
bytes with join + reshape, which moves data between threads and left them instruction-bound at ~27 % of HBM
bandwidth).

A code becomes a float without an int->float conversion: the nibble moved to bits 16..19 of 0x43000000 is the
float32 128 + code, exact. Scales / zeros are gathered per (row, word), so any group size that is a multiple of
8 works (including a last group the group size does not divide); the launchers refuse others.

  _gemv_words_kernel  M == 1, CUDA-core FMAs: y[n] = sum_words s * (sum_i (128 + c_i) x_i - (128 + z) sum_i x_i);
                      partial sums stay per (row, word) in registers and are reduced once at the end.
  _dot_words_kernel   M <= 64, tensor cores: for each nibble position i the [BN, BKW] tile of codes i is
                      dequantized ((c - z) * s in float32, rounded once to the activation dtype, as the
                      reference does) and multiplied with x's column k = 8j + i via tl.dot.
Both can split K over programs (float32 partials summed by the launcher).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _code_f32(wu, i: tl.constexpr):
    """float32 128 + (nibble i of each uint32 word), exact: the nibble moved to bits 16..19 of 0x43000000."""
    if i < 4:
        t = wu << (16 - 4 * i)
    elif i == 4:
        t = wu
    else:
        t = wu >> (4 * i - 16)
    return ((t & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _group_of_word(kw, gsize, GSHIFT: tl.constexpr):
    """Quantization group of word kw: a shift when a group is 2**GSHIFT words (an integer division costs ~20
    instructions per element on the GPU), else a division."""
    if GSHIFT >= 0:
        return kw >> GSHIFT
    return (kw * 8) // gsize


@triton.jit
def _gemv_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                       N, K, KW, gsize, stride_wn, stride_sn, stride_ys,
                       HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BN: tl.constexpr, BKW: tl.constexpr, GSHIFT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rw = tl.arange(0, BKW)
    n_steps = tl.cdiv(KW, BKW)
    per_split = tl.cdiv(n_steps, SPLIT_K)
    s0 = pid_k * per_split
    s1 = tl.minimum(s0 + per_split, n_steps)
    acc = tl.zeros([BN, BKW], dtype=tl.float32)
    for st in range(s0, s1):
        kw = st * BKW + rw
        wmask = nmask[:, None] & (kw < KW)[None, :]
        wu = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :], mask=wmask, other=0).to(tl.uint32, bitcast=True)
        part = tl.zeros([BN, BKW], dtype=tl.float32)
        xs = tl.zeros([BKW], dtype=tl.float32)
        for i in tl.static_range(8):
            k = kw * 8 + i
            xi = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            part += _code_f32(wu, i) * xi[None, :]
            xs += xi
        g = _group_of_word(kw, gsize, GSHIFT)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0).to(tl.float32)
        else:
            z = tl.full([BN, BKW], 8.0, tl.float32)
        acc += s * (part - (128.0 + z) * xs[None, :])
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(y_ptr + pid_k * stride_ys + rn, y, mask=nmask)


@triton.jit
def _dot_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                      M, N, K, KW, gsize, stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                      HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, GSHIFT: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    rw = tl.arange(0, BKW)
    n_steps = tl.cdiv(KW, BKW)
    per_split = tl.cdiv(n_steps, SPLIT_K)
    s0 = pid_k * per_split
    s1 = tl.minimum(s0 + per_split, n_steps)
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for st in range(s0, s1):
        kw = st * BKW + rw
        wmask = nmask[:, None] & (kw < KW)[None, :]
        wu = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :], mask=wmask, other=0).to(tl.uint32, bitcast=True)
        g = _group_of_word(kw, gsize, GSHIFT)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0).to(tl.float32)
        else:
            z = tl.full([BN, BKW], 8.0, tl.float32)
        zo = 128.0 + z
        for i in tl.static_range(8):
            k = kw * 8 + i
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + k[:, None], mask=(k < K)[:, None] & mmask[None, :],
                         other=0.0)  # [BKW, BM]
            a = ((_code_f32(wu, i) - zo) * s).to(xt.dtype)  # (c - z) * s, rounded once like the reference
            acc = tl.dot(a, xt, acc)
    ymask = nmask[:, None] & mmask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.store(y_ptr + pid_k * stride_ys + rm[None, :] * stride_ym + rn[:, None], acc, mask=ymask)


# --- launchers -------------------------------------------------------------------------------------------------

import functools  # noqa: E402

import torch  # noqa: E402


def supported(bits: int, group_size: int, in_features: int, packed: torch.Tensor) -> bool:
    """4-bit rows whose bytes fill whole 32-bit words, groups of whole words (or one group per row)."""
    return (bits == 4 and packed.dim() == 2 and packed.shape[1] % 4 == 0 and packed.stride(-1) == 1
            and packed.stride(0) % 4 == 0 and packed.storage_offset() % 4 == 0
            and (group_size >= in_features or group_size % 8 == 0))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(x: torch.Tensor) -> int:
    return 4 * (_sm_count(x.device.index or 0) if x.is_cuda else 8)


def default_split_k(tiles: int, k_words: int, bkw: int, wanted: int) -> int:
    """Split K (power of two, <= 8, >= 4 steps per split) until the tiles x splits reach `wanted` programs."""
    split = 1
    while tiles * split < wanted and split < 8 and k_words // (bkw * split * 2) >= 4:
        split *= 2
    return split


def default_gemv_config(n: int, k: int) -> dict:
    # benchmarks/gpu_w4_words.py on an H100 (results/gpu_w4_words.json): within 7 % of each Llama-3-8B shape's
    # best config
    return {"BN": 16, "BKW": 128, "num_warps": 4, "num_stages": 1}


def default_dot_config(m: int, n: int, k: int) -> dict:
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return {"BM": bm, "BN": 64, "BKW": 32, "num_warps": 4, "num_stages": 3}


def _finish(y: torch.Tensor, split: int, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if split == 1:
        return y
    out = y.sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(dtype)


def group_shift(group_size: int, in_features: int) -> int:
    """log2(words per group) when that is a power of two (one group per row counts: any shift past the row),
    else -1 (the kernels divide)."""
    if group_size >= in_features:
        return 30
    words = group_size // 8
    return words.bit_length() - 1 if words & (words - 1) == 0 else -1


def _check(bits, group_size, k, packed, bkw):
    if not supported(bits, group_size, k, packed):
        raise ValueError(f"w4_words takes 4-bit rows of whole 32-bit words and groups of whole words; got {bits} "
                         f"bits, group {group_size}, {packed.shape[1]} bytes per row")
    if bkw & (bkw - 1):
        raise ValueError(f"BKW must be a power of two, got {bkw}")


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
         group_size: int, n_out: int, bias: torch.Tensor | None = None, config: dict | None = None,
         split_k: int | None = None) -> torch.Tensor:
    """x [1, K] (contiguous) -> y [1, N] in x.dtype."""
    m, k = x.shape
    if m != 1:
        raise ValueError("gemv_words takes one row of x")
    cfg = {**default_gemv_config(n_out, k), **(config or {})}
    _check(bits, group_size, k, packed, cfg["BKW"])
    w = packed.view(torch.int32)
    kw = w.shape[1]
    tiles = triton.cdiv(n_out, cfg["BN"])
    split = max(1, int(split_k)) if split_k else default_split_k(tiles, kw, cfg["BKW"], _programs_wanted(x))
    y = (torch.empty(1, n_out, device=x.device, dtype=x.dtype) if split == 1
         else torch.empty(split, n_out, device=x.device, dtype=torch.float32))
    _gemv_words_kernel[(tiles, split)](
        x, w, scales, scales if zeros is None else zeros, scales if bias is None else bias, y,
        n_out, k, kw, group_size, w.stride(0), scales.stride(0), y.stride(0) if split > 1 else 0,
        HAS_Z=zeros is not None, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
        BN=cfg["BN"], BKW=cfg["BKW"], GSHIFT=group_shift(group_size, k), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return _finish(y, split, bias, x.dtype).view(1, n_out)


def gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
         group_size: int, n_out: int, bias: torch.Tensor | None = None, config: dict | None = None,
         split_k: int | None = None) -> torch.Tensor:
    """Tensor-core kernel. x [M, K] fp16/bf16 (rows contiguous) -> y [M, N] in x.dtype."""
    m, k = x.shape
    cfg = {**default_dot_config(m, n_out, k), **(config or {})}
    _check(bits, group_size, k, packed, cfg["BKW"])
    if cfg["BKW"] < 16:
        raise ValueError("the tensor-core kernel needs BKW >= 16 (tl.dot's K)")
    w = packed.view(torch.int32)
    kw = w.shape[1]
    tiles = triton.cdiv(m, cfg["BM"]) * triton.cdiv(n_out, cfg["BN"])
    split = max(1, int(split_k)) if split_k else default_split_k(tiles, kw, cfg["BKW"], _programs_wanted(x))
    y = (torch.empty(m, n_out, device=x.device, dtype=x.dtype) if split == 1
         else torch.empty(split, m, n_out, device=x.device, dtype=torch.float32))
    _dot_words_kernel[(tiles, split)](
        x, w, scales, scales if zeros is None else zeros, scales if bias is None else bias, y,
        m, n_out, k, kw, group_size, x.stride(0), w.stride(0), scales.stride(0), y.stride(-2),
        y.stride(0) if split > 1 else 0,
        HAS_Z=zeros is not None, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
        BM=cfg["BM"], BN=cfg["BN"], BKW=cfg["BKW"], GSHIFT=group_shift(group_size, k), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return _finish(y, split, bias, x.dtype)
