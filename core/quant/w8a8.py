"""W8A8: 8-bit weights x 8-bit activations (int8, or FP8 e4m3), with SmoothQuant.

Weights: symmetric, one float32 scale per output channel. Activations: symmetric, one scale per token,
computed on every forward (dynamic). int8: codes in [-127, 127], scale = absmax / 127, and
y = (x_q @ w_q^T)[int32] * x_scale * w_scale. FP8 (float8_e4m3fn): scale = absmax / 448, same layout (the
calibrated path searches each weight channel's FP8 scale instead: search_channel_scale).

Fast paths: torch._int_mm (CPU through oneDNN; CUDA through cuBLAS, which needs M > 16 and K, N multiples
of 8) and torch._scaled_mm (CUDA, compute capability >= 8.9, K and N multiples of 16), or for FP8 at M <= 16
(decode) core.kernels.fp8_skinny. Each is probed
once per device against the reference path and used only where it agrees; otherwise, and for shapes a
kernel refuses, the reference path runs.

SmoothQuant (Xiao et al., 2023): for each input channel j of linears that read the same activation X,
s_j = max|X_j|^alpha / max|W_:j|^(1-alpha); X / s feeds W * s, the same product, but activation outlier
channels move into the weights, which are quantized per output channel and absorb them far better.
X / s is folded into whatever produces X: a norm's weight (and bias), or the rows of a preceding linear.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .linear import (
    Progress,
    convert_linears,
    find_linears,
    replace_linear,
    shared_weight_names,
)

INT8_MAX = 127
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCHEMES = ("int8", "fp8")
FUSED_CODES = "_slimlm_fp8_codes"  # attribute of a tensor carrying its per-token FP8 codes: (codes [M, K],
#                                    float32 scale [M, 1]), set by core.fusion's norm on its output


# --- quantization (pure functions) ---------------------------------------------------------------

def _absmax_scale(t: torch.Tensor, qmax: float) -> torch.Tensor:
    """float32 scale per row (last dim reduced, kept); an all-zero row gets scale 1."""
    s = t.abs().amax(dim=-1, keepdim=True).float() / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 codes [out, in], float32 scale [out])."""
    q, s = quantize_per_token_int8(w.detach())
    return q, s.squeeze(1)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] -> (int8 codes, float32 scale [tokens, 1])."""
    x = x.float()
    s = _absmax_scale(x, INT8_MAX)
    return torch.round(x / s).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), s


def quantize_per_channel_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scale [out])."""
    q, s = quantize_per_token_fp8(w.detach())
    return q, s.squeeze(1)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] -> (float8_e4m3fn codes, float32 scale [tokens, 1]). The same numbers as converting x to
    float32 first (max |x| is exact in any float dtype; x / s promotes to float32), in fewer passes over x:
    it is on the prefill path of every FP8 layer."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).float()
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8), s


def channel_scale(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """float32 scale per output channel of w [out, in]: absmax / 127 (int8) or / 448 (fp8)."""
    return _absmax_scale(w.detach().float(), INT8_MAX if scheme == "int8" else FP8_MAX).squeeze(1)


FP8_SCALE_STEPS = 32  # candidate scales per output channel for search_channel_scale (1: the absmax scale only)


def search_channel_scale(w: torch.Tensor, importance: torch.Tensor, scheme: str = "fp8",
                         steps: int | None = None) -> torch.Tensor:
    """float32 scale per output channel of w [out, in] for the FP8 grid, chosen per channel among
    absmax / 448 * f, f in {1, 1 + 1/steps, ..., 2 - 1/steps}, as the one whose round-to-nearest error
    sum_j importance_j * (w_ij - Q(w)_ij)^2 is smallest (importance [in] >= 0: e.g. the diagonal of
    H = 2/n X^T X, each input channel's mean square up to a factor). FP8's grid is non-uniform and, but for subnormals, the same
    up to powers of two, so f in [1, 2) spans every alignment of the grid with the row; none clips (absmax
    maps to 448 / f > 224) and f = 1 (absmax) is a candidate, kept on ties: never worse on this loss.
    steps: default FP8_SCALE_STEPS. int8's grid is uniform (f > 1 would only drop levels): its absmax scale
    is returned unchanged."""
    steps = FP8_SCALE_STEPS if steps is None else steps
    if scheme != "fp8" or steps <= 1:
        return channel_scale(w, scheme)
    w = w.detach().float()
    imp = importance.detach().float().clamp(min=0).to(w.device)
    base = channel_scale(w, "fp8")
    best_scale, best_err = base, None
    for k in range(steps):
        s = base * (1 + k / steps)
        e = w - quantize_with_scale(w, s, "fp8").float() * s[:, None]
        err = (e * e) @ imp
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, s, best_scale)
    return best_scale


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """w [out, k] -> int8 / float8_e4m3fn codes on the grid of a given per-row scale [out]."""
    x = w.float() / scale[:, None]
    if scheme == "int8":
        return torch.round(x).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x.clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def fake_quantize_activations(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """What a W8A8 layer's matmul sees of its input x [tokens, in]: per-token quantized and dequantized."""
    q, s = (quantize_per_token_int8 if scheme == "int8" else quantize_per_token_fp8)(x)
    return q.float() * s


# --- matmuls: reference and fast paths -----------------------------------------------------------

def int8_matmul_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] @ int8 w [N, K]^T -> int32 [M, N]. In float64 every partial sum is an integer below
    K * 127**2 < 2**53, so the result is exact whatever the summation order."""
    return (a.double() @ w.double().t()).to(torch.int32)


def fp8_matmul_reference(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Dequantize fp8 a [M, K] (scale [M, 1]) and w [N, K] (scale [N]) to float32 and multiply -> float32 [M, N]."""
    return (a.float() * a_scale) @ (w.float() * w_scale[:, None]).t()


