"""AWQ (Lin et al. 2023, activation-aware weight quantization; follows AutoAWQ's `auto_scale` / `auto_clip`).

Two searches per decoder layer, both on the layer's calibration inputs, then plain group-wise RTN into the packed
format of core.quant.rtn (QuantizedWeight), so QuantLinear and memory accounting are the same as RTN's / GPTQ's.

1. Scale search, per group of linears reading the same activation X (core.quant.w8a8.smoothing_groups: a norm ->
   q/k/v or gate/up, v_proj -> o_proj, up_proj -> down_proj): for alpha on a grid in [0, 1),
   s = mean|X|^alpha per input channel, normalised by sqrt(max s * min s) (AutoAWQ), and
       loss(alpha) = sum over the group's linears of || X W^T - (X / s) Q(W * s)^T ||^2
   with Q = RTN at the step's bits / group size / symmetry. The best s is folded into the producer (1 / s into
   the norm weight, or the rows of the preceding linear) and into the linears' columns (W * s): the float model
   computes the same function. alpha = 0 gives s = 1, i.e. RTN, so the search is never worse than RTN on this
   loss. Simplification (as llm-compressor's option to measure the linears only): the loss is the group's own
   linears' outputs, not the parent module's output (AutoAWQ runs the whole attention / MLP block for it).
   Groups that cannot be folded (Gemma's x * (1 + w) norms, v_proj -> o_proj under grouped-query attention,
   producers outside the layer, tied weights) are not scaled; their linears are still clipped and quantized.
   AutoAWQ's default `duo_scaling` (s = mean|X|^a / mean|W~|^(1-a)) is not used: with it alpha = 0 is no longer
   RTN, so the search could lose to RTN.
2. Clipping search (AutoAWQ `auto_clip`): per output channel and group, the quantization range is shrunk by a
   ratio on a grid (1.0 down to 0.5) and the ratio minimising that group's share of the output error on the
   calibration inputs is kept. Range shrinking follows IST-DASLab/gptq's `quant.py` MSE grid (min and max both
   times the ratio, so asymmetric groups keep their zero point's side), computed as compute_qparams(W * ratio)
   then quantize_codes(W): values beyond the shrunk range saturate at the extreme codes. Ratio 1.0 is RTN and
   wins ties, so no group's error grows. q / k projections are not clipped (AutoAWQ: their error is amplified
   by the softmax, which the linear-output loss does not see).

Losses use the Gram matrix H = mean over calibration tokens of x x^T of each activation instead of a sample of
token rows: ||X D^T||^2 = n * trace(D H D^T) exactly, for every calibration token, at a cost independent of the
number of tokens; the clipping error of one group is the same formula with H's diagonal block of that group
(which is what AutoAWQ's per-group partial outputs measure).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..calibrate import (
    CalibrationRecords,
    LayerContext,
    Observer,
    as_linear,
    find_decoder_layers,
)
from .gptq import quantize_weights_calibrated
from .linear import (
    Progress,
    replace_with_quantized,
    shared_weight_names,
)
from .packing import pack_bits
from .rtn import (
    QuantizedWeight,
    compute_qparams,
    effective_group_size,
    group_view,
    quantize_codes,
    quantize_rtn,
)
from .w8a8 import fold_smoothing, smoothing_groups

N_GRID = 20
CLIP_RATIOS = tuple(1 - i / 40 for i in range(21))  # 1.0, 0.975, ..., 0.5
_NO_INFO = {"alpha": None, "scale_group": None, "scale_loss_vs_rtn": None, "clip_ratio_mean": None,
            "clip_ratio_min": None, "clipped_groups": None, "warning": None, "out_rel_error": None,
            "scaled_out_rel_error": None, "rtn_out_rel_error": None}


# --- pure math -------------------------------------------------------------------------------------------------

def awq_scale(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha per input channel (clamped to >= 1e-4), normalised by sqrt(max * min) (AutoAWQ);
    alpha = 0 gives exactly ones."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _expand(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, G] per group -> [out, in] per element."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def _range_proxy(g: torch.Tensor) -> torch.Tensor:
    """[out, G, gs] groups -> [out, G * 2]: each group's (min, max), a stand-in with the same group min / max /
    absmax, so compute_qparams(proxy * r, bits, 2, ...) gives the grid of the group shrunk by r in O(out * G)."""
    return torch.stack([g.amin(-1), g.amax(-1)], dim=-1).flatten(1)


def _fake_quantize(g: torch.Tensor, proxy: torch.Tensor, bits: int, symmetric: bool, ratio=1.0) -> torch.Tensor:
    """Quantize + dequantize groups g [out, G, gs] on the grid of their range times ratio (float or [out, G]):
    the same arithmetic as compute_qparams + quantize_codes + dequantize, without per-element expansion."""
    scales, zeros = compute_qparams(proxy * (ratio if isinstance(ratio, float) else ratio.repeat_interleave(2, 1)),
                                    bits, 2, symmetric)
    s = scales.float().unsqueeze(-1)
    z = float(2 ** (bits - 1)) if zeros is None else zeros.float().unsqueeze(-1)
    return ((torch.round(g / s) + z).clamp_(0, 2**bits - 1).sub_(z)).mul_(s)


def fake_quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """RTN quantize + dequantize of w [out, in] (float32; the same values as quantize_rtn(...).dequantize())."""
    out, n = w.shape
    g = group_view(w.float(), group_size)
    return _fake_quantize(g, _range_proxy(g), bits, symmetric).view(out, -1)[:, :n]


def quantize_clipped(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                     ratio: torch.Tensor | None = None) -> QuantizedWeight:
    """Group-wise RTN of weight [out, in] with each group's range (min and max) shrunk by ratio [out, G] in
    (0, 1]; values outside saturate at the extreme codes. ratio None or all ones is exactly quantize_rtn."""
    w = weight.detach().float()
    gs = effective_group_size(w.shape[1], group_size)
    if ratio is None:
        return quantize_rtn(w, bits, gs, symmetric)
    scales, zeros = compute_qparams(w * _expand(ratio.float(), gs, w.shape[1]), bits, gs, symmetric)
    codes = quantize_codes(w, scales, zeros, bits, gs)
    return QuantizedWeight(pack_bits(codes, bits), tuple(w.shape), bits, gs, symmetric, scales, zeros)


def output_sq_error(diff: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """sum_o d_o^T H d_o = ||X D^T||^2 / n for D = diff [out, in], H = X^T X / n."""
    return torch.dot((diff @ gram).flatten(), diff.flatten())


def _rel(num: float, den: float) -> float:
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


def output_rel_error(weight: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - W_hat)^T|| / ||X W^T|| on the inputs whose Gram matrix is `gram`."""
    w = weight.float()
    return _rel(output_sq_error(w - w_hat.float(), gram).item(), output_sq_error(w, gram).item())


