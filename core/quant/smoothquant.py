"""W8A8 steps: int8 weights + per-token int8 activations (optionally smoothed, SmoothQuant, Xiao et
al. 2023), or FP8 (E4M3) weights + activations. Smoothing statistics come from the shared calibration
pass (core/calibrate.py); the math and the modules are in core/quant/w8a8.py."""
from __future__ import annotations

import torch
from torch import nn

from ..calibrate import CalibrationRecords, LayerContext, Observer, run_calibrated
from .w8a8 import quantize_model_w8a8, smooth_model


class InputAbsmax(Observer):
    """Max |input| per input channel of every linear; compresses nothing (the model is smoothed and
    quantized after the pass, since smoothing folds scales into the preceding norms)."""

    name = "smoothquant statistics"

    def __init__(self, skip=()):
        self.skip = list(skip)
        self.absmax: dict[str, torch.Tensor] = {}

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()
        prev = self.absmax.get(name)
        self.absmax[name] = m if prev is None else torch.maximum(prev, m)

    def apply(self, ctx: LayerContext) -> list[dict]:
        return []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.absmax.values())


def quantize_model_w8a8_step(model: nn.Module, step, windows: torch.Tensor | None, device="cpu",
                             progress=None) -> CalibrationRecords:
    """Apply a W8A8Step: optional SmoothQuant (int8 only; needs `windows`), then W8A8 quantization."""
    stats, smoothed = {}, []
    if step.scheme == "int8" and step.smoothquant_alpha is not None:
        observer = InputAbsmax(step.skip)
        _, stats = run_calibrated(model, windows, observer, device, progress)
        smoothed = smooth_model(model, observer.absmax, step.smoothquant_alpha, skip=step.skip)
        stats["smoothed_groups"] = len(smoothed)
    records = quantize_model_w8a8(model, step.scheme, step.skip, progress)
    return CalibrationRecords(records, stats)