def _int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m = a.shape[0]
    if a.device.type == "cuda" and m <= 16:  # cuBLAS int8 GEMM needs M > 16: pad with zero rows
        a = F.pad(a, (0, 0, 0, 17 - m))
    return torch._int_mm(a, w.t())[:m]  # w.t(): a column-major view, the layout cuBLAS wants


# Hopper's FP8 tensor cores accumulate at reduced precision unless the kernel promotes partial sums to float32
# every few k-steps; "fast accumulation" skips that promotion, as vLLM's and torchao's inference GEMMs do. H100,
# Llama-3-8B shapes (benchmarks/RESULTS.md): 5-15 % faster at M >= 2048. Its float32 output is off by 1.2e-3
# relative (K = 4096) from a float64 product of the same codes, the Triton kernel's (fp8_skinny) by 2e-7; with
# bf16 outputs, 2.1e-3 (K = 4096) and 3.2e-3 (K = 14336) instead of 1.7e-3 (scratch runs, session 6). Far below
# the error of rounding the operands to FP8 (a few per cent).
FP8_FAST_ACCUM = True


def _scaled_mm(a, a_scale, w, w_scale, out_dtype) -> torch.Tensor:
    return torch._scaled_mm(a, w.t(), scale_a=a_scale, scale_b=w_scale[None, :], out_dtype=out_dtype,
                            use_fast_accum=FP8_FAST_ACCUM)


def probed_once(default):
    """Cache a per-device kernel probe, in a way torch.compile can read: while Dynamo traces, the stored result is
    returned (`default` if the probe never ran eagerly) and the probe itself (generators, try/except) is not
    traced. functools.cache'd probes made Dynamo break the compiled FP8 decode step at every linear (27 graphs
    for 2 layers)."""
    def wrap(fn):
        results: dict = {}

        @functools.wraps(fn)
        def probed(device: str):
            if device in results:
                return results[device]
            if torch.compiler.is_compiling():
                return default
            results[device] = fn(device)
            return results[device]

        return probed
    return wrap


def _probe_operands(device, kind: str):
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)
    a[0], w[:, 0] = 10.0, -10.0  # extremes: catch kernels that saturate intermediate sums
    quant = quantize_per_token_int8 if kind == "int8" else quantize_per_token_fp8
    (aq, a_s), (wq, w_s) = quant(a.to(device)), quant(w.to(device))
    return aq, a_s, wq, w_s.squeeze(1)


@probed_once(False)
def int_mm_ok(device: str) -> bool:
    """Whether torch._int_mm runs on this device and matches the reference exactly."""
    try:
        aq, _, wq, _ = _probe_operands(device, "int8")
        return bool(torch.equal(_int_mm(aq, wq), int8_matmul_reference(aq, wq)))
    except (RuntimeError, NotImplementedError):
        return False


