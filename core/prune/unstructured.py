"""Unstructured and N:M pruning of a model: Observers for core.calibrate and prune_model().

Weights are zeroed in place, so the float model keeps working (and a later step, e.g. GPTQ, sees ordinary
nn.Linear layers); core.prune.sparse.compress_sparse turns the masked linears into compressed storage.

Per-linear records: name, shape, kind ("sparse"), method, pattern, target_sparsity, sparsity (fraction of the
new weight that is zero), rel_error (||W - W'|| / ||W||), out_rel_error and error_basis:
- "hessian" (SparseGPT): exactly ||X (W - W')^T|| / ||X W^T|| on the calibration inputs, from H = 2/n X^T X;
- "feature_norms" (Wanda, magnitude run with calibration windows): the same ratio with X^T X replaced by its
  diagonal (sum_ij dW_ij^2 ||X_j||^2 / sum_ij W_ij^2 ||X_j||^2), exact only for uncorrelated input features;
- None (magnitude run without calibration windows).
bytes / orig_bytes: the weight's bytes now / before (equal: the weight stays dense until compress_sparse),
warning (str or None; e.g. an N:M pattern on a layer whose width is not a multiple of M leaves it dense).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from ..calibrate import (
    CalibrationRecords,
    LayerContext,
    Observer,
    as_linear,
    calibration_targets,
    find_decoder_layers,
    is_linear,
    run_calibrated,
)
from ..errors import UnsupportedError
from ..quant.gptq import GPTQObserver
from ..quant.linear import _untie, shared_weight_names
from .masks import (
    magnitude_scores,
    make_mask,
    outlier_ratio,
    owl_ratios,
    parse_pattern,
    pattern_sparsity,
    wanda_scores,
)
from .sparsegpt import sparsegpt_prune

METHODS = ("magnitude", "wanda", "sparsegpt")
OWL_M, OWL_LAMBDA = 5.0, 0.08  # the OWL paper's LLaMA setting (outlier threshold M, sparsity spread lambda)


def _opt(step, name, default):
    v = getattr(step, name, default)
    return default if v is None else v


def _norm_error(W0: torch.Tensor, W: torch.Tensor, sumsq: torch.Tensor | None) -> float | None:
    if sumsq is None:
        return None
    s = sumsq.to(W0.device, torch.float32).view(1, -1)
    den = ((W0.float() ** 2) * s).sum().item()
    num = (((W0.float() - W.float()) ** 2) * s).sum().item()
    return math.sqrt(num / den) if den > 0 else float("nan")


def _record(name: str, W0: torch.Tensor, W: torch.Tensor, method: str, pattern: str, target: float,
            out_err: float | None, basis: str | None, warning: str | None = None, **extra) -> dict:
    w0 = W0.detach().float()
    n0 = torch.linalg.norm(w0).item()
    return {
        "name": name, "shape": [W0.shape[0], W0.shape[1]], "kind": "sparse", "method": method, "pattern": pattern,
        "target_sparsity": target, "sparsity": (W == 0).float().mean().item(),
        "rel_error": torch.linalg.norm(w0 - W.float()).item() / n0 if n0 > 0 else 0.0,
        "out_rel_error": out_err, "error_basis": basis, "bits": None, "group_size": None,
        "bytes": W.numel() * W.element_size(), "orig_bytes": W0.numel() * W0.element_size(),
        "warning": warning, **extra,
    }


def _nm_misfit(pattern: str, in_features: int) -> str | None:
    nm = parse_pattern(pattern)
    if nm is not None and in_features % nm[1]:
        return f"{pattern} needs in_features divisible by {nm[1]} ({in_features} is not): left dense"
    return None


def prune_linear_by_scores(name: str, module: nn.Module, scores: torch.Tensor | None, sparsity: float,
                           pattern: str, group: str, method: str, sumsq: torch.Tensor | None = None,
                           warning: str | None = None) -> dict:
    """Zero the lowest-score weights of one linear in place (scores None: magnitude) and return its record."""
    lin = as_linear(module)  # for a Conv1D, a transposed view of its weight: writes go through
    W0 = lin.weight.detach().clone()
    misfit = _nm_misfit(pattern, W0.shape[1])
    if misfit:
        return _record(name, W0, W0, method, pattern, sparsity, 0.0 if sumsq is not None else None,
                       "feature_norms" if sumsq is not None else None, misfit)
    keep = make_mask(magnitude_scores(W0) if scores is None else scores, sparsity, pattern, group)
    with torch.no_grad():
        lin.weight.mul_(keep.to(lin.weight.dtype))
    W = lin.weight.detach()
    return _record(name, W0, W, method, pattern, sparsity, _norm_error(W0, W, sumsq),
                   "feature_norms" if sumsq is not None else None, warning)


class _LayerSparsity:
    """Target sparsity per decoder layer: uniform, or OWL's per-layer ratios."""

    def __init__(self, step, layer_ratios: dict[int, float] | None = None):
        self.step = step
        self.pattern = _opt(step, "pattern", "unstructured")
        self.sparsity = pattern_sparsity(self.pattern, step.sparsity)
        self.layer_ratios = layer_ratios or {}

    def at(self, index: int) -> float:
        return self.layer_ratios.get(index, self.sparsity)