def search_scale(weights: list[torch.Tensor], gram: torch.Tensor, x_mean: torch.Tensor, bits: int,
                 group_size: int | None, symmetric: bool, n_grid: int = N_GRID) -> tuple[torch.Tensor, dict]:
    """The AWQ scale s [in] for linears (weights [out_i, in]) reading the same activation, whose Gram matrix is
    gram [in, in] and per-channel mean |x| is x_mean [in]: the alpha in {0, 1/n_grid, ...} minimising
    sum_i ||X W_i^T - (X / s) Q(W_i * s)^T||^2. info: alpha, loss / rtn_loss (per token), losses (per alpha).
    The first minimum wins, so s is ones (RTN) unless some alpha is strictly better."""
    W = torch.cat([w.detach().float() for w in weights])  # groups lie within rows: stacking changes nothing
    H = gram.float().to(W.device)
    gs = effective_group_size(W.shape[1], group_size)
    best, losses = None, []
    for i in range(max(1, n_grid)):
        alpha = i / max(1, n_grid)
        s = awq_scale(x_mean.to(W.device), alpha)
        w_hat = fake_quantize_rtn(W * s, bits, gs, symmetric) / s
        loss = output_sq_error(W - w_hat, H).item()
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    loss, alpha, s = best
    return s, {"alpha": alpha, "loss": loss, "rtn_loss": losses[0], "losses": losses}