@probed_once(())
def scaled_mm_dtypes(device: str) -> tuple[torch.dtype, ...]:
    """The output dtypes with which torch._scaled_mm (row-wise scales) runs right on this device (may be none)."""
    dev = torch.device(device)
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        return ()
    aq, a_s, wq, w_s = _probe_operands(dev, "fp8")
    ref = fp8_matmul_reference(aq, a_s, wq, w_s)
    ok = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # some builds allow only bf16 out with row-wise scales
        try:
            y = _scaled_mm(aq, a_s, wq, w_s, dtype).float()
        except (RuntimeError, NotImplementedError):
            continue
        if float((y - ref).norm() / ref.norm()) < 1e-2:
            ok.append(dtype)
    return tuple(ok)


def scaled_mm_dtype(device: str) -> torch.dtype | None:
    """The preferred (most precise) output dtype of torch._scaled_mm on this device, or None."""
    return next(iter(scaled_mm_dtypes(device)), None)


def int8_matmul(a: torch.Tensor, w: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """int8 a [M, K] @ int8 w [N, K]^T -> int32 [M, N], with torch._int_mm where it works, else the reference."""
    k, n = a.shape[1], w.shape[0]
    if fast and int_mm_ok(str(a.device)) and (a.device.type != "cuda" or (k % 8 == 0 and n % 8 == 0)):
        return _int_mm(a, w)
    return int8_matmul_reference(a, w)


def _fp8_reference_given_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)


@probed_once(False)
def fp8_kernel_ok(device: str) -> bool:
    """Whether the Triton per-token FP8 quantization (core.kernels.fp8_quant) runs on this device and gives the
    reference's numbers: scales equal to max|x| / 448 and, given them, identical codes."""
    from ..kernels import triton_available

    dev = torch.device(device)
    if dev.type != "cuda" or not triton_available() or torch.cuda.get_device_capability(dev) < (8, 9):
        return False
    try:
        from ..kernels.fp8_quant import per_token_fp8

        g = torch.Generator().manual_seed(0)
        x = (torch.randn(37, 1000, generator=g) * torch.logspace(-3, 3, 1000)).to(dev, torch.bfloat16)
        x[5] = 0
        q, s = per_token_fp8(x)
        amax = x.float().abs().amax(-1, keepdim=True)
        s_ref = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
        return bool(torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8),
                                                          _fp8_reference_given_scale(x, s).view(torch.uint8)))
    except Exception:  # noqa: BLE001 (compile or launch failure: the PyTorch path)
        return False