class FeatureNormObserver(Observer):
    """Per-linear sum over calibration tokens of x_j^2 (float32): ||X_j||_2^2 for every input feature j."""

    name = "feature norms"

    def __init__(self, step):
        self.step = step
        self.skip = list(_opt(step, "skip", ["lm_head"]))
        self.sumsq: dict[str, torch.Tensor] = {}
        self._last = self._sq = None

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        if x is not self._last:  # q/k/v (gate/up) share one input tensor
            f = x.reshape(-1, x.shape[-1]).float()
            self._last, self._sq = x, (f * f).sum(0)
        if name in self.sumsq:
            self.sumsq[name] += self._sq
        else:
            self.sumsq[name] = self._sq.clone()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sumsq.values())

    def _take(self, name: str) -> torch.Tensor | None:
        self._last = self._sq = None
        return self.sumsq.pop(name, None)


class OutlierObserver(FeatureNormObserver):
    """OWL's first pass: each decoder layer's outlier ratio of its Wanda scores (nothing is changed)."""

    name = "owl outliers"

    def __init__(self, step, m: float = OWL_M):
        super().__init__(step)
        self.m = m
        self.outliers: dict[int, float] = {}
        self.sizes: dict[int, int] = {}

    def apply(self, ctx: LayerContext) -> list[dict]:
        scores = []
        for name, module in ctx.linears.items():
            sumsq = self._take(name)
            w = as_linear(module).weight
            scores.append(wanda_scores(w, sumsq.sqrt()) if sumsq is not None else magnitude_scores(w))
        self.outliers[ctx.index] = outlier_ratio(scores, self.m)
        self.sizes[ctx.index] = sum(s.numel() for s in scores)
        return []


class MagnitudeObserver(FeatureNormObserver):
    """|W| scores; the calibration inputs only serve the per-linear output-error estimate (and OWL)."""

    name = "magnitude"

    def __init__(self, step, layer_ratios: dict[int, float] | None = None):
        super().__init__(step)
        self.target = _LayerSparsity(step, layer_ratios)
        self.group = _opt(step, "magnitude_group", "layer")

    def scores(self, w: torch.Tensor, sumsq: torch.Tensor | None) -> torch.Tensor:
        return magnitude_scores(w)

    def apply(self, ctx: LayerContext) -> list[dict]:
        records = []
        s = self.target.at(ctx.index)
        for name, module in ctx.linears.items():
            sumsq = self._take(name)
            w = as_linear(module).weight
            warn, group, method = None, self.group, self.name
            if sumsq is None and self.name != "magnitude":
                warn, group, method = "no calibration tokens reached this layer: fell back to magnitude", "layer", "magnitude"
            scores = magnitude_scores(w) if sumsq is None else self.scores(w, sumsq)
            records.append(prune_linear_by_scores(name, module, scores, s, self.target.pattern, group, method,
                                                  sumsq, warn))
        return records


