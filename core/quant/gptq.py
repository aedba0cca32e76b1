"""GPTQ (Frantar et al. 2022; follows IST-DASLab/gptq `fasterquant`).

Columns are quantized one at a time; each column's rounding error is spread onto the columns not yet
quantized through the upper Cholesky factor of H^-1, where H = 2/n X^T X of the layer's calibration inputs,
so the layer's outputs (not its weights) stay close. The result is the plain group-wise format of
core.quant.rtn (QuantizedWeight), so QuantLinear and memory accounting are the same as RTN's.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import torch
from torch import nn

from ..calibrate import (
    CalibrationRecords,
    LayerContext,
    Observer,
    as_linear,
    calibration_targets,
    find_decoder_layers,
    run_calibrated,
)
from ..errors import UnsupportedError
from .linear import (
    Progress,
    _untie,
    find_linears,
    replace_with_quantized,
    shared_weight_names,
)
from .memory_accounting import tensor_bytes
from .packing import pack_bits
from .rtn import (
    QuantizedWeight,
    compute_qparams,
    effective_group_size,
    quantize_rtn,
)

PRUNED_FRACTION = 0.25  # layers with at least this fraction of exact zeros were pruned: GPTQ keeps them zero
DAMP_TRIES = 5  # damp, 10x, 100x, ... before giving up on a Hessian
_NO_INFO = {"damp": None, "warning": None, "out_rel_error": None, "rtn_out_rel_error": None}


def _all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all(), faster: a finite sum means no inf / nan (only an overflowing sum needs the check)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp 10x per failed try."""
    mean = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for k in range(DAMP_TRIES):
        d = damp * 10**k
        L, bad = torch.linalg.cholesky_ex(H + (d * mean) * eye)
        if bad.item() == 0:
            U, bad = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if bad.item() == 0 and _all_finite(U):
                return U, d
    return None, d


def _output_error(weight: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, den: float | None = None) -> float:
    """||X (W - W_hat)^T|| / ||X W^T|| on the calibration inputs, from H alone. den: ||X W^T||^2 when known."""
    d = weight - w_hat
    num = ((d @ H) * d).sum().item()
    if den is None:
        den = ((weight @ H) * weight).sum().item()
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


