"""Per-token FP8 (E4M3) quantization of a linear's input in one Triton kernel (imported only on CUDA use).

The PyTorch formulation (core.quant.w8a8.quantize_per_token_fp8) takes several kernels and temporaries over the
whole activation; on an H100 that cost more than the FP8 GEMM saved at prefill sizes (benchmarks/RESULTS.md). Here
one program per row reads it twice (max |x|, then scale and convert) and writes only the codes and the scale.
Numbers: scale = max|x| / 448 (IEEE division; 1 for an all-zero row), code = x / scale (IEEE) rounded to the
nearest E4M3 value — the reference's, checked against it at first use (core.quant.w8a8.fp8_kernel_ok).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
MAX_BLOCK = 1024  # columns per load; the H100 sweep (512, 1024) was flat, 128 was 4-14x slower


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, QMAX: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    m = tl.max(amax, axis=0)
    s = tl.where(m > 0, tl.math.div_rn(m, QMAX), 1.0)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, s), -QMAX), QMAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=offs < K)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 / bf16 / fp16 -> (float8_e4m3fn codes [M, K], float32 scale [M, 1])."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and k:
        block = min(MAX_BLOCK, triton.next_power_of_2(k))
        _per_token_fp8_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, QMAX=FP8_MAX)
    return q, s