def quantize_activations_fp8(x: torch.Tensor, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 quantization of a linear's input: one Triton kernel on CUDA where it checks out, else
    quantize_per_token_fp8 (same numbers up to the last bit of the scale, which PyTorch's CUDA division by a
    number rounds differently). Under torch.compile the PyTorch formula, which Inductor fuses with the op that
    produced x (a norm) and shares between linears reading the same x (q/k/v, gate/up)."""
    if fast and x.is_cuda and not torch.compiler.is_compiling() and fp8_kernel_ok(str(x.device)):
        from ..kernels.fp8_quant import per_token_fp8

        return per_token_fp8(x)
    return quantize_per_token_fp8(x)


@probed_once(False)
def fp8_skinny_ok(device: str) -> bool:
    """Whether core.kernels.fp8_skinny runs on this device and agrees with the reference (as scaled_mm_dtypes)."""
    from ..kernels import triton_available

    dev = torch.device(device)
    if dev.type != "cuda" or not triton_available() or torch.cuda.get_device_capability(dev) < (8, 9):
        return False
    try:
        from ..kernels.fp8_skinny import fp8_skinny_matmul

        aq, a_s, wq, w_s = _probe_operands(dev, "fp8")
        ref = fp8_matmul_reference(aq[:5], a_s[:5], wq, w_s)
        y = fp8_skinny_matmul(aq[:5].contiguous(), a_s[:5].contiguous(), wq, w_s, torch.float32)
        return bool(float((y - ref).norm() / ref.norm()) < 1e-2)
    except Exception:  # noqa: BLE001 (compile or launch failure: _scaled_mm or the reference)
        return False


def fp8_matmul(a, a_scale, w, w_scale, fast: bool = True, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scaled fp8 a [M, K] @ fp8 w [N, K]^T -> [M, N]: up to 16 rows with core.kernels.fp8_skinny (decode), more
    with torch._scaled_mm, where they work. The result is float32, or `out_dtype` directly when the fast path can
    write it (a bf16 model's prefill then neither writes nor reads a float32 copy of every output)."""
    if (fast and a.device.type == "cuda" and a.shape[0] <= 16 and a.stride(1) == 1 and w.stride(1) == 1
            and fp8_skinny_ok(str(a.device))):
        from ..kernels.fp8_skinny import fp8_skinny_matmul

        return fp8_skinny_matmul(a, a_scale, w, w_scale, out_dtype)
    dtypes = scaled_mm_dtypes(str(a.device)) if fast and a.device.type == "cuda" else ()
    if dtypes and a.shape[1] % 16 == 0 and w.shape[0] % 16 == 0:
        return _scaled_mm(a, a_scale, w, w_scale, out_dtype if out_dtype in dtypes else dtypes[0])
    return fp8_matmul_reference(a, a_scale, w, w_scale)


# --- modules ---------------------------------------------------------------------------------------

class W8A8Linear(nn.Module):
    """nn.Linear replacement: int8 weight (per output channel) x int8 activations (per token, dynamic).
    Buffers `qweight` [out, in] and float32 `weight_scale` [out]; optional float `bias` parameter."""

    scheme, codes_dtype = "int8", torch.int8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fast = True  # False forces the reference matmul (tests, timing)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=self.codes_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @staticmethod
    def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_per_channel_int8(w)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None) -> W8A8Linear:
        """From a float linear; `weight` (e.g. GPTQ-rounded, already on the grid of `scale`) replaces its weight."""
        m = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        if weight is None:
            m.qweight, m.weight_scale = cls.quantize_weight(linear.weight)
        else:
            m.qweight, m.weight_scale = quantize_with_scale(weight, scale, cls.scheme), scale.float()
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantize_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.weight_scale[:, None]

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.weight_scale.numel() * 4

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """-> float32 [M, out], or x's dtype where the fast path writes that directly."""
        xq, xs = quantize_per_token_int8(x)
        return int8_matmul(xq, self.qweight, self.fast).float() * xs * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # model.half()/.to(bf16) would cast fp8 codes (a float dtype) and the float32 scales: follow device moves only
        qweight, scale = self.qweight, self.weight_scale
        super()._apply(fn, recurse)
        self.qweight, self.weight_scale = qweight.to(self.qweight.device), scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme} W8A8, "
                f"bias={self.bias is not None}")


class FP8Linear(W8A8Linear):
    """nn.Linear replacement: float8_e4m3fn weight (per output channel) x fp8 activations (per token, dynamic)."""

    scheme, codes_dtype = "fp8", FP8

    @staticmethod
    def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_per_channel_fp8(w)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_activations_fp8(x, self.fast)
        return fp8_matmul(xq, xs, self.qweight, self.weight_scale, self.fast, out_dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # codes a fused producer attached to its output (core.fusion): the same numbers as quantizing x
        pre = getattr(x, FUSED_CODES, None) if self.fast and not torch.compiler.is_compiling() else None
        if pre is None:
            return super().forward(x)
        return self.forward_quantized(*pre, x.shape[:-1], x.dtype)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor, lead_shape, dtype: torch.dtype) -> torch.Tensor:
        """The layer on an input already quantized per token: codes [M, in], float32 scale [M, 1]."""
        y = fp8_matmul(xq, xs, self.qweight, self.weight_scale, self.fast, out_dtype=dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dtype).view(*lead_shape, self.out_features)


def replace_with_w8a8(model: nn.Module, name: str, linear: nn.Linear, scheme: str,
                      weight: torch.Tensor | None = None, scale: torch.Tensor | None = None, **extra) -> dict:
    """Swap `name` for a W8A8Linear / FP8Linear (weight: already rounded onto the grid of scale, or None for
    round-to-nearest) and return its record (bytes: codes + float32 scales)."""
    q = (W8A8Linear if scheme == "int8" else FP8Linear).from_linear(linear, weight, scale)
    return replace_linear(model, name, linear, q, q.dequantize_weight(), 8, None, q.weight_bytes, scheme=scheme, **extra)


