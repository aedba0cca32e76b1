"""Pick a matmul for a weight-only quantized linear (a QuantLinear or anything with its attributes: packed,
scales, zeros, bits, group_size, in_features, out_features, bias, qweight) by device, dtype, format and M.

  reference        dequantize to the input dtype, then F.linear (any device, any format): the oracle
  gemv_words       Triton, M == 1, 4/8-bit rows of whole 32-bit words (w4_words.py): CUDA-core FMAs on codes
                   taken from 32-bit words in the load's register layout (glu_matmul: with a gated MLP's
                   silu(gate) * up in its epilogue; rope_matmul: with the rotary embedding and KV-cache write of
                   a merged q/k/v projection)
  mma              Triton + PTX mma.sync, 2 <= M <= MMA_MAX_M, symmetric 4-bit codes, bf16 x, groups of a
                   multiple of 128 (w4_mma.py): codes made into bf16 pairs in registers feed the tensor cores
  gemv             Triton, M <= GEMV_MAX_M: streams the packed weight once, CUDA-core FMAs
  gemm             Triton, GEMV_MAX_M < M <= DOT_MAX_M: tensor cores, tiles dequantized in registers,
                   split-K at decode sizes
  dequant+cublas   M > DOT_MAX_M: Triton dequantize to a dense weight, then cuBLAS

The thresholds come from benchmarks/gpu_kernels.py on an H200 (benchmarks/results/gpu_kernels.json): the
tensor-core kernel with split-K beat the CUDA-core GEMV at every M on the Llama-3-8B shapes, so GEMV_MAX_M = 0
(gemv stays callable with path="gemv"). With the tile rules of an H100 sweep (session 10) the fused GEMM beats
dequantize + cuBLAS up to M = 256 (M = 128: half its time); above that dequantize + cuBLAS runs. At M = 1,
gemv_words beat both on an H100 (benchmarks/gpu_w4_words.py); at 2 <= M <= 16, mma beat gemm on every Llama-3-8B
shape (benchmarks/gpu_w4_mma.py).
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KERNEL_BITS = (4, 8)
MMA_MAX_M = 16
GEMV_MAX_M = 0
DOT_MAX_M = 256
_FLOAT16 = (torch.float16, torch.bfloat16)
_failed: set[tuple] = set()
GLU_EPILOGUE = True  # False: glu_matmul declines (gate/up and silu as separate kernels, for A/B runs)
ROPE_EPILOGUE = True  # False: rope_matmul declines (q/k/v product, then the rotary + cache kernel)
RESIDUAL_EPILOGUE = True  # False: residual_matmul declines (the product, then a separate residual add)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401,F811
    except Exception:  # ImportError, or a broken install
        return False
    return True


def _group_ok(bits: int, group_size: int, in_features: int) -> bool:
    """Same rule as w4a16.supported, without importing triton: chunks of >= 32 (4-bit) / 16 (8-bit) codes
    aligned to a power of two that divides the group size (or any, when each row is one group)."""
    if group_size >= in_features:
        return True
    need = 32 if bits == 4 else 16
    return group_size % need == 0


def reference_matmul(x: torch.Tensor, q) -> torch.Tensor:
    """What QuantLinear has always computed: dequantize to x's dtype, then F.linear."""
    if hasattr(q, "reference_forward"):
        return q.reference_forward(x)
    bias = None if q.bias is None else q.bias.to(x.dtype)
    return F.linear(x, q.qweight.dequantize(x.dtype), bias)