def _group_blocks(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal blocks [G, gs, gs] of gram [in, in] (a short last group zero-padded)."""
    n = gram.shape[0]
    G = -(-n // group_size)
    pad = G * group_size - n
    Hp = torch.nn.functional.pad(gram, (0, pad, 0, pad)) if pad else gram
    return Hp.view(G, group_size, G, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def group_errors(diff: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per output channel and group, d_og^T H_gg d_og: [out, G] (that group's own output error, per token)."""
    G, gs, _ = blocks.shape
    out, n = diff.shape
    pad = G * gs - n
    D = torch.nn.functional.pad(diff, (0, pad)) if pad else diff
    D = D.view(out, G, gs).transpose(0, 1)  # [G, out, gs]
    return (torch.bmm(D, blocks) * D).sum(-1).t()


def search_clip(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ratio [out, G], error [out, G]): per output channel and group, the range-shrink ratio (from `ratios`,
    whose first entry should be 1.0 = RTN) minimising that group's output error d^T H_gg d."""
    w = weight.detach().float()
    out, n = w.shape
    gs = effective_group_size(n, group_size)
    blocks = _group_blocks(gram.float().to(w.device), gs)
    g = group_view(w, gs)
    proxy = _range_proxy(g)
    best_err = best_ratio = None
    for r in ratios:
        ratio = torch.full((out, blocks.shape[0]), float(r), device=w.device)
        w_hat = _fake_quantize(g, proxy, bits, symmetric, float(r)).view(out, -1)[:, :n]
        err = group_errors(w - w_hat, blocks)
        if best_err is None:
            best_err, best_ratio = err, ratio
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, ratio, best_ratio)
    return best_ratio, best_err


