"""bitsandbytes (LLM.int8, NF4, FP4) through transformers: availability probe, loading, per-layer records.

bitsandbytes quantizes while the checkpoint loads, so this is a loader rather than a model transform.
"""
from __future__ import annotations

import copy
import functools
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .memory_accounting import bnb_state_tensors, module_bytes, tensor_bytes  # noqa: F401  (module_bytes re-exported)
from .rtn import relative_error

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    return _DTYPES[dtype] if isinstance(dtype, str) else dtype


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _DropCastNotice(logging.Filter):
    # LLM.int8 casts activations to fp16 by design, and bnb logs that on every matmul call
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_bnb() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in log.filters):
        log.addFilter(_DropCastNotice())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _probe(bnb, mode: str, in_features: int, device: str) -> str | None:
    """Quantize a random Linear(in_features, 64) and run it in inference mode; None if right, else what's wrong."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(in_features, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, in_features, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(64, generator=g) * 0.1)
    x = torch.randn(4, in_features, generator=g).to(device)
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(in_features, 64, has_fp16_weights=False, threshold=6.0)
    else:
        q = bnb.nn.Linear4bit(in_features, 64, compute_dtype=torch.float32, quant_type=mode)
    q.load_state_dict(lin.state_dict())
    q = q.to(device).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_hat = dequantize_bnb_weight(q).float()  # before forward: CPU 4-bit kernels may repack the weight
        y = q(x)
        lin = lin.to(device)
        # right answers: int8 ~0.4% weight error, nf4 ~9%, fp4 ~12%; a wrong layout gives > 25%
        if not torch.isfinite(y).all() or _rel(w_hat, lin.weight) > (0.02 if mode == "int8" else 0.2):
            return "dequantized weights are wrong"
        # 4-bit CPU kernels compute in ~bf16 precision, about 0.3% off F.linear with their own weights
        if _rel(y, F.linear(x, w_hat, lin.bias)) > 0.03:
            return "output differs from F.linear with its own weights"
    return None


@functools.cache
def bnb_status(device: str = "cpu") -> dict:
    """Whether bitsandbytes imports and really computes each mode on `device` (a tiny layer is quantized,
    dequantized and run, and checked against the float layer). `4bit_unaligned`: 4-bit is also right when
    in_features is not a multiple of the 64-value block (bnb 0.50's CPU kernel gets that wrong)."""
    status = {"available": False, "int8": False, "nf4": False, "fp4": False, "4bit_unaligned": False,
              "version": "", "detail": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except Exception as e:  # a broken native library raises all sorts of errors
        status["detail"] = f"bitsandbytes does not import: {type(e).__name__}: {e}"
        return status
    status.update(available=True, version=getattr(bnb, "__version__", "?"))
    _quiet_bnb()
    problems = []
    for key, mode, in_features in [("int8", "int8", 128), ("nf4", "nf4", 128), ("fp4", "fp4", 128),
                                   ("4bit_unaligned", "nf4", 96)]:
        try:
            problem = _probe(bnb, mode, in_features, device)
        except Exception as e:
            problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        status[key] = problem is None
        if problem and key == "4bit_unaligned":
            problems.append("4-bit runs only on models whose layer widths are multiples of 64 here "
                            f"(with another width: {problem})")
        elif problem:
            problems.append(f"{mode}: {problem}")
    status["detail"] = "; ".join(problems) or f"int8, nf4 and fp4 run correctly on {device}"
    return status


def bnb_quantization_config(step):
    from transformers import BitsAndBytesConfig

    if step.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=step.int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=step.mode,
                              bnb_4bit_compute_dtype=_DTYPES[step.compute_dtype],
                              bnb_4bit_use_double_quant=step.double_quant)


def load_with_bnb(model_dir_or_id, step, dtype="fp32", device: str | None = None):
    """from_pretrained with a BitsAndBytesConfig on `device` (default: cuda if present, else cpu).
    Layers transformers keeps in float (lm_head/tied output embedding) stay in `dtype`."""
    from transformers import AutoModelForCausalLM

    device = device or _default_device()
    status = bnb_status(torch.device(device).type)
    if not status[step.mode]:
        raise UnsupportedError(f"bitsandbytes {step.mode} cannot run on this machine's {torch.device(device).type}: "
                               f"{status['detail'] or 'unavailable'}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir_or_id), quantization_config=bnb_quantization_config(step),
                                                 device_map={"": device}, dtype=_as_dtype(dtype))
    if step.mode != "int8" and not status["4bit_unaligned"]:
        bad = [n for n, m in model.named_modules()
               if _is_bnb_linear(m) and m.in_features % m.weight.quant_state.blocksize]
        if bad:
            raise UnsupportedError(
                f"bitsandbytes {status['version']} {step.mode} gives wrong results on this {torch.device(device).type} "
                f"for layers whose input size is not a multiple of 64, e.g. {bad[0]}; try int8 or RTN instead.")
    return model.eval()


def _is_bnb_linear(m: nn.Module) -> bool:
    return type(m).__module__.startswith("bitsandbytes") and isinstance(m, nn.Linear)


def dequantize_bnb_weight(m: nn.Module) -> torch.Tensor:
    """The float weight [out, in] a bitsandbytes Linear8bitLt / Linear4bit actually computes with."""
    import bitsandbytes.functional as bf

    w = m.weight
    if w.dtype == torch.int8:  # LLM.int8: row-wise absmax / 127
        scb = w.SCB if getattr(w, "SCB", None) is not None else m.state.SCB
        return bf.int8_vectorwise_dequant(w.data, scb)
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        # Repacked by bnb's first CPU inference forward: codes reordered, absmax un-nested, transposed to
        # [in/block, out] bf16. bnb's inverse leaves absmax transposed for non-nested states, so only take codes.
        tmp = copy.copy(qs)
        tmp.original_nested = False
        data, _ = bf._convert_weight_packed_for_cpu_inverse(w.data, tmp)
        qs = bf.QuantState(absmax=qs.absmax.T.reshape(-1).float(), shape=qs.shape, code=qs.code,
                           blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=torch.float32)
        return bf.dequantize_4bit(data, qs)
    return bf.dequantize_4bit(w.data, qs)


def bnb_layer_records(model: nn.Module, reference_model: nn.Module) -> list[dict]:
    """Same records as RTN's for every bitsandbytes layer, errors measured against reference_model's weights."""
    records = []
    for name, m in model.named_modules():
        if not _is_bnb_linear(m):
            continue
        ref = reference_model.get_submodule(name).weight.detach()
        w_hat = dequantize_bnb_weight(m).to(ref.device)
        four_bit = hasattr(m.weight, "quant_state")
        records.append({
            "name": name,
            "shape": [m.out_features, m.in_features],
            "bits": 4 if four_bit else 8,
            "group_size": m.weight.quant_state.blocksize if four_bit else m.in_features,
            "rel_error": relative_error(ref, w_hat),
            "bytes": tensor_bytes([m.weight, *bnb_state_tensors(m)]),
            "orig_bytes": ref.numel() * ref.element_size(),
        })
    return records