class WandaObserver(MagnitudeObserver):
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, compared per output row."""

    name = "wanda"

    def __init__(self, step, layer_ratios: dict[int, float] | None = None):
        super().__init__(step, layer_ratios)
        self.group = "row"

    def scores(self, w: torch.Tensor, sumsq: torch.Tensor | None) -> torch.Tensor:
        return wanda_scores(w, sumsq.sqrt())


class SparseGPTObserver(GPTQObserver):
    """SparseGPT: GPTQ's Hessian accumulation (H = 2/n X^T X per linear), then sparsegpt_prune."""

    name = "sparsegpt"
    sequential = False  # prunes the whole layer from the float layer's inputs

    def __init__(self, step, layer_ratios: dict[int, float] | None = None):
        super().__init__(step)
        self.skip = list(_opt(step, "skip", ["lm_head"]))
        self.target = _LayerSparsity(step, layer_ratios)

    def apply(self, ctx: LayerContext) -> list[dict]:
        st, pattern = self.step, self.target.pattern
        s = self.target.at(ctx.index)
        self._last = self._xtx = None
        records = []
        for name, module in ctx.linears.items():
            H = self.H.pop(name, None)
            self.count.pop(name, None)
            lin = as_linear(module)
            misfit = _nm_misfit(pattern, lin.in_features)
            if H is None or misfit:
                records.append(prune_linear_by_scores(
                    name, module, None, s, pattern, "layer", "magnitude" if H is None else "sparsegpt",
                    warning=misfit or "no calibration tokens reached this layer: fell back to magnitude"))
                continue
            with torch.no_grad():
                W0 = lin.weight.detach().clone()
                W, _, info = sparsegpt_prune(W0, H, s, pattern, block_size=_opt(st, "block_size", 128),
                                                damp=_opt(st, "damp", 0.01))
                lin.weight.copy_(W)
            del H
            records.append(_record(name, W0, lin.weight.detach(), "sparsegpt", pattern, s, info["out_rel_error"],
                                   "hessian", info["warning"], damp=info["damp"]))
        return records


OBSERVERS = {"magnitude": MagnitudeObserver, "wanda": WandaObserver, "sparsegpt": SparseGPTObserver}


def _targets(model: nn.Module, skip) -> tuple[str, list[str], list[tuple[str, nn.Module]]]:
    """(decoder prefix, names of linears inside the decoder layers, (name, module) of those outside)."""
    prefix, layers = find_decoder_layers(model)
    inside = [n for i, layer in enumerate(layers) for n in calibration_targets(layer, f"{prefix}.{i}", skip)]
    outside = [(n, m) for n, m in model.named_modules()
               if is_linear(m) and not n.startswith(prefix + ".") and not any(s in n for s in skip)]
    return prefix, inside, outside


def _untie_targets(model: nn.Module, names: list[str]) -> None:
    """A pruned weight that is also used elsewhere (lm_head tied to the embedding) gets its own copy first,
    so zeroing it in place does not prune the other user."""
    tied = shared_weight_names(model, names)
    for n in tied:
        m = model.get_submodule(n)
        m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
    if tied:
        _untie(model, tied)


def validate_step(step) -> None:
    if step.method not in METHODS:
        raise UnsupportedError(f"Unknown pruning method {step.method!r}: one of {', '.join(METHODS)}.")
    if not 0.0 <= step.sparsity < 1.0:
        raise UnsupportedError(f"sparsity must be in [0, 1), got {step.sparsity}")
    try:
        nm = parse_pattern(_opt(step, "pattern", "unstructured"))
    except ValueError as e:
        raise UnsupportedError(str(e)) from None
    if nm is not None and _opt(step, "owl", False):
        raise UnsupportedError("OWL (non-uniform layer ratios) applies to unstructured sparsity only, not N:M.")


