"""W8A8 steps through the shared calibration pass (core/calibrate.py): int8 or FP8 (E4M3) weights per output
channel x dynamic per-token activations, optionally smoothed (SmoothQuant, Xiao et al. 2023), with weights
rounded by GPTQ or to nearest. The math and the modules are in core/quant/w8a8.py and core/quant/gptq.py.

Per decoder layer, in one pass: the observer collects each linear's max |input| per channel, a bounded sample
of input rows and (for GPTQ rounding) H = 2/n X^T X. apply() then, for each group of linears reading one
activation produced inside the layer (a norm, or v_proj / up_proj), picks the smoothing strength alpha (fixed,
or searched on the sample: smallest W8A8 output error; "auto" smooths int8 only, see W8A8Step.smooths), folds
the scales into the producer and the linears, and rescales the statistics to match (X/s: H -> H / (s s^T));
finally it picks every linear's per-channel scale (int8: absmax / 127; FP8: searched per channel, see
search_channel_scale), rounds its weight onto that grid and swaps in a W8A8Linear / FP8Linear.
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
    search_channel_scale,
    smoothable_groups,
    w8a8_output_error,
)

SAMPLE_ROWS = 512  # input rows kept per linear (spread over the windows) for the alpha search and error figures
# smoothquant_alpha="auto" smooths int8 only (core.recipe.AUTO_SMOOTHING; alpha searched per group). FP8 is left
# out: its rounding error is relative (3 mantissa bits), so scaling input channels leaves the error of weights and activations alike
# unchanged but for one effect: an outlier channel scaled into the weights' row maxima is stored exactly. The
# search (alphas ranked by the error with round-to-nearest weights, summed over tokens) picks smoothing for
# that, a gain GPTQ mostly makes anyway and which, where largest, sits on a few massive-activation tokens
# (5 tokens: 26 % of one down_proj's error). On the default model, with GPTQ rounding and searched FP8 scales,
# searched smoothing raised the KL to the float model on held-out calibration-split windows from 0.0155 to
# 0.0170 (evaluation windows: 0.0175 -> 0.0189). A fixed alpha still smooths FP8.


class W8A8Observer(GPTQObserver):
    name = "w8a8"
    sequential = False  # smooths and rounds the whole layer from the float layer's inputs

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
        smoothed = self._smooth(ctx, x) if step.smooths() else []
        alpha_of = {n: g["alpha"] for g in smoothed for n in g["linears"]}
        records = []
        for name, module in ctx.linears.items():
            linear = as_linear(module)
            H = self.H.pop(name, None)
            self.count.pop(name, None)
            self.absmax.pop(name, None)
            with torch.no_grad():
                rounded, scale, info = _round_weight(linear.weight, H, x.get(name), step)
                after = None
                if name in x:
                    after = w8a8_output_error(x[name], [linear.weight], step.scheme, rounded=[rounded])
            records.append(replace_with_w8a8(
                ctx.model, name, linear, step.scheme, rounded, scale,
                method="w8a8", smoothquant_alpha=alpha_of.get(name), damp=info["damp"], warning=info["warning"],
                out_rel_error=after, rtn_out_rel_error=before.get(name)))
        self.samples.clear()
        return records


def _round_weight(w: torch.Tensor, H: torch.Tensor | None, sample: torch.Tensor | None, step) -> tuple:
    """-> (w rounded onto its W8A8 grid as float32, the per-channel scale, info): GPTQ when H is given, else
    round to nearest; the scale from _weight_scale."""
    scale = _weight_scale(w, step.scheme, H, sample)
    if H is not None:
        rounded, info = gptq_round(w, H, lambda v: _grid(v, scale, step.scheme), damp=step.damp, act_order=True)
        return rounded, scale, info
    info = {"damp": None, "warning": None}
    if step.weight_rounding == "gptq":
        info["warning"] = "no calibration tokens reached this layer: weights rounded to nearest"
    return _grid(w, scale, step.scheme), scale, info


def _weight_scale(w: torch.Tensor, scheme: str, H: torch.Tensor | None, sample: torch.Tensor | None) -> torch.Tensor:
    """Per-output-channel scale: for FP8, searched per channel (search_channel_scale) with each input channel's
    mean square (diag H, else the sample's) as its importance; for int8 (or without statistics), absmax."""
    if scheme != "fp8" or (H is None and sample is None):
        return channel_scale(w, scheme)
    importance = H.diagonal() if H is not None else sample.float().pow(2).mean(0)
    return search_channel_scale(w, importance, scheme)


def _grid(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    return quantize_with_scale(w, scale, scheme).float() * scale[:, None]


def quantize_model_w8a8_step(model: nn.Module, step, windows: torch.Tensor, device="cpu",
                             progress=None) -> CalibrationRecords:
    """Apply a W8A8Step through one calibration pass. Per-linear records carry the relative output error of
    the layer on calibration inputs (activation quantization included) for plain round-to-nearest W8A8
    ("rtn_out_rel_error") and for what was applied ("out_rel_error"), and the smoothing alpha used."""
    if windows is None:  # round to nearest, no smoothing: nothing to calibrate
        return CalibrationRecords(quantize_model_w8a8(model, step.scheme, step.skip, progress), {})
    groups = smoothable_groups(model, step.skip) if step.smooths() else []
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
