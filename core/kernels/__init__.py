"""Fast kernels for compressed linears, and the dispatcher that picks one (or the reference path).

Importing this package never imports triton: core.kernels.w4a16 (the Triton kernels) is imported on the first
call that runs on CUDA. The reference path (dequantize, then F.linear) is the fallback and the oracle.
"""
from .dispatch import (
    DOT_MAX_M,
    GEMV_MAX_M,
    KERNEL_BITS,
    kernel_for,
    quant_matmul,
    reference_matmul,
    triton_available,
)

__all__ = ["DOT_MAX_M", "GEMV_MAX_M", "KERNEL_BITS", "kernel_for", "quant_matmul", "reference_matmul",
           "triton_available"]