def error_feedback(W: torch.Tensor, Hinv: torch.Tensor, round_column, block_size: int = 128) -> None:
    """GPTQ's column loop, for any rounding: columns of W [out, n] (float32) are rounded in order by
    round_column(col, w [out], upcoming) -> the rounded column [out], and each column's error is spread onto the
    columns not yet rounded through Hinv (upper Cholesky factor of H^-1), lazily per block. upcoming(k) gives
    the next k columns' current (error-updated) values [out, k], from col on. Works on a transposed copy, so
    each column and each rank-1 update is contiguous in memory (W itself is left unchanged)."""
    n = W.shape[1]
    WT = W.t().contiguous()
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = WT[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        diag = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            w = W1[i]
            upcoming = lambda k, i=i, W1=W1, i2=i2: (
                W1[i:i + k] if i + k <= len(W1) else torch.cat([W1[i:], WT[i2:i2 + k - (len(W1) - i)]])).t()
            err = Err1[i]
            torch.sub(w, round_column(i1 + i, w, upcoming), out=err).div_(diag[i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)


def group_of_t(cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group index of each (original) column index."""
    return cols.div(group_size, rounding_mode="floor")


def _factor(H0: torch.Tensor, damp: float, act_order: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """-> (Hinv, perm, info): the upper Cholesky factor of the damped H^-1 with columns in processing order (by
    decreasing diag H when act_order), the permutation or None, and info's damp / warning. Depends on H alone, so
    linears sharing one H (q/k/v, gate/up) can share it. Hinv is None when H carries no signal or stays
    indefinite (info["warning"] says so: use RTN)."""
    info = {"damp": None, "warning": None}
    if not _all_finite(H0) or not (H0.diagonal() > 0).any():
        info["warning"] = "no calibration signal reached this layer (Hessian all zero or not finite): fell back to RTN"
        return None, None, info
    H = H0.clone()
    dead = H.diagonal() == 0
    # The reference zeroes dead columns; keeping them (rounded like RTN, spreading no error: their row of H
    # is decoupled) is as good on the calibration data and stays right for inputs it never saw.
    H[dead, dead] = 1
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    Hinv, used = _inverse_cholesky(H, damp)
    if Hinv is None:
        info["warning"] = f"Hessian not positive definite even with damp={used:g}: fell back to RTN"
        return None, None, info
    info["damp"] = used
    if used != damp:
        info["warning"] = f"Hessian not positive definite with damp={damp:g}: raised damping to {used:g}"
    return Hinv, perm, info


def _prepare(W0: torch.Tensor, H0: torch.Tensor, damp: float, act_order: bool, info: dict,
             factors: dict | None = None, hessian: torch.Tensor | None = None):
    """-> (W, Hinv, perm): a float32 copy of W0 with columns in processing order, and _factor(H0)'s Hinv and
    perm (W0, None, None when it falls back to RTN). factors: a dict reused across calls, so that linears given
    the very same `hessian` object (H0 is its float32 copy or itself) factor it once; the dict keeps that object
    alive, so its id stays unique while the dict lives."""
    if factors is None or hessian is None:
        Hinv, perm, finfo = _factor(H0, damp, act_order)
    else:
        key = (id(hessian), damp, act_order)
        if key not in factors:
            factors[key] = (hessian, _factor(H0, damp, act_order))
        Hinv, perm, finfo = factors[key][1]
    info.update(finfo)
    if Hinv is None:
        return W0, None, None
    W = W0[:, perm] if perm is not None else W0.clone()
    return W, Hinv, perm


@contextmanager
def _one_thread(device: torch.device):
    """The column loop is thousands of small ops: on CPU, handing each to several threads costs more than it
    saves (measured 13x slower with 2 threads than 1 on a busy 2-core machine). Process-wide while it runs."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, round_values, damp: float = 0.01,
               block_size: int = 128, act_order: bool = True) -> tuple[torch.Tensor, dict]:
    """GPTQ onto a grid that does not depend on the column (e.g. int8 / FP8 with one float32 scale per output
    channel, fixed from the unrounded weight): round_values(w [out, k]) -> w rounded elementwise onto it.
    Returns the rounded float32 weight in the original column order (on the grid, so rounding it again
    changes nothing) and info like gptq_quantize's, with round_values(weight) (RTN) as the baseline."""
    W0 = weight.detach().float()
    H0 = hessian.detach().to(device=W0.device, dtype=torch.float32)
    info = dict(_NO_INFO)
    rtn = round_values(W0)
    with _one_thread(W0.device):
        W, Hinv, perm = _prepare(W0, H0, damp, act_order, info)
        if Hinv is None:
            return rtn, info
        outT = torch.empty(W.shape[1], W.shape[0], device=W.device)

        def round_column(col, w, upcoming):
            outT[col] = round_values(w[:, None])[:, 0]
            return outT[col]

        error_feedback(W, Hinv, round_column, block_size)
    out = outT.t()
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    den = ((W0 @ H0) * W0).sum().item()
    info["out_rel_error"] = _output_error(W0, out, H0, den)
    info["rtn_out_rel_error"] = _output_error(W0, rtn, H0, den)
    return out, info


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  symmetric: bool = True, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False, keep_zeros: bool = False,
                  factors: dict | None = None) -> tuple[QuantizedWeight, dict]:
    """Quantize weight [out, in] given the Hessian [in, in] of its inputs.

    info: damp (the relative damping finally used, None on RTN fallback), warning (str or None),
    out_rel_error / rtn_out_rel_error (relative output error on the calibration inputs, GPTQ vs RTN).
    Group parameters are computed up front on the un-permuted weight ("static groups") whenever
    act_order is on (or static_groups, or per-channel), otherwise when each group's first column is reached.
    keep_zeros: weights that are exactly zero (pruned) are quantized to exactly zero and their error is spread
    like any other column's, so a pruned model stays pruned (prune -> quantize chains).
    factors: a dict the caller keeps across linears that share one Hessian object (q/k/v): its damped inverse
    Cholesky factor is computed once (the result is the same as without it).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    with _one_thread(weight.device):
        return _gptq(weight, hessian, bits, group_size, symmetric, damp, block_size, act_order, static_groups,
                     keep_zeros, factors)


def _gptq(weight, hessian, bits, group_size, symmetric, damp, block_size, act_order, static_groups, keep_zeros,
          factors=None):
    W0 = weight.detach().float()
    out_f, n = W0.shape
    H0 = hessian.detach().to(device=W0.device, dtype=torch.float32)
    gs = effective_group_size(n, group_size)
    rtn = quantize_rtn(W0, bits, gs, symmetric)
    info = dict(_NO_INFO)

    W, Hinv, perm = _prepare(W0, H0, damp, act_order, info, factors, hessian)
    if Hinv is None:
        return rtn, info
    static = act_order or static_groups or gs == n
    n_groups = -(-n // gs)
    if static:
        scales, zeros = compute_qparams(W0, bits, gs, symmetric)
    else:
        scales = torch.empty(out_f, n_groups, dtype=torch.float16, device=W.device)
        zeros = None if symmetric else torch.empty(out_f, n_groups, dtype=torch.uint8, device=W.device)

    # per-column grid in processing order, float32 (codes stay float in the loop: exact small integers)
    codes = torch.empty(n, out_f, device=W.device)
    maxq, mid = 2**bits - 1, float(2 ** (bits - 1))
    col_scale = col_zero = None
    if static:
        order = perm if perm is not None else torch.arange(n, device=W.device)
        col_scale = scales.float().t()[group_of_t(order, gs)].contiguous()
        col_zero = None if zeros is None else zeros.float().t()[group_of_t(order, gs)].contiguous()
    cur = {}
    pruned = (W == 0).t().contiguous() if keep_zeros else None  # in processing order, like W

    def round_column(col, w, upcoming):
        if static:
            s, z = col_scale[col], mid if col_zero is None else col_zero[col]
        else:
            if col % gs == 0:  # from the current (error-updated) values, also when a group starts mid-block
                block = upcoming(gs)
                sg, zg = compute_qparams(block, bits, block.shape[1], symmetric)
                g = col // gs
                scales[:, g:g + 1] = sg
                if zeros is not None:
                    zeros[:, g:g + 1] = zg
                cur["s"], cur["z"] = sg.float()[:, 0], mid if zg is None else zg.float()[:, 0]
            s, z = cur["s"], cur["z"]
        q = torch.round(w / s).add_(z).clamp_(0, maxq)
        if pruned is not None:  # the code of 0.0: the zero point (0 is always on the grid)
            q = torch.where(pruned[col], z, q)
        codes[col] = q
        return (q - z).mul_(s)

    error_feedback(W, Hinv, round_column, block_size)
    codes = codes.t().to(torch.uint8)

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(pack_bits(codes, bits), (out_f, n), bits, gs, symmetric, scales, zeros)
    den = ((W0 @ H0) * W0).sum().item()
    info["out_rel_error"] = _output_error(W0, qw.dequantize(), H0, den)
    info["rtn_out_rel_error"] = _output_error(W0, rtn.dequantize(), H0, den)
    return qw, info


def _gram_edges(d: int) -> list[int]:
    nb = max(1, min(8, d // 128))
    return [round(d * k / nb) for k in range(nb + 1)]


def _add_gram_upper(acc: torch.Tensor, f: torch.Tensor) -> None:
    """acc += f^T f [d, d] on the diagonal blocks and the blocks above them only (f [m, d]): X^T X is symmetric,
    so the blocks below need not be computed (~40 % fewer flops for d >= 1024); _mirror_upper fills them once at
    the end. Each entry is the same dot product as in f.t() @ f."""
    e = _gram_edges(f.shape[1])
    for a, b in itertools.pairwise(e):
        acc[a:b, a:].addmm_(f[:, a:b].t(), f[:, a:])


def _mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """Fill the blocks below the diagonal blocks from those above (in place): the full symmetric matrix."""
    e = _gram_edges(acc.shape[0])
    for i in range(len(e) - 1):
        for j in range(i + 1, len(e) - 1):
            acc[e[j]:e[j + 1], e[i]:e[i + 1]] = acc[e[i]:e[i + 1], e[j]:e[j + 1]].t()
    return acc


class GPTQObserver(Observer):
    """For core.calibrate: H = 2/n X^T X (float32) per linear, then gptq_quantize.

    Linears fed the same input tensor (q/k/v, gate/up) share one accumulator: X^T X is computed and added once
    per batch for them (its upper block triangle only), and they get the same H object (gptq_quantize never
    modifies its Hessian) and factorisation. Sums are mirrored and normalised once, when apply() first reads
    self.H."""

    name = "gptq"

    def __init__(self, step):
        self.step = step
        self.skip = list(step.skip)
        self.count: dict[str, int] = {}  # tokens seen, per accumulator owner
        self._sum: dict[str, torch.Tensor] = {}  # owner -> sum of X^T X
        self._owner: dict[str, str] = {}  # linear -> the linear whose accumulator it shares
        self._final: dict[str, torch.Tensor] | None = None
        self._last = None
        self._added: list[str] = []  # owners whose accumulator already holds the current input tensor

    @property
    def H(self) -> dict[str, torch.Tensor]:
        """Per linear, H = 2/n X^T X of its calibration inputs so far (a dict the caller may pop from)."""
        if self._final is None:
            for owner, acc in self._sum.items():
                _mirror_upper(acc).mul_(2.0 / self.count[owner])
            self._final = {name: self._sum[owner] for name, owner in self._owner.items() if owner in self._sum}
            self._sum, self._owner = {}, {}
        return self._final

    @H.setter
    def H(self, value: dict) -> None:
        self._final = value

    def observe(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self._final is not None:  # a new layer: the previous one's Hessians were handed out
            self._final, self.count = None, {}
        m = x.numel() // x.shape[-1]
        if m == 0:
            return
        if x is not self._last:
            self._last, self._added = x, []
        # first batch: share the accumulator of the linear that got this very tensor just before
        owner = self._owner.setdefault(name, self._added[0] if self._added else name)
        if owner != name and owner not in self._added:
            # fed a different tensor than its owner (never seen in transformers layers): from now on, alone
            owner = self._owner[name] = name
        if owner not in self._added:
            f = x.reshape(-1, x.shape[-1]).float()
            acc = self._sum.get(owner)
            if acc is None:
                acc = self._sum[owner] = f.new_zeros(f.shape[1], f.shape[1])
            _add_gram_upper(acc, f)
            self.count[owner] = self.count.get(owner, 0) + m
            self._added.append(owner)

    def nbytes(self) -> int:
        held = [*self._sum.values(), *(self._final or {}).values()]
        return tensor_bytes(h for h in held if h is not None)

    def apply(self, ctx: LayerContext) -> list[dict]:
        s = self.step
        self._last = None
        records, factors = [], {}  # linears sharing one H (q/k/v, gate/up) share its factorisation
        for name, module in ctx.linears.items():
            linear = as_linear(module)
            H = self.H.pop(name, None)
            self.count.pop(name, None)
            with torch.no_grad():
                if H is None:
                    qw = quantize_rtn(linear.weight, s.bits, s.group_size, s.symmetric)
                    info = {**_NO_INFO, "warning": "no calibration tokens reached this layer: fell back to RTN"}
                else:
                    # a layer a pruning step emptied (>= 25 % exact zeros) keeps its zeros
                    keep = float((linear.weight == 0).float().mean()) >= PRUNED_FRACTION
                    qw, info = gptq_quantize(linear.weight, H, s.bits, s.group_size, s.symmetric,
                                             damp=getattr(s, "damp", 0.01), block_size=getattr(s, "block_size", 128),
                                             act_order=getattr(s, "act_order", False),
                                             static_groups=getattr(s, "static_groups", False), keep_zeros=keep,
                                             factors=factors)
            del H
            left = {id(h) for h in self.H.values()}  # free a shared H's factor once its last linear is done
            for key in [k for k, (h, _) in factors.items() if id(h) not in left]:
                del factors[key]
            rec = replace_with_quantized(ctx.model, name, linear, qw)
            rec.update(method="gptq", **info)
            records.append(rec)
        return records


def quantize_model_gptq(model: nn.Module, step, windows: torch.Tensor, device="cpu",
                        progress: Progress | None = None) -> list[dict]:
    """GPTQ every float linear of the decoder layers not matched by step.skip, calibrated on `windows`
    ([n, window_len] token ids). Float nn.Linear layers outside the decoder layers (not skipped) get RTN, with a
    warning in their record. Returns a core.calibrate.CalibrationRecords: a list of per-layer records whose
    `.stats` holds the calibration pass's seconds and peak memory."""
    return quantize_weights_calibrated(model, step, windows, lambda: GPTQObserver(step), "GPTQ", device, progress)


def quantize_weights_calibrated(model: nn.Module, step, windows: torch.Tensor, observer, method: str,
                                device="cpu", progress: Progress | None = None) -> CalibrationRecords:
    """The driver shared by the calibrated weight-only methods (GPTQ, AWQ): run observer() (built once the
    model has been checked) through the calibration pass; float linears outside the decoder layers get RTN in
    the same format, with a warning; tied weights are untied so the other owner (the embedding) stays float."""
    prefix, layers = find_decoder_layers(model)
    inside = [n for i, layer in enumerate(layers) for n in calibration_targets(layer, f"{prefix}.{i}", step.skip)]
    outside = [(n, m) for n, m in find_linears(model, step.skip) if not n.startswith(prefix + ".")]
    if not inside and not outside:
        raise UnsupportedError(f"{method} found no floating-point linear layers to quantize (skip={step.skip}).")
    tied = shared_weight_names(model, inside + [n for n, _ in outside])
    records, stats = run_calibrated(model, windows, observer(), device, progress)
    for name, linear in outside:
        with torch.no_grad():
            qw = quantize_rtn(linear.weight, step.bits, step.group_size, step.symmetric)
        rec = replace_with_quantized(model, name, linear, qw)
        rec.update(_NO_INFO, method="rtn", warning="outside the decoder layers (no calibrated inputs): RTN")
        records.append(rec)
    if tied:
        _untie(model, tied)
    return CalibrationRecords(records, stats)