def _words_ok(q) -> bool:
    """Same rule as w4_words.supported, without importing triton."""
    p = q.packed
    aligned = torch.compiler.is_compiling() or p.storage_offset() % 4 == 0  # see w4_words.word_aligned
    return (q.bits in (4, 8) and p.dim() == 2 and p.shape[1] % 4 == 0 and p.stride(-1) == 1
            and p.stride(0) % 4 == 0 and aligned
            and (q.group_size >= q.in_features or q.group_size % (32 // q.bits) == 0))


def _mma_ok(q, m: int, dtype: torch.dtype) -> bool:
    """Same rule as w4_mma.supported, without importing triton."""
    p = q.packed
    return (q.bits == 4 and q.zeros is None and dtype == torch.bfloat16 and 2 <= m <= MMA_MAX_M
            and q.in_features % 128 == 0 and (q.group_size >= q.in_features or q.group_size % 128 == 0)
            and p.dim() == 2 and p.stride(-1) == 1 and p.stride(0) % 16 == 0 and p.shape[1] * 2 == q.in_features)


def kernel_for(x: torch.Tensor, q) -> str:
    """The path quant_matmul(x, q) takes: 'gemv_words', 'mma', 'gemv', 'gemm', 'dequant+cublas' or 'reference'."""
    if torch.is_grad_enabled() and (x.requires_grad or (q.bias is not None and q.bias.requires_grad)):
        return "reference"  # the kernels have no backward
    if not (x.is_cuda and q.packed.is_cuda and x.dtype in _FLOAT16 and q.bits in KERNEL_BITS
            and x.shape[-1] == q.in_features and q.packed.stride(-1) == 1):
        return "reference"  # (the kernels read each packed row as contiguous bytes)
    m = math.prod(x.shape[:-1])
    if m == 0 or not triton_available():
        return "reference"
    if m == 1 and _words_ok(q) and ("gemv_words", x.device.index, q.bits, x.dtype) not in _failed:
        return "gemv_words"
    if _mma_ok(q, m, x.dtype) and ("mma", x.device.index, q.bits, x.dtype) not in _failed:
        return "mma"
    if not _group_ok(q.bits, q.group_size, q.in_features):
        return "reference"
    path = "gemv" if m <= GEMV_MAX_M else "gemm" if m <= DOT_MAX_M else "dequant+cublas"
    return "reference" if (path, x.device.index, q.bits, x.dtype) in _failed else path


def _gemv_epilogue(x: torch.Tensor, q, key: tuple, **epilogue) -> torch.Tensor | None:
    """w4_words.gemv of one token x with an epilogue (glu=True, rope=... or residual=...), or None if that kernel
    raises: as in quant_matmul, the failure is reported once and the caller runs the separate kernels from then on."""
    from . import w4_words

    bias = None if q.bias is None else q.bias.detach()
    try:
        return w4_words.gemv(x.reshape(1, q.in_features).contiguous(), q.packed, q.scales, q.zeros, q.bits,
                             q.group_size, q.out_features, bias, **epilogue)
    except Exception as e:  # noqa: BLE001  (triton's CompilationError is no RuntimeError)
        log.warning("%s kernel with its epilogue failed (%s); using the separate kernels", key[0], e)
        _failed.add(key)
        return None


def glu_matmul(x: torch.Tensor, q) -> torch.Tensor | None:
    """silu(gate) * up [..., width] for a stacked [gate; up] quantized linear q (out_features = 2 width, core.merge)
    from one kernel: the batch-1 GEMV with the activation in its epilogue (w4_words.gemv(glu=True)), which saves the
    activation's kernel and the product's round trip. None where it does not apply (M > 1, the reference path, K
    over one chunk, or the kernel failed here before): the caller then runs q and the activation itself."""
    if not GLU_EPILOGUE or not getattr(q, "fast", True) or kernel_for(x, q) != "gemv_words":
        return None
    from . import w4_words

    key = ("gemv_glu", x.device.index, q.bits, x.dtype)
    if key in _failed or not w4_words.glu_supported(q.out_features, q.in_features, q.bits):
        return None
    y = _gemv_epilogue(x, q, key, glu=True)
    return None if y is None else y.view(*x.shape[:-1], q.out_features // 2)


def rope_matmul(x: torch.Tensor, q, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor | None:
    """For a merged q/k/v quantized linear q (core.merge; a bias, as Qwen2's, is added before the rotation) and one
    token x [1, 1, K]: q rotated [1, heads, 1, D], with k rotated and v written into the caches [1, kv_heads, L, D]
    at pos, from the batch-1 GEMV's epilogue (w4_words.gemv(rope=...)), as the product followed by
    core.kernels.rope_cache would give them. None where it does not apply; the caller then runs q and the rotary
    kernel itself."""
    if (not ROPE_EPILOGUE or not getattr(q, "fast", True) or x.dim() != 3 or x.shape[:2] != (1, 1)
            or kernel_for(x, q) != "gemv_words"):
        return None
    from . import w4_words

    key = ("gemv_rope", x.device.index, q.bits, x.dtype)
    if key in _failed or not w4_words.rope_supported(x.reshape(1, -1), q.out_features, q.bits, cos, sin, pos,
                                                      k_cache, v_cache, heads, kv_heads):
        return None
    y = _gemv_epilogue(x, q, key, rope=(cos, sin, pos, k_cache, v_cache, heads, kv_heads))
    return None if y is None else y.view(1, 1, heads, -1).transpose(1, 2)


def residual_matmul(x: torch.Tensor, q, residual: torch.Tensor) -> torch.Tensor | None:
    """residual + q(x) for one token from the batch-1 GEMV, which adds the residual where it writes its output (or
    sums its K splits): a decoder layer's residual add without its own kernel, rounded as that add would round it.
    None where it does not apply; the caller then adds."""
    if (not RESIDUAL_EPILOGUE or not getattr(q, "fast", True) or kernel_for(x, q) != "gemv_words"
            or residual.shape[-1] != q.out_features or residual.numel() != q.out_features
            or residual.dtype != x.dtype):
        return None
    key = ("gemv_residual", x.device.index, q.bits, x.dtype)
    if key in _failed:
        return None
    y = _gemv_epilogue(x, q, key, residual=residual.reshape(1, q.out_features).contiguous())
    return None if y is None else y.view(residual.shape)


def quant_matmul(x: torch.Tensor, q, path: str | None = None) -> torch.Tensor:
    """y = x @ dequant(q)^T + bias with the fastest applicable kernel (or `path`, forced, for tests/benchmarks).
    A kernel that raises (e.g. does not compile on this GPU) is reported once and not tried again on that
    device; the reference path answers instead."""
    path = path or kernel_for(x, q)
    if path == "reference":
        return reference_matmul(x, q)
    from . import w4a16

    lead = x.shape[:-1]
    x2 = x.reshape(-1, q.in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != q.in_features):
        x2 = x2.contiguous()
    bias = None if q.bias is None else q.bias.detach()
    args = (q.packed, q.scales, q.zeros, q.bits, q.group_size)
    try:
        if path == "gemv_words":
            from . import w4_words

            y = w4_words.gemv(x2, *args, q.out_features, bias)
        elif path == "mma":
            from . import w4_mma

            y = w4_mma.matmul(x2, q.packed, q.scales, q.group_size, q.out_features, bias)
        elif path == "gemv":
            y = w4a16.gemv(x2, *args, q.out_features, bias)
        elif path == "gemm":
            y = w4a16.gemm(x2, *args, q.out_features, bias)
        elif path == "dequant+cublas":
            w = w4a16.dequantize(*args, q.in_features, x.dtype)
            y = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
        else:
            raise ValueError(f"unknown path {path!r}")
    except Exception as e:  # noqa: BLE001  (triton's CompilationError is no RuntimeError)
        if isinstance(e, ValueError) and str(e).startswith("unknown path"):
            raise
        key = (path, x.device.index, q.bits, x.dtype)
        if key not in _failed:
            log.warning("quantized matmul kernel %s failed (%s); using the reference path", path, e)
            _failed.add(key)
        return reference_matmul(x, q)
    return y.view(*lead, q.out_features)