def no_clip(name: str) -> bool:
    """Query / key projections, which AutoAWQ leaves unclipped (avoid_clipping: q_, k_, query, key, Wqkv),
    plus fused qkv linears (Phi-3 qkv_proj, GPT-2 c_attn)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith(("q_", "k_")) or leaf in ("q", "k", "query", "key", "c_attn") or "qkv" in leaf.lower()


# --- the calibration pass --------------------------------------------------------------------------------------

class AWQObserver(Observer):
    """For core.calibrate: per activation (the input a group of linears shares, else one linear's input), the
    Gram matrix H = mean x x^T and the mean |x| per channel; apply() searches scales for the layer's foldable
    groups, folds them, then clips and quantizes every linear. quantize=False stops after folding (the float
    model then computes the same function: a check of the folding)."""

    name = "awq"

    def __init__(self, step, groups: list[tuple[str, list[str]]], quantize: bool = True):
        self.step, self.quantize = step, quantize
        self.skip = list(step.skip)
        self.groups = groups
        # statistics are kept per activation: a group's shared input under "<producer>>", else the linear's name
        # (a producer may itself be a linear with its own input: up_proj in up_proj -> down_proj)
        self.key_of = {lin: f"{prev}>" for prev, lins in groups for lin in lins}
        self._reset()

    def _reset(self):
        self.H: dict[str, torch.Tensor] = {}
        self.absum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self._last: dict[str, torch.Tensor] = {}

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        key = self.key_of.get(name, name)
        if self._last.get(key) is x:  # q/k/v (gate/up) get the same tensor: count it once for their group
            return
        self._last[key] = x
        f = x.detach().reshape(-1, x.shape[-1]).float()
        n, m = self.count.get(key, 0), f.shape[0]
        if m == 0:
            return
        xtx = f.t() @ f
        H = self.H.get(key)
        if H is None:
            H = self.H[key] = torch.zeros_like(xtx)
            self.absum[key] = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
        H.mul_(n / (n + m)).add_(xtx, alpha=1.0 / (n + m))
        self.absum[key] += f.abs().sum(0, dtype=torch.float64)
        self.count[key] = n + m

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.H.values(), *self.absum.values(), *self._last.values()])

    def _scale_groups(self, ctx: LayerContext) -> tuple[dict, dict]:
        """Search and fold the scales of this layer's foldable groups -> (key -> s, linear name -> info)."""
        s_cfg = self.step
        scale_of, info_of = {}, {}
        for prev, names in self.groups:
            key = f"{prev}>"
            if not prev.startswith(ctx.name + ".") or key not in self.H:
                continue
            if not all(n in ctx.linears and isinstance(ctx.linears[n], nn.Linear) for n in names):
                continue
            if shared_weight_names(ctx.model, [prev, *names]):
                continue
            linears = [ctx.linears[n] for n in names]
            x_mean = (self.absum[key] / self.count[key]).float()
            with torch.no_grad():
                s, info = search_scale([lin.weight for lin in linears], self.H[key], x_mean, s_cfg.bits,
                                       s_cfg.group_size, s_cfg.symmetric, getattr(s_cfg, "n_grid", N_GRID))
            rel = info["loss"] / info["rtn_loss"] if info["rtn_loss"] > 0 else None
            for n in names:
                info_of[n] = {"alpha": info["alpha"], "scale_group": prev, "scale_loss_vs_rtn": rel}
            if info["alpha"] > 0:
                fold_smoothing(ctx.model.get_submodule(prev), linears, s)
                scale_of[key] = s.to(self.H[key].device)
        return scale_of, info_of

    def apply(self, ctx: LayerContext) -> list[dict]:
        st = self.step
        self._last = {}
        scale_of, info_of = self._scale_groups(ctx)
        records = []
        if not self.quantize:
            records = [{"name": n, **info_of[n]} for n in info_of]
            self._reset()
            return records
        clip = getattr(st, "clip", True)
        for name, module in ctx.linears.items():
            linear = as_linear(module)
            key = self.key_of.get(name, name)
            H, s = self.H.get(key), scale_of.get(key)
            info = {**_NO_INFO, **info_of.get(name, {})}
            with torch.no_grad():
                W = linear.weight.detach().float()
                if H is None:
                    qw = quantize_rtn(W, st.bits, st.group_size, st.symmetric)
                    info["warning"] = "no calibration tokens reached this layer: fell back to RTN"
                else:
                    Hc = H if s is None else H / (s[:, None] * s[None, :])  # the Gram of X / s
                    T = W if s is None else W / s  # the same function on the unscaled inputs
                    gs = effective_group_size(W.shape[1], st.group_size)
                    den = output_sq_error(T, H).item()  # ||X T^T||^2 / n == ||(X / s) W^T||^2 / n
                    rtn = _rel(output_sq_error(T - fake_quantize_rtn(T, st.bits, gs, st.symmetric), H).item(), den)
                    scaled = rtn if s is None else \
                        _rel(output_sq_error(W - fake_quantize_rtn(W, st.bits, gs, st.symmetric), Hc).item(), den)
                    info.update(rtn_out_rel_error=rtn, scaled_out_rel_error=scaled, out_rel_error=scaled)
                    ratio = None
                    if clip and not no_clip(name):
                        ratio, _ = search_clip(W, Hc, st.bits, gs, st.symmetric)
                        info.update(clip_ratio_mean=float(ratio.mean()), clip_ratio_min=float(ratio.min()),
                                    clipped_groups=float((ratio < 1).float().mean()))
                    qw = quantize_clipped(W, st.bits, gs, st.symmetric, ratio)
                    if ratio is not None:
                        info["out_rel_error"] = _rel(output_sq_error(W - qw.dequantize(), Hc).item(), den)
            rec = replace_with_quantized(ctx.model, name, linear, qw)
            rec.update(method="awq", **info)
            records.append(rec)
        self._reset()
        return records


def quantize_model_awq(model: nn.Module, step, windows: torch.Tensor, device="cpu",
                       progress: Progress | None = None) -> CalibrationRecords:
    """AWQ every float linear of the decoder layers not matched by step.skip, calibrated on `windows`
    ([n, window_len] token ids); step: bits, group_size, symmetric, skip, n_grid, clip. Float nn.Linear layers
    outside the decoder layers (not skipped) get RTN, with a warning in their record. Returns a
    core.calibrate.CalibrationRecords (records + the pass's `.stats`, incl. scaled_groups)."""
    prefix, _ = find_decoder_layers(model)
    groups = [(p, ls) for p, ls in smoothing_groups(model) if p.startswith(prefix + ".")]
    records = quantize_weights_calibrated(model, step, windows, lambda: AWQObserver(step, groups), "AWQ", device,
                                          progress)
    stats = records.stats
    stats["scaled_groups"] = len({r["scale_group"] for r in records if r.get("alpha")})
    stats["foldable_groups"] = len(groups)
    return records
