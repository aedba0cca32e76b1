"""Per-token FP8 (E4M3) quantization of a linear's input in one Triton kernel (imported only on CUDA use).

The PyTorch formulation (core.quant.w8a8.quantize_per_token_fp8) takes several kernels and temporaries over the
whole activation; on an H100 that cost more than the FP8 GEMM saved at prefill sizes (benchmarks/RESULTS.md). Here
one program per row reads it (once when the row fits in registers, else twice: max |x|, then scale and convert)
and writes only the codes and the scale.
Numbers: scale = max|x| / 448 (IEEE division; 1 for an all-zero row), code = x / scale (IEEE) rounded to the
nearest E4M3 value — the reference's, checked against it at first use (core.quant.w8a8.fp8_kernel_ok).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
ROW_IN_REGISTERS = 16384  # widest row read once; wider rows take two passes of CHUNK columns
CHUNK = 2048  # the H100 sweep (1024-4096 columns, 4/8 warps) was flat within 10 % at 8 warps; 128 was 4-14x slower


@triton.jit
def _div_rn(v, s, r):
    """v / s correctly rounded, from r = 1 / s (correctly rounded): q = v * r, then one Newton correction with
    the remainder v - q * s from an FMA (Markstein; tests/test_kernels.py checks the formula on 10^6 quotients). tl.math.div_rn per element costs 1.4-1.9x the memory time at
    14336 columns on an H100; this is three FMA-class instructions. (Quotients here are <= 448 in magnitude and
    a wrong last bit below 2^-9 cannot change an E4M3 code, so the theorem's overflow and underflow exclusions
    do not matter.)"""
    q = v * r
    e = tl.fma(-q, s, v)
    return tl.fma(e, r, q)


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          QMAX: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_PASS:  # BLOCK >= K: the row stays in registers between the max and the conversion
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        m = tl.max(tl.abs(v), axis=0)
        s = tl.where(m > 0, tl.math.div_rn(m, QMAX), 1.0)
        r = tl.math.div_rn(1.0, s)
        q = tl.minimum(tl.maximum(_div_rn(v, s, r), -QMAX), QMAX)
        tl.store(q_row + offs, q.to(tl.float8e4nv), mask=offs < K)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.max(amax, axis=0)
        s = tl.where(m > 0, tl.math.div_rn(m, QMAX), 1.0)
        r = tl.math.div_rn(1.0, s)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_div_rn(v, s, r), -QMAX), QMAX)
            tl.store(q_row + offs, q.to(tl.float8e4nv), mask=offs < K)
    tl.store(s_ptr + row, s)


def launch_config(k: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) for rows of k columns. Whole rows: 4 warps up to 2048 columns, 8 up to 8192,
    16 beyond (H100: 8 warps were best at 4096 columns, 16 at 14336)."""
    block = triton.next_power_of_2(k)
    if block <= ROW_IN_REGISTERS:
        return block, True, 4 if block <= 2048 else 8 if block <= 8192 else 16
    return CHUNK, False, 8


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 / bf16 / fp16 -> (float8_e4m3fn codes [M, K], float32 scale [M, 1])."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and k:
        block, one_pass, warps = launch_config(k)
        _per_token_fp8_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, ONE_PASS=one_pass,
                                    QMAX=FP8_MAX, num_warps=warps)
    return q, s
