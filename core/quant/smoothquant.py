"""W8A8 steps through the shared calibration pass (core/calibrate.py): int8 or FP8 (E4M3) weights per output
channel x dynamic per-token activations, optionally smoothed (SmoothQuant, Xiao et al. 2023), with weights
rounded by GPTQ or to nearest. The math and the modules are in core/quant/w8a8.py and core/quant/gptq.py.

Per decoder layer, in one pass: the observer collects each linear's max |input| per channel, a bounded sample
of input rows and (for GPTQ rounding) H = 2/n X^T X. apply() then, for each group of linears reading one
activation produced inside the layer (a norm, or v_proj / up_proj), picks the smoothing strength alpha (fixed,
or searched on the sample: smallest W8A8 output error), folds the scales into the producer and the linears,
and rescales the statistics to match (X/s: H -> H / (s s^T)); finally it rounds every linear's weight and
swaps in a W8A8Linear / FP8Linear.
"""
from __future__ import annotations

import torch
from torch import nn

from ..calibrate import CalibrationRecords, LayerContext, as_linear, run_calibrated
from .gptq import GPTQObserver, gptq_round
from .linear import find_linears
from .memory_accounting import tensor_bytes
from .w8a8 import (
    channel_scale,
    fold_smoothing,
    group_scales,
    quantize_model_w8a8,
    quantize_with_scale,
    replace_with_w8a8,
    search_alpha,
    smoothable_groups,
    w8a8_output_error,
)

SAMPLE_ROWS = 512  # input rows kept per linear (spread over the windows) for the alpha search and error figures


class W8A8Observer(GPTQObserver):
    name = "w8a8"

    def __init__(self, step, groups: list[tuple[str, list[str]]], windows: int):
        super().__init__(step)
        self.groups = groups
        self.rows_per_call = max(1, SAMPLE_ROWS // max(windows, 1))
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self._sample_of: tuple | None = None

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self.step.weight_rounding == "gptq":
            super().observe(name, module, x)
        rows = x.detach().reshape(-1, x.shape[-1])
        if rows.shape[0] == 0:
            return
        if self._sample_of is None or self._sample_of[0] is not x:  # q/k/v share one input: sample it once
            idx = torch.linspace(0, rows.shape[0] - 1, min(self.rows_per_call, rows.shape[0])).round().long()
            self._sample_of = (x, rows.abs().amax(0).float(), rows[idx.to(rows.device)].float())
        _, absmax, sample = self._sample_of
        prev = self.absmax.get(name)
        self.absmax[name] = absmax if prev is None else torch.maximum(prev, absmax)
        self.samples.setdefault(name, []).append(sample)

    def nbytes(self) -> int:
        stats = [*self.absmax.values(), *(t for ts in self.samples.values() for t in ts)]
        return super().nbytes() + tensor_bytes(stats)  # q/k/v share one sample: counted once

    def _smooth(self, ctx: LayerContext, x: dict[str, torch.Tensor]) -> list[dict]:
        """Smooth the groups produced inside this layer; rescale x (samples) and H to the smoothed inputs."""
        step, out = self.step, []
        for prev_name, names in self.groups:
            if not prev_name.startswith(ctx.name + ".") or any(n not in ctx.linears or n not in x for n in names):
                continue
            weights = [ctx.linears[n].weight for n in names]  # nn.Linear only (smoothing_groups)
            act = torch.stack([self.absmax[n] for n in names]).amax(0)
            if step.smoothquant_alpha == "auto":
                alpha, errors = search_alpha(x[names[0]], act, weights, step.scheme)
            else:
                alpha, errors = step.smoothquant_alpha, None
            if alpha is None:
                continue
            s = group_scales(act, weights, alpha)
            fold_smoothing(ctx.model.get_submodule(prev_name), [ctx.linears[n] for n in names], s)
            for n in names:
                x[n] = x[n] / s
                if n in self.H:
                    self.H[n] = self.H[n] / s[:, None] / s[None, :]
            out.append({"prev": prev_name, "linears": names, "alpha": alpha,
                        "searched": errors is not None, "scale_min": float(s.min()), "scale_max": float(s.max())})
        return out

    def apply(self, ctx: LayerContext) -> list[dict]:
        step = self.step
        self._last = self._xtx = self._sample_of = None
        x = {n: torch.cat(self.samples.pop(n)) for n in list(self.samples) if n in ctx.linears}
        before = {n: w8a8_output_error(x[n], [as_linear(m).weight], step.scheme)
                  for n, m in ctx.linears.items() if n in x}
        smoothed = self._smooth(ctx, x) if step.smoothquant_alpha is not None else []
        alpha_of = {n: g["alpha"] for g in smoothed for n in g["linears"]}
        records = []
        for name, module in ctx.linears.items():
            linear = as_linear(module)
            H = self.H.pop(name, None)
            self.count.pop(name, None)
            self.absmax.pop(name, None)
            with torch.no_grad():
                scale = channel_scale(linear.weight, step.scheme)
                rounded, info = None, {"damp": None, "warning": None}
                if H is not None:
                    rounded, info = gptq_round(linear.weight, H, lambda w: _grid(w, scale, step.scheme),
                                               damp=step.damp, act_order=True)
                elif step.weight_rounding == "gptq":
                    info["warning"] = "no calibration tokens reached this layer: weights rounded to nearest"
                after = None
                if name in x:
                    stored = rounded if rounded is not None else _grid(linear.weight, scale, step.scheme)
                    after = w8a8_output_error(x[name], [linear.weight], step.scheme, rounded=[stored])
            records.append(replace_with_w8a8(
                ctx.model, name, linear, step.scheme, rounded, scale if rounded is not None else None,
                method="w8a8", smoothquant_alpha=alpha_of.get(name), damp=info["damp"], warning=info["warning"],
                out_rel_error=after, rtn_out_rel_error=before.get(name)))
        self.samples.clear()
        return records


def _grid(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    return quantize_with_scale(w, scale, scheme).float() * scale[:, None]


def quantize_model_w8a8_step(model: nn.Module, step, windows: torch.Tensor, device="cpu",
                             progress=None) -> CalibrationRecords:
    """Apply a W8A8Step through one calibration pass. Per-linear records carry the relative output error of
    the layer on calibration inputs (activation quantization included) for plain round-to-nearest W8A8
    ("rtn_out_rel_error") and for what was applied ("out_rel_error"), and the smoothing alpha used."""
    if windows is None:  # round to nearest, no smoothing: nothing to calibrate
        return CalibrationRecords(quantize_model_w8a8(model, step.scheme, step.skip, progress), {})
    groups = smoothable_groups(model, step.skip) if step.smoothquant_alpha is not None else []
    observer = W8A8Observer(step, groups, int(windows.shape[0]))
    records, stats = run_calibrated(model, windows, observer, device, progress)
    if find_linears(model, step.skip):  # float linears outside the decoder layers: no calibrated inputs
        for rec in quantize_model_w8a8(model, step.scheme, step.skip):
            rec.update(method="w8a8", warning="outside the decoder layers (no calibrated inputs): round to nearest")
            records.append(rec)
    alphas = [r["smoothquant_alpha"] for r in records if r.get("smoothquant_alpha") is not None]
    stats["smoothed_linears"] = len(alphas)
    if alphas:
        stats["alpha_mean"] = sum(alphas) / len(alphas)
    return CalibrationRecords(records, stats)
