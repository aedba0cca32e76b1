"""FP8 W8A8 matmul for decode-sized inputs (M <= 16): per-token FP8 codes of x times per-channel FP8 weight codes
(imported only on CUDA use, or under Triton's interpreter in tests).

torch._scaled_mm runs cuBLASLt's GEMM, whose tiles are made for large M: on an H100 at M = 1 it reads the
Llama-3-8B down_proj's 58.7 MB in 38 us (1.5 TB/s), and k/v's in 12.7 us, slower than bf16 (7.3 us). Here each
program owns BN output channels and walks K in chunks of BK: x's codes (M rows, padded to 16) times the channel
block's codes by tl.dot in fp32 on the FP8 tensor cores, Triton's pipeline keeping a few chunks of weights in
flight; then y = acc * x_scale[m] * w_scale[n] (+ bias) in the output dtype. The same products as
core.quant.w8a8.fp8_matmul_reference (FP8 x FP8 is exact in fp32), summed in another order.
benchmarks/RESULTS.md: 1.17-1.8x faster than _scaled_mm at M = 1..16 on the 8B shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 16


@triton.jit
def _fp8_skinny_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, 16)
    acc = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn < N)[:, None] & (rk < K)[None, :],
                    other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                    other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def default_config(n: int) -> dict:
    """H100 sweep (BN 16/32/64, BK 256/512, 4/8 warps, 1/3 stages; results/gpu_fp8_skinny_sweep.json): 32
    channels x 512 codes per step, or 64 x 256 for wide layers (N >= 8192); 4 warps, 3 stages."""
    return {"BN": 64, "BK": 256, "num_warps": 4, "num_stages": 3} if n >= 8192 else \
        {"BN": 32, "BK": 512, "num_warps": 4, "num_stages": 3}


def fp8_skinny_matmul(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a: float8_e4m3fn [M, K] (M <= 16, rows contiguous), a_scale float32 [M, 1]; w: float8_e4m3fn [N, K] (rows
    contiguous), w_scale float32 [N] -> (a * a_scale) @ (w * w_scale)^T (+ bias) [M, N] in out_dtype."""
    m, k = a.shape
    n = w.shape[0]
    if m > MAX_M or a.stride(1) != 1 or w.stride(1) != 1 or w.shape[1] != k:
        raise ValueError(f"fp8_skinny_matmul takes up to {MAX_M} rows with contiguous rows; got {tuple(a.shape)}")
    y = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return y
    cfg = default_config(n)
    _fp8_skinny_kernel[(triton.cdiv(n, cfg["BN"]),)](
        a, a_scale.reshape(-1), w, w_scale, w_scale if bias is None else bias, y, m, n, k, a.stride(0), w.stride(0),
        y.stride(0), BN=cfg["BN"], BK=cfg["BK"], HAS_BIAS=bias is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y
