"""Per-token FP8 (E4M3) quantization of a linear's input in one Triton kernel (imported only on CUDA use), and the
same quantization fused into the ops that produce such inputs: a Llama-style RMSNorm (rmsnorm_fp8) and a gated
MLP's silu(gate) * up (silu_mul_fp8), used by core.fusion.

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

from . import pdl
from .pdl import pdl_launch_dependents, pdl_wait

FP8_MAX = 448.0
ROW_IN_REGISTERS = 16384  # widest row read once; wider rows take two passes of CHUNK columns
CHUNK = 2048  # the H100 sweep (1024-4096 columns, 4/8 warps) was flat within 10 % at 8 warps; 128 was 4-14x slower


@triton.jit
def _div_rn(v, s, r):
    """v / s correctly rounded, from r = 1 / s (correctly rounded): q = v * r, then one Newton correction with
    the remainder v - q * s from an FMA (Markstein; tests/test_kernels.py checks the formula on 10^6 quotients).
    tl.math.div_rn per element costs 1.4-1.9x the memory time at 14336 columns on an H100; this is three
    FMA-class instructions. (Quotients here are <= 448 in magnitude and a wrong last bit below 2^-9 cannot change
    an E4M3 code, so the theorem's overflow and underflow exclusions do not matter.)"""
    q = v * r
    e = tl.fma(-q, s, v)
    return tl.fma(e, r, q)


@triton.jit
def _quantize_row(v, offs, K, q_row, s_ptr, row, QMAX: tl.constexpr):
    """Codes and scale of one row v (float32, zero past K) held in registers."""
    m = tl.max(tl.abs(v), axis=0)
    s = tl.where(m > 0, tl.math.div_rn(m, QMAX), 1.0)
    r = tl.math.div_rn(1.0, s)
    q = tl.minimum(tl.maximum(_div_rn(v, s, r), -QMAX), QMAX)
    tl.store(q_row + offs, q.to(tl.float8e4nv), mask=offs < K)
    tl.store(s_ptr + row, s)


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          QMAX: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_PASS:  # BLOCK >= K: the row stays in registers between the max and the conversion
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        _quantize_row(v, offs, K, q_row, s_ptr, row, QMAX)
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


@triton.jit
def _rmsnorm_fp8_kernel(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, K, stride_x, stride_y, stride_q, eps,
                        BLOCK: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, PDL: tl.constexpr = 0):
    """y = w * (x * rsqrt(mean(x^2) + eps)) as transformers' Llama-style RMSNorm computes it (float32, the
    normalized row rounded to x's dtype before the weight), and with QUANT its per-token FP8 codes. PDL: see
    core.kernels.pdl (LATE: the next kernel may launch once the row is loaded)."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL, 1)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    pdl_launch_dependents(PDL, 2)
    var = tl.sum(v * v, axis=0) / K
    h = (v * tl.math.rsqrt(var + eps)).to(y_ptr.dtype.element_ty).to(tl.float32)
    y = (w * h).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y, mask=offs < K)
    if QUANT:
        _quantize_row(y.to(tl.float32), offs, K, q_ptr + row * stride_q, s_ptr, row, QMAX)


@triton.jit
def _silu_mul_fp8_kernel(g_ptr, u_ptr, h_ptr, q_ptr, s_ptr, K, stride_g, stride_u, stride_h, stride_q,
                         BLOCK: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, PDL: tl.constexpr = 0):
    """h = silu(g) * u as a gated MLP computes it in g's dtype (silu rounded, then the product rounded); with
    QUANT only h's per-token FP8 codes are written, else h. silu's exp and division run at the GPU's fast
    precision (a few float32 ulps): after the rounding to bf16, h equalled PyTorch's silu(g) * u on all 29 M
    values of an H100 check, and libdevice's expf with an IEEE division made the kernel 1.2x (plain) to 1.8x
    (with codes) slower at 14336 columns (benchmarks/RESULTS.md)."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL, 1)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    g = tl.load(g_ptr + row * stride_g + offs, mask=offs < K, other=0.0)
    u = tl.load(u_ptr + row * stride_u + offs, mask=offs < K, other=0.0).to(tl.float32)
    pdl_launch_dependents(PDL, 2)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    h = (a * u).to(g.dtype)
    if QUANT:
        _quantize_row(h.to(tl.float32), offs, K, q_ptr + row * stride_q, s_ptr, row, QMAX)
    else:
        tl.store(h_ptr + row * stride_h + offs, h, mask=offs < K)


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def launch_config(k: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) for rows of k columns. Whole rows: 4 warps up to 2048 columns, 8 up to 8192,
    16 beyond (H100: 8 warps were best at 4096 columns, 16 at 14336)."""
    block = triton.next_power_of_2(k)
    if block <= ROW_IN_REGISTERS:
        return block, True, _row_warps(block)
    return CHUNK, False, 8


def fusable_width(k: int) -> bool:
    """Whether rmsnorm_fp8 / silu_mul_fp8 take rows of k columns (one row in registers)."""
    return 0 < k and triton.next_power_of_2(k) <= ROW_IN_REGISTERS


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


def _codes(m: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((m, k), dtype=torch.float8_e4m3fn, device=device),
            torch.empty((m, 1), dtype=torch.float32, device=device))


def rmsnorm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = True):
    """x [M, K] (bf16 / fp16), weight [K] of x's dtype -> (y [M, K], codes [M, K] or None, scale [M, 1] or None):
    the RMSNorm's output and, with quantize, per_token_fp8(y) from the same pass."""
    x = x.contiguous()
    m, k = x.shape
    if not fusable_width(k):
        raise ValueError(f"rows of {k} columns are wider than {ROW_IN_REGISTERS}")
    y = torch.empty_like(x)
    q, s = _codes(m, k, x.device) if quantize else (y, y)
    if m:
        block = triton.next_power_of_2(k)
        mode = pdl.mode(x.device, m)
        _rmsnorm_fp8_kernel[(m,)](x, weight, y, q, s, k, x.stride(0), y.stride(0), q.stride(0), eps, BLOCK=block,
                                  QUANT=quantize, QMAX=FP8_MAX, PDL=mode, num_warps=_row_warps(block),
                                  **pdl.launch(mode))
    return (y, q, s) if quantize else (y, None, None)


def silu_mul_fp8(g: torch.Tensor, u: torch.Tensor, quantize: bool = True):
    """g, u [M, K] (bf16 / fp16, last dim contiguous) -> (codes, scale) of per_token_fp8(silu(g) * u), or with
    quantize=False silu(g) * u itself (one tensor)."""
    m, k = g.shape
    if g.stride(1) != 1 or u.stride(1) != 1 or u.shape != g.shape:
        raise ValueError("silu_mul_fp8 takes two [M, K] tensors with contiguous rows")
    if not fusable_width(k):
        raise ValueError(f"rows of {k} columns are wider than {ROW_IN_REGISTERS}")
    if quantize:
        q, s = _codes(m, k, g.device)
        h = q
    else:
        h = torch.empty((m, k), dtype=g.dtype, device=g.device)
        q = s = h
    if m:
        block = triton.next_power_of_2(k)
        mode = pdl.mode(g.device, m)
        _silu_mul_fp8_kernel[(m,)](g, u, h, q, s, k, g.stride(0), u.stride(0), h.stride(0), q.stride(0), BLOCK=block,
                                   QUANT=quantize, QMAX=FP8_MAX, PDL=mode, num_warps=_row_warps(block),
                                   **pdl.launch(mode))
    return (q, s) if quantize else h