def prune_model(model: nn.Module, step, windows: torch.Tensor | None, device="cpu",
                progress: Callable[[str, int, int], None] | None = None) -> CalibrationRecords:
    """Prune every float linear of the decoder layers not matched by step.skip, in place.

    step: method ("magnitude" | "wanda" | "sparsegpt"), sparsity (0..1; ignored for N:M, which fixes it),
    pattern ("unstructured" | "N:M" such as "2:4", N kept of every M), skip (default ["lm_head"]); optional:
    owl (bool), owl_m (5.0), owl_lambda (0.08), damp (0.01) and block_size (128) for SparseGPT,
    magnitude_group ("layer" | "row", default "layer").
    windows: [n, window_len] calibration token ids; may be None only for magnitude without OWL (no pass runs).
    Float linears outside the decoder layers that are not skipped get magnitude pruning (record with a warning
    for wanda / sparsegpt). Returns CalibrationRecords (per-linear records, .stats: the pass's figures plus
    target_sparsity, achieved_sparsity over the pruned linears and, with OWL, layer_sparsity and outlier_ratio;
    empty stats when no pass ran); .summary holds target / achieved sparsity (and OWL's figures) in every case.
    """
    validate_step(step)
    skip = list(_opt(step, "skip", ["lm_head"]))
    pattern = _opt(step, "pattern", "unstructured")
    owl = bool(_opt(step, "owl", False))
    if windows is None and (step.method != "magnitude" or owl):
        raise UnsupportedError(f"{step.method}{' with OWL' if owl else ''} needs calibration windows.")
    prefix, inside, outside = _targets(model, skip)
    if not inside and not outside:
        raise UnsupportedError(f"Pruning found no floating-point linear layers (skip={skip}).")
    _untie_targets(model, inside + [n for n, _ in outside])
    t0 = time.perf_counter()
    target = pattern_sparsity(pattern, step.sparsity)
    extra: dict = {}
    layer_ratios = None
    if owl:
        obs = OutlierObserver(step, float(_opt(step, "owl_m", OWL_M)))
        _, owl_stats = run_calibrated(model, windows, obs, device, progress)
        idx = sorted(obs.outliers)
        ratios = owl_ratios([obs.outliers[i] for i in idx], target, float(_opt(step, "owl_lambda", OWL_LAMBDA)),
                            [obs.sizes[i] for i in idx])
        layer_ratios = dict(zip(idx, ratios))
        extra = {"layer_sparsity": ratios, "outlier_ratio": [obs.outliers[i] for i in idx],
                 "owl_seconds": owl_stats["seconds"]}
    if windows is None:  # magnitude needs no calibration: prune in place, layer by layer
        records, stats = [], {}
        _, layers = find_decoder_layers(model)
        for i, layer in enumerate(layers):
            if progress:
                progress("magnitude", i, len(layers))
            for name, module in calibration_targets(layer, f"{prefix}.{i}", skip).items():
                records.append(prune_linear_by_scores(name, module, None, target, pattern,
                                                      _opt(step, "magnitude_group", "layer"), "magnitude"))
        if progress:
            progress("magnitude", len(layers), len(layers))
    else:
        records, stats = run_calibrated(model, windows, OBSERVERS[step.method](step, layer_ratios), device,
                                        progress)
    for name, module in outside:
        warn = None if step.method == "magnitude" else "outside the decoder layers (no calibrated inputs): magnitude"
        records.append(prune_linear_by_scores(name, module, None, target, pattern,
                                              _opt(step, "magnitude_group", "layer"), "magnitude", warning=warn))
    total = sum(r["shape"][0] * r["shape"][1] for r in records)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in records)
    summary = {**extra, "target_sparsity": target, "achieved_sparsity": zeros / total if total else 0.0}
    out = CalibrationRecords(records, {**stats, "seconds": time.perf_counter() - t0, **summary} if stats else {})
    out.summary = summary  # also when no pass ran (magnitude without windows)
    return out
