"""Fused norm and gated-MLP kernels on CUDA, with FP8 activation quantization fused into them.

transformers runs a Llama-style RMSNorm as six PyTorch kernels over a float32 copy of the activations and a gated
MLP's silu(gate) * up as two more; in a 2048-token prefill on an H100 that cost 0.23 ms per Llama-3-8B layer,
12 % of the bf16 model's time (benchmarks/RESULTS.md). And an
FP8Linear quantizes its input on every call: a separate pass costing 5-20 % of the FP8 GEMM, with q, k and v each
quantizing the same normed input (benchmarks/RESULTS.md). fuse_producers(model) installs, on CUDA:

  - for a Llama-style RMSNorm whose output feeds linears (input_layernorm -> q/k/v, post_attention_layernorm ->
    gate/up): one kernel (core.kernels.fp8_quant.rmsnorm_fp8) writing the norm's output and, when an FP8Linear
    reads it, that output's per-token FP8 codes, attached to the output tensor (w8a8.FUSED_CODES); every FP8Linear
    reading the tensor uses them instead of quantizing;
  - for a gated MLP down(silu(gate(x)) * up(x)): one kernel (silu_mul_fp8) for silu(g) * u, which with an FP8
    down_proj writes only the product's codes.

The same numbers as the modules' own forwards up to float rounding: the norm's mean square is summed in another
order (outputs within one unit in the last place; codes exactly per_token_fp8 of the outputs). Which norms feed
which linears is traced by one short forward; a norm qualifies only if it computes transformers' Llama-style RMSNorm
exactly (checked on a probe: Gemma's x * (1 + w) does not), an MLP only if its forward equals
down(silu(gate(x)) * up(x)) on a probe. The kernels run on CUDA tensors of bf16 / fp16 rows up to
core.kernels.fp8_quant.ROW_IN_REGISTERS wide, outside torch.compile (which fuses the plain modules itself) and
without autograd; otherwise the modules' own forwards run. Installed as bound methods on the instances: state_dict,
deepcopy and the checkpoint format are unchanged; unfuse(model) removes them.

The latency measurement installs it on CUDA for every model (core.measure.latency), so float and compressed
models are timed with the same norm and SiLU kernels; elsewhere the modules run as transformers wrote them.

Assumes nobody changes a norm's output in place between the norm and the linears reading it (true of every
transformers decoder: the output goes straight into the projections).
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from .quant.linear import QuantLinear
from .quant.w8a8 import FUSED_CODES, FP8Linear, _is_norm, fp8_kernel_ok, probed_once, trace_consumers

FUSED = "_slimlm_fused"
MERGED, SPLIT = "_slimlm_merged", "_slimlm_split"  # core.merge: the stacked linear of a block, its output widths
SILU = "_slimlm_silu"  # core.merge: a merged MLP whose act_fn is silu (its gate/up GEMV may apply it)
RESIDUAL_IN_PRODUCT = True  # False: linear_residual always adds after the product (A/B runs)
log = logging.getLogger(__name__)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-style RMSNorm (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, ...)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within one unit in the last place of bf16 (relative 2^-7; fp16's is finer)."""
    got, ref = got.float(), ref.float()
    return bool(((got - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all())


@probed_once(False)
def fused_kernels_ok(device: str) -> bool:
    """Whether the norm and SiLU kernels run on this device and agree with PyTorch: outputs within one unit in the
    last place of the reference, codes exactly per_token_fp8 of those outputs."""
    dev = torch.device(device)
    if dev.type != "cuda" or not fp8_kernel_ok(device):
        return False
    try:
        from .kernels.fp8_quant import per_token_fp8, rmsnorm_fp8, silu_mul_fp8

        g = torch.Generator().manual_seed(0)
        ok = True
        for dtype in (torch.bfloat16, torch.float16):
            x = (torch.randn(19, 1000, generator=g) * 3).to(dev, dtype)
            w = (torch.rand(1000, generator=g) + 0.5).to(dev, dtype)
            y, q, s = rmsnorm_fp8(x, w, 1e-5)
            q2, s2 = per_token_fp8(y)
            ok &= torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
            ok &= _close(y, rmsnorm_reference(x, w, 1e-5)) and torch.equal(rmsnorm_fp8(x, w, 1e-5, False)[0], y)
            u = torch.randn(19, 1000, generator=g).to(dev, dtype)
            h = silu_mul_fp8(x, u, quantize=False)
            q, s = silu_mul_fp8(x, u)
            q2, s2 = per_token_fp8(h)
            ok &= torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
            ok &= _close(h, F.silu(x) * u)
        return bool(ok)
    except Exception:  # noqa: BLE001 (compile or launch failure: the modules' own forwards)
        return False


def _fusable(x: torch.Tensor, width: int) -> bool:
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    from .kernels.fp8_quant import fusable_width

    return fusable_width(width) and fused_kernels_ok(str(x.device))


def _fused_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == self.weight.dtype and self.weight.is_contiguous() and _fusable(x, x.shape[-1]):
        from .kernels.fp8_quant import rmsnorm_fp8

        y, q, s = rmsnorm_fp8(x.reshape(-1, x.shape[-1]), self.weight, self._slimlm_eps, self._slimlm_fp8)
        y = y.view(x.shape)
        if q is not None:
            setattr(y, FUSED_CODES, (q, s))
        return y
    return type(self).forward(self, x)


def linear_residual(lin: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """residual + lin(x) (lin(x) without a residual), the add made by the product's own kernel where one can in the
    uncompiled CUDA decode loop (torch.compile fuses the add into the next norm itself): a 4-bit GEMV of one token
    adds it where it writes (core.kernels.dispatch.residual_matmul). Anything else adds after the product (for a
    bf16 nn.Linear, cuBLAS's addmm(residual, x, W^T) was no faster than mm + add on an H100: RESULTS.md)."""
    if residual is None:
        return lin(x)
    if (RESIDUAL_IN_PRODUCT and isinstance(lin, QuantLinear) and x.is_cuda and not torch.compiler.is_compiling()
            and residual.dtype == x.dtype and residual.shape[:-1] == x.shape[:-1]
            and not (torch.is_grad_enabled() and x.requires_grad)):
        from .kernels.dispatch import residual_matmul

        y = residual_matmul(x, lin, residual)
        if y is not None:
            return y
    return residual + lin(x)


def mlp_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A gated MLP's down(silu(gate(x)) * up(x)), with gate and up as one stacked product where core.merge merged
    them, and silu(g) * u (with an FP8 down_proj, its codes) as one kernel where fused and the input qualifies.
    residual (core.merge's decoder-layer forward): returns residual + that, added by down's kernel where it can."""
    down = self.down_proj
    stacked = getattr(self, MERGED, None)
    if stacked is not None:
        if getattr(self, SILU, False) and isinstance(stacked, QuantLinear) and x.is_cuda:
            from .kernels.dispatch import glu_matmul

            h = glu_matmul(x, stacked)  # batch 1: silu(gate) * up straight from the GEMV
            if h is not None:
                return linear_residual(down, h, residual)
        g, u = stacked(x).split(getattr(self, SPLIT), dim=-1)
    else:
        g, u = self.gate_proj(x), self.up_proj(x)
    if (getattr(self, FUSED, False) and _fusable(x, down.in_features) and g.dtype == x.dtype and u.dtype == x.dtype
            and g.stride(-1) == 1 and u.stride(-1) == 1):
        from .kernels.fp8_quant import silu_mul_fp8

        g, u = g.reshape(-1, down.in_features), u.reshape(-1, down.in_features)
        if isinstance(down, FP8Linear) and down.fast:
            y = down.forward_quantized(*silu_mul_fp8(g, u), x.shape[:-1], x.dtype)
            return y if residual is None else residual + y
        return linear_residual(down, silu_mul_fp8(g, u, quantize=False).view(*x.shape[:-1], down.in_features),
                               residual)
    return linear_residual(down, self.act_fn(g) * u, residual)


def set_mlp_forward(m: nn.Module) -> None:
    """mlp_forward on a gated MLP that is fused or merged (or both); its own forward once it is neither."""
    if getattr(m, FUSED, False) or MERGED in m.__dict__:
        m.forward = types.MethodType(mlp_forward, m)
    else:
        m.__dict__.pop("forward", None)


@torch.no_grad()
def _is_llama_rmsnorm(norm: nn.Module) -> bool:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float) or getattr(norm, "bias", None) is not None:
        return False
    w = norm.weight
    x = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    return torch.equal(type(norm).forward(norm, x), rmsnorm_reference(x, w, eps))


def _width(m) -> int | None:
    return getattr(m, "in_features", None)


@torch.no_grad()
def _is_gated_silu_mlp(m: nn.Module) -> bool:
    gate, up, down = (getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    act = getattr(m, "act_fn", None)
    if act is None or not all(isinstance(v, nn.Module) and _width(v) for v in (gate, up, down)):
        return False
    w = next((t for t in [*m.parameters(), *m.buffers()] if t.is_floating_point() and t.dtype != torch.float8_e4m3fn),
             None)
    device = w.device if w is not None else next(iter(m.buffers())).device
    t = torch.randn(2, 3, _width(gate), generator=torch.Generator().manual_seed(0)).to(device)
    t = t.to(w.dtype if w is not None else torch.float32)
    try:
        return torch.equal(act(t[0, 0]), F.silu(t[0, 0])) and \
            torch.equal(type(m).forward(m, t), down(act(gate(t)) * up(t)))
    except (RuntimeError, TypeError):
        return False


def fuse_producers(model: nn.Module) -> list[str]:
    """Install the fused forwards (see the module docstring) on the norms and gated MLPs of `model` that qualify;
    returns their names. Idempotent (re-checks FP8 consumers, e.g. after quantization)."""
    linears = {n: m for n, m in model.named_modules() if _width(m) and not list(m.children())}
    norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
    try:
        fed = trace_consumers(model, norms, linears) if norms and linears else {}
    except Exception as e:  # noqa: BLE001 (not a causal LM taking input_ids: its norms stay as they are)
        log.info("fusion: no trace of %s (%r); norms left unfused", type(model).__name__, e)
        fed = {}
    fused = []
    for name, readers in fed.items():
        norm = norms[name]
        if _is_llama_rmsnorm(norm):
            norm._slimlm_eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
            norm._slimlm_fp8 = any(isinstance(linears[r], FP8Linear) for r in readers)
            norm.forward = types.MethodType(_fused_norm_forward, norm)
            setattr(norm, FUSED, True)
            fused.append(name)
    for name, m in model.named_modules():
        if not _is_norm(m) and _is_gated_silu_mlp(m):
            setattr(m, FUSED, True)
            set_mlp_forward(m)
            fused.append(name)
    return fused


def unfuse(model: nn.Module) -> None:
    """Remove the fused forwards: every module runs its own again."""
    for m in model.modules():
        if getattr(m, FUSED, False):
            delattr(m, FUSED)
            if getattr(m.__dict__.get("forward"), "__func__", None) is mlp_forward:
                set_mlp_forward(m)  # a merged MLP keeps its merged forward
            else:
                m.__dict__.pop("forward", None)
