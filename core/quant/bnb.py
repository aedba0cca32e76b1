"""bitsandbytes (LLM.int8, NF4, FP4) through transformers: availability probe, loading, per-layer records.

bitsandbytes quantizes while the checkpoint loads, so this is a loader rather than a model transform.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .memory_accounting import module_bytes, tensor_bytes  # noqa: F401  (module_bytes re-exported)
from .rtn import relative_error

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    return _DTYPES[dtype] if isinstance(dtype, str) else dtype


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    return bool(torch.isfinite(y).all()) and float((y - ref).norm() / ref.norm()) < rtol


@functools.lru_cache(maxsize=None)
def bnb_status(device: str = "cpu") -> dict:
    """Whether bitsandbytes imports and really computes each mode on `device`: a tiny layer's forward is
    compared with the float result (int8) or with F.linear on its own dequantized weight (4-bit)."""
    status = {"available": False, "int8": False, "nf4": False, "fp4": False, "version": "", "detail": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except Exception as e:  # broken native library raises all sorts of errors
        status["detail"] = f"bitsandbytes does not import: {type(e).__name__}: {e}"
        return status
    status.update(available=True, version=getattr(bnb, "__version__", "?"))
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(128, 64, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(64, generator=g) * 0.1)
    x = torch.randn(4, 128, generator=g).to(device)
    problems = []
    for mode in ("int8", "nf4", "fp4"):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if mode == "int8":
                    q = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0)
                else:
                    q = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type=mode)
                q.load_state_dict(lin.state_dict())
                q = q.to(device).eval()
                w_hat = dequantize_bnb_weight(q).float()  # before forward: 4-bit CPU kernels may repack
                y, ref = q(x).float(), lin.to(device)(x)
                ok = _close(y, ref, 0.05) if mode == "int8" else _close(y, F.linear(x, w_hat, lin.bias), 1e-3)
                ok = ok and relative_error(lin.weight, w_hat) < (0.02 if mode == "int8" else 0.2)
            status[mode] = ok
            if not ok:
                problems.append(f"{mode}: output differs from the float reference")
        except Exception as e:
            problems.append(f"{mode}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    status["detail"] = "; ".join(problems) or f"int8, nf4 and fp4 run on {device}"
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
    # bnb's int8 matmul casts activations to fp16 and warns on every call
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir_or_id), quantization_config=bnb_quantization_config(step),
                                                 device_map={"": device}, dtype=_as_dtype(dtype))
    return model.eval()


def _is_bnb_linear(m: nn.Module) -> bool:
    return type(m).__module__.startswith("bitsandbytes") and isinstance(m, nn.Linear)


def _bnb_state_tensors(m: nn.Module) -> list:
    from .memory_accounting import _extra_tensors

    return [m.weight, *_extra_tensors(m)]


def dequantize_bnb_weight(m: nn.Module) -> torch.Tensor:
    """The float weight [out, in] a bitsandbytes Linear8bitLt / Linear4bit actually computes with."""
    import bitsandbytes.functional as bf

    w = m.weight
    if w.dtype == torch.int8 or hasattr(m, "state") and hasattr(w, "SCB"):  # LLM.int8: row-wise absmax / 127
        scb = w.SCB if getattr(w, "SCB", None) is not None else m.state.SCB
        return bf.int8_vectorwise_dequant(w.data, scb)
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):  # repacked for the CPU gemm kernel: undo on a copy
        data, qs = bf._convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.deepcopy(qs))
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
            "bytes": tensor_bytes(_bnb_state_tensors(m)),
            "orig_bytes": ref.numel() * ref.element_size(),
        })
    return records