def quantize_model_w8a8(model: nn.Module, scheme: str = "int8", skip=("lm_head",),
                        progress: Progress | None = None) -> list[dict]:
    """Replace each float nn.Linear not matched by `skip` with a W8A8Linear (int8) or FP8Linear (fp8);
    returns per-layer records (bytes: codes + float32 scales)."""
    if scheme not in SCHEMES:
        raise UnsupportedError(f"W8A8 scheme must be one of {', '.join(SCHEMES)}, got '{scheme}'.")
    return convert_linears(model, list(skip), lambda name, lin: replace_with_w8a8(model, name, lin, scheme),
                           "w8a8", progress)


def set_fast_path(model: nn.Module, enabled: bool) -> None:
    """Use (True, the default) or bypass the fast kernels in every W8A8 layer of `model`."""
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            m.fast = enabled


# --- SmoothQuant -----------------------------------------------------------------------------------

def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                       eps: float = 1e-5) -> torch.Tensor:
    """s [in] = act_absmax^alpha / weight_absmax^(1 - alpha), both inputs and s clamped to >= eps."""
    a, w = act_absmax.float().clamp(min=eps), weight_absmax.float().clamp(min=eps)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=eps)


@torch.no_grad()
def fold_smoothing(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide what `prev` outputs by s and multiply the input columns of `linears` (all fed by it) by s.
    `prev` is a norm (weight [in] and optional bias scale its output elementwise: RMSNorm, LayerNorm) or a
    linear whose output rows feed `linears` channel for channel (v_proj -> o_proj, up_proj -> down_proj).
    Exact in real arithmetic; in float the products change only by rounding."""
    s = s.to(prev.weight.device, torch.float32)
    prev.weight.copy_(prev.weight.float() / s.view(-1, *[1] * (prev.weight.dim() - 1)))
    if getattr(prev, "bias", None) is not None:
        prev.bias.copy_(prev.bias.float() / s)
    for lin in linears:
        lin.weight.copy_(lin.weight.float() * s)


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))) and \
        isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def _scales_with_weight(norm: nn.Module) -> bool:
    """Whether scaling the norm's weight and bias by c scales its output by c (false for Gemma's x * (1 + w))."""
    x = torch.randn(4, norm.weight.numel(), generator=torch.Generator().manual_seed(0))
    x = x.to(norm.weight.device, norm.weight.dtype)
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    y = norm(x).float()
    for p in params:
        p.mul_(2)
    y2 = norm(x).float()
    for p in params:
        p.div_(2)
    return torch.allclose(y2, 2 * y, rtol=1e-2, atol=1e-3 * float(y.abs().max()))


@torch.no_grad()
def trace_consumers(model: nn.Module, producers: dict[str, nn.Module],
                    consumers: dict[str, nn.Module]) -> dict[str, list[str]]:
    """{producer name: [consumer names]}: which consumers' first input is the very tensor a producer output, in
    one short forward of the model (4 tokens) with hooks; producers that feed none are left out."""
    owner: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold outputs so their ids are not reused during the forward
    fed: dict[str, list[str]] = {}

    def on_producer(name):
        def hook(_m, _args, out):
            if isinstance(out, torch.Tensor):
                owner[id(out)] = name
                keep.append(out)
        return hook

    def on_consumer(name):
        def hook(_m, args):
            src = owner.get(id(args[0])) if args else None
            if src is not None and name not in fed.setdefault(src, []):
                fed[src].append(name)
        return hook

    handles = [m.register_forward_hook(on_producer(n)) for n, m in producers.items()]
    handles += [m.register_forward_pre_hook(on_consumer(n)) for n, m in consumers.items()]
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.ones(1, 4, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return fed


@torch.no_grad()
def smoothing_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(producer, [linears]) pairs SmoothQuant can fold into, found from the model itself:
    - a norm whose output tensor is the input of linears (traced by one short forward with hooks), e.g.
      input_layernorm -> q/k/v_proj and post_attention_layernorm -> gate/up_proj in Llama/Qwen2/Mistral,
      self_attn_layer_norm -> q/k/v and final_layer_norm -> fc1 in OPT, fused qkv_proj in Phi-3;
      norms that are not linear in their weight (Gemma's 1 + w) are left out;
    - a linear whose output channels reach the next linear's inputs only scaled elementwise, by name:
      v_proj -> o_proj (or out_proj) in one attention module, only when v_proj's outputs map 1:1 onto
      o_proj's inputs (num_kv_heads == num_heads; with grouped-query attention one value channel feeds
      several heads' outputs, the shapes differ and it is skipped); up_proj -> down_proj in a gated MLP
      (down_proj(act(gate_proj(x)) * up_proj(x)), recognised by a gate_proj beside them).
    Assumes a norm's output feeds nothing but those linears (true for pre-norm transformers)."""
    norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
    linears = dict(find_linears(model))
    fed = trace_consumers(model, norms, linears)
    groups = [(n, fed[n]) for n in norms if n in fed and _scales_with_weight(norms[n])]
    for name, _ in model.named_modules():
        p = f"{name}." if name else ""
        pairs = [("v_proj", "o_proj"), ("v_proj", "out_proj")] + ([("up_proj", "down_proj")] if p + "gate_proj" in linears else [])
        for src, dst in pairs:
            a, b = linears.get(p + src), linears.get(p + dst)
            if a is not None and b is not None and a.out_features == b.in_features:
                groups.append((p + src, [p + dst]))
    return groups


def smoothable_groups(model: nn.Module, skip=("lm_head",)) -> list[tuple[str, list[str]]]:
    """smoothing_groups(model) without those that touch a skipped linear or a tied weight."""
    return [(prev, names) for prev, names in smoothing_groups(model)
            if not shared_weight_names(model, [prev, *names]) and not any(s in n for n in names for s in skip)]


def group_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant scales for linears (weights [out_i, in]) reading one activation with max |x| act_absmax [in]."""
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    return smoothquant_scales(act_absmax.float().to(w_absmax.device), w_absmax, alpha)


@torch.no_grad()
def w8a8_output_error(x: torch.Tensor, weights: list[torch.Tensor], scheme: str, s: torch.Tensor | None = None,
                      rounded: list[torch.Tensor] | None = None, refs: list[torch.Tensor] | None = None) -> float:
    """Relative error ||Q(x/s) Q(W*s)^T - x W^T|| / ||x W^T|| over linears reading x [tokens, in]: what the
    W8A8 layers compute (per-token activations, per-channel weights, smoothed by s when given) vs float.
    rounded: the weights as stored (e.g. GPTQ-rounded W*s); default: round-to-nearest. refs: the float
    outputs x W^T when already computed."""
    x = x.float()
    xs = x if s is None else x / s
    xq = fake_quantize_activations(xs, scheme)
    num = den = 0.0
    for i, w in enumerate(weights):
        w = w.float()
        if rounded is not None:
            wq = rounded[i].float()
        else:
            ws = w if s is None else w * s
            scale = channel_scale(ws, scheme)
            wq = quantize_with_scale(ws, scale, scheme).float() * scale[:, None]
        ref = x @ w.t() if refs is None else refs[i]
        num += float(((xq @ wq.t() - ref) ** 2).sum())
        den += float((ref**2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # 0, 0.1, ..., 1.0


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor], scheme: str,
                 grid=ALPHA_GRID) -> tuple[float | None, dict]:
    """The smoothing strength in `grid`, or None (no smoothing), whose W8A8 output error (w8a8_output_error,
    round-to-nearest weights) on sample inputs x of these linears is smallest; also every candidate's error."""
    x = x.float()
    refs = [x @ w.float().t() for w in weights]
    errors = {None: w8a8_output_error(x, weights, scheme, refs=refs)}
    for a in grid:
        errors[a] = w8a8_output_error(x, weights, scheme, group_scales(act_absmax, weights, a), refs=refs)
    return min(errors, key=errors.get), errors


@torch.no_grad()
def smooth_model(model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5,
                 skip=("lm_head",)) -> list[dict]:
    """Apply SmoothQuant to every group of smoothing_groups(model) whose linears all have statistics in
    `act_absmax` (linear name -> max |input| per input channel, [in_features], from a calibration pass on
    this unsmoothed model), none matches `skip`, and none has a tied weight. The float model computes the
    same function afterwards (up to rounding). Returns one record per smoothed group."""
    records = []
    for prev_name, names in smoothable_groups(model, skip):
        if any(n not in act_absmax for n in names):
            continue
        prev, linears = model.get_submodule(prev_name), [model.get_submodule(n) for n in names]
        act = torch.stack([act_absmax[n].float().to(prev.weight.device) for n in names]).amax(0)
        s = group_scales(act, [lin.weight for lin in linears], alpha)
        fold_smoothing(prev, linears, s)
        records.append({"prev": prev_name, "linears": names, "scale_min": float(s.min()), "scale_max": float(s.max())})
    return records
