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
from dataclasses import dataclass

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
    dequantize,
    effective_group_size,
    quantize_codes,
    quantize_rtn,
)

PRUNED_FRACTION = 0.25  # layers with at least this fraction of exact zeros were pruned: GPTQ keeps them zero
DAMP_TRIES = 5  # damp, 10x, 100x, ... before giving up on a Hessian
_NO_INFO = {"damp": None, "warning": None, "out_rel_error": None, "rtn_out_rel_error": None}


def _all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all(), faster: a finite sum means no inf / nan (only an overflowing sum needs the check)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _lower_triangular_inverse(L: torch.Tensor, base: int = 128) -> torch.Tensor:
    """L^-1 for lower-triangular L, by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]], the
    off-diagonal block from two triangular solves. ~n^3/3 flops like LAPACK's trtri (which torch does not
    expose), vs n^3 for solving against the identity."""
    n = L.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    out[:h, :h] = _lower_triangular_inverse(L[:h, :h], base)
    out[h:, h:] = _lower_triangular_inverse(L[h:, h:], base)
    b_ainv = torch.linalg.solve_triangular(L[:h, :h], L[h:, :h], upper=False, left=False)
    out[h:, :h] = torch.linalg.solve_triangular(L[h:, h:], b_ainv, upper=False).neg_()
    return out


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = that inverse), raising damp 10x per
    failed try. One Cholesky factorisation and one triangular inverse: with J the reversal permutation and
    J (H + d I) J = L L^T, U = J L^-1 J (upper triangular with a positive diagonal: the Cholesky factor)."""
    mean = H.diagonal().mean()
    for k in range(DAMP_TRIES):
        d = damp * 10**k
        reversed_h = H.flip(0, 1)
        reversed_h.diagonal().add_(d * mean)
        L, bad = torch.linalg.cholesky_ex(reversed_h)
        if bad.item() == 0:
            U = _lower_triangular_inverse(L).flip(0, 1)
            if _all_finite(U):
                return U, d
    return None, d


def _output_error(weight: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, den: float | None = None) -> float:
    """||X (W - W_hat)^T|| / ||X W^T|| on the calibration inputs, from H alone. den: ||X W^T||^2 when known."""
    d = weight - w_hat
    num = ((d @ H) * d).sum().item()
    if den is None:
        den = ((weight @ H) * weight).sum().item()
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


def error_feedback(W: torch.Tensor, Hinv: torch.Tensor, round_column, block_size: int = 128) -> torch.Tensor:
    """GPTQ's column loop, for any rounding: columns of W [out, n] (float32) are rounded in order by
    round_column(col, w [out], upcoming, out), which writes w - (w rounded) into out [out], and each column's
    error is spread onto the columns not yet rounded through Hinv (upper Cholesky factor of H^-1), lazily per
    block. upcoming(k) gives the next k columns' current (error-updated) values [out, k], from col on. Works on
    a transposed copy, so each column and each rank-1 update is contiguous in memory (W itself is unchanged).

    Returns ||E||^2 per row [out], E the scaled errors (w - rounded) / Hinv[i, i]: as W - rounded = E Hinv and
    Hinv H Hinv^T = I, that is the row's output error on H, tr(D H D^T) with D = W - rounded (H damped)."""
    n = W.shape[1]
    WT = W.t().contiguous()
    err_sq = W.new_zeros(W.shape[0])
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = WT[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        diag = Hinv1.diagonal()[:, None]
        spread = Hinv1 / diag  # row i / Hinv[i, i]: the unscaled error w - rounded spreads as E[i] * Hinv[i]
        for i in range(i2 - i1):
            w, err = W1[i], Err1[i]
            upcoming = lambda k, i=i, W1=W1, i2=i2: (
                W1[i:i + k] if i + k <= len(W1) else torch.cat([W1[i:], WT[i2:i2 + k - (len(W1) - i)]])).t()
            round_column(i1 + i, w, upcoming, err)
            W1[i:].addr_(spread[i, i:], err, alpha=-1)
        Err1.div_(diag)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
        err_sq += Err1.square().sum(0)
    return err_sq


def group_of_t(cols: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group index of each (original) column index."""
    return cols.div(group_size, rounding_mode="floor")


@dataclass
class _Factor:
    """What GPTQ needs of a Hessian H0; depends on H0 alone, so linears sharing one H0 (q/k/v) share it."""
    Hinv: torch.Tensor | None  # upper Cholesky factor of the damped H^-1, columns in processing order (None: RTN)
    perm: torch.Tensor | None  # processing order (by decreasing diag H with act_order), None: the natural one
    shift: torch.Tensor | None  # per column (original order), what was added to diag H0: damping (+1 if dead)
    info: dict  # damp, warning


def _factor(H0: torch.Tensor, damp: float, act_order: bool) -> _Factor:
    """Hinv is None when H carries no signal or stays indefinite (info["warning"] says so: use RTN)."""
    info = {"damp": None, "warning": None}
    if not _all_finite(H0) or not (H0.diagonal() > 0).any():
        info["warning"] = "no calibration signal reached this layer (Hessian all zero or not finite): fell back to RTN"
        return _Factor(None, None, None, info)
    H = H0.clone()
    dead = H.diagonal() == 0
    # The reference zeroes dead columns; keeping them (rounded like RTN, spreading no error: their row of H
    # is decoupled) is as good on the calibration data and stays right for inputs it never saw.
    H[dead, dead] = 1
    mean = H.diagonal().mean()
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    Hinv, used = _inverse_cholesky(H, damp)
    if Hinv is None:
        info["warning"] = f"Hessian not positive definite even with damp={used:g}: fell back to RTN"
        return _Factor(None, None, None, info)
    info["damp"] = used
    if used != damp:
        info["warning"] = f"Hessian not positive definite with damp={damp:g}: raised damping to {used:g}"
    return _Factor(Hinv, perm, dead.float() + used * mean, info)


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
        f = _factor(H0, damp, act_order)
        info.update(f.info)
        if f.Hinv is None:
            return rtn, info
        Hinv, perm = f.Hinv, f.perm
        W = W0[:, perm] if perm is not None else W0
        outT = torch.empty(W.shape[1], W.shape[0], device=W.device)

        def round_column(col, w, upcoming, out):
            outT[col] = round_values(w[:, None])[:, 0]
            torch.sub(w, outT[col], out=out)

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
                  static_groups: bool = False, keep_zeros: bool = False) -> tuple[QuantizedWeight, dict]:
    """Quantize weight [out, in] given the Hessian [in, in] of its inputs.

    info: damp (the relative damping finally used, None on RTN fallback), warning (str or None),
    out_rel_error / rtn_out_rel_error (relative output error on the calibration inputs, GPTQ vs RTN).
    Group parameters are computed up front on the un-permuted weight ("static groups") whenever
    act_order is on (or static_groups, or per-channel), otherwise when each group's first column is reached.
    keep_zeros: weights that are exactly zero (pruned) are quantized to exactly zero and their error is spread
    like any other column's, so a pruned model stays pruned (prune -> quantize chains).
    """
    (qw, info, _), = gptq_quantize_group([weight], hessian, bits, group_size, symmetric, damp, block_size,
                                         act_order, static_groups, [keep_zeros])
    return qw, info


def gptq_quantize_group(weights: list[torch.Tensor], hessian: torch.Tensor, bits: int, group_size: int | None = None,
                        symmetric: bool = True, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                        static_groups: bool = False, keep_zeros: list[bool] | None = None
                        ) -> list[tuple[QuantizedWeight, dict, torch.Tensor]]:
    """gptq_quantize for weights [out_k, in] that share one Hessian (q/k/v, gate/up): H is factored once and one
    column loop runs over their rows stacked. Each row's result depends only on that row and H, so it is the
    same as quantizing each weight alone, in fewer, larger steps. keep_zeros: per weight.
    -> per weight (quantized weight, info, its dequantized float32 weight)."""
    for w in weights:
        if w.dim() != 2 or w.shape[1] != weights[0].shape[1]:
            raise ValueError(f"expected 2-D weights with {weights[0].shape[-1]} columns, got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    with _one_thread(weights[0].device):
        return _gptq(weights, hessian, bits, group_size, symmetric, damp, block_size, act_order, static_groups,
                     keep_zeros or [False] * len(weights))


def _gptq(weights, hessian, bits, group_size, symmetric, damp, block_size, act_order, static_groups, keep_zeros):
    W0 = torch.cat([w.detach().float() for w in weights])
    rows, n = W0.shape
    sizes = [w.shape[0] for w in weights]
    H0 = hessian.detach().to(device=W0.device, dtype=torch.float32)
    gs = effective_group_size(n, group_size)
    rtn_scales, rtn_zeros = compute_qparams(W0, bits, gs, symmetric)
    rtn_codes = quantize_codes(W0, rtn_scales, rtn_zeros, bits, gs)
    f = _factor(H0, damp, act_order)
    if f.Hinv is None:
        return _split(rtn_codes, rtn_scales, rtn_zeros, sizes, bits, gs, symmetric, [{**_NO_INFO, **f.info}] * len(sizes))
    Hinv, perm = f.Hinv, f.perm
    W = W0[:, perm] if perm is not None else W0
    static = act_order or static_groups or gs == n
    n_groups = -(-n // gs)
    if static:
        scales, zeros = rtn_scales, rtn_zeros
    else:
        scales = torch.empty(rows, n_groups, dtype=torch.float16, device=W.device)
        zeros = None if symmetric else torch.empty(rows, n_groups, dtype=torch.uint8, device=W.device)

    # per-column grid in processing order, float32. The loop keeps codes centred on the zero point (code - zero:
    # exact small integers, the same rounding and clamping), so a column's rounding error is one addcmul.
    codes = torch.empty(n, rows, device=W.device)
    maxq, mid = 2**bits - 1, float(2 ** (bits - 1))
    col_scale = col_zero = None
    if static:
        order = perm if perm is not None else torch.arange(n, device=W.device)
        col_scale = scales.float().t()[group_of_t(order, gs)].contiguous()
        col_zero = None if zeros is None else zeros.float().t()[group_of_t(order, gs)].contiguous()
    cur = {}
    pruned = None  # in processing order, like W
    if any(keep_zeros):
        keep = torch.cat([torch.full((k,), bool(z), device=W.device) for k, z in zip(sizes, keep_zeros)])
        pruned = ((W == 0) & keep[:, None]).t().contiguous()

    def round_column(col, w, upcoming, out):
        if static:
            s = col_scale[col]
            lo, hi = (-mid, maxq - mid) if col_zero is None else (-col_zero[col], maxq - col_zero[col])
        else:
            if col % gs == 0:  # from the current (error-updated) values, also when a group starts mid-block
                block = upcoming(gs)
                sg, zg = compute_qparams(block, bits, block.shape[1], symmetric)
                g = col // gs
                scales[:, g:g + 1] = sg
                if zeros is not None:
                    zeros[:, g:g + 1] = zg
                z = mid if zg is None else zg.float()[:, 0]
                cur.update(s=sg.float()[:, 0], lo=-z, hi=maxq - z)
            s, lo, hi = cur["s"], cur["lo"], cur["hi"]
        q = codes[col]
        torch.div(w, s, out=q).round_().clamp_(lo, hi)
        if pruned is not None:  # the code of 0.0: the zero point (0 is always on the grid)
            q.masked_fill_(pruned[col], 0)
        torch.addcmul(w, q, s, value=-1, out=out)

    err_sq = error_feedback(W, Hinv, round_column, block_size)
    codes = codes.t()
    if zeros is None:
        codes = codes + mid
    elif static:
        codes = codes + col_zero.t()
    else:
        codes = codes + zeros.float().repeat_interleave(gs, dim=1)[:, :n]  # natural column order here
    codes = codes.to(torch.uint8)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]

    # Relative output errors on the calibration inputs, ||X (W - W_hat)^T|| / ||X W^T||, per weight. GPTQ's
    # numerator from the loop's errors (error_feedback: tr(D (H0 + diag shift) D^T) per row, less the shift's
    # part), so only the denominator and RTN's need a product with H0 (one, stacked).
    w_hat = dequantize(codes, scales, zeros, bits, gs)
    d = W0 - w_hat
    num = err_sq - d.square() @ f.shift
    r = W0 - dequantize(rtn_codes, rtn_scales, rtn_zeros, bits, gs)
    both = torch.cat([W0, r])
    den, rtn_num = ((both @ H0) * both).sum(1).split(rows)
    infos = []
    for a, b, c in zip(num.split(sizes), den.split(sizes), rtn_num.split(sizes)):
        den_k = b.sum().item()
        infos.append({**_NO_INFO, **f.info, "out_rel_error": _rel_sqrt(a.sum().item(), den_k),
                      "rtn_out_rel_error": _rel_sqrt(c.sum().item(), den_k)})
    return _split(codes, scales, zeros, sizes, bits, gs, symmetric, infos, w_hat)


def _rel_sqrt(num: float, den: float) -> float:
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


def _split(codes, scales, zeros, sizes, bits, gs, symmetric, infos, w_hat=None):
    """Stacked codes [rows, n] / scales / zeros -> per weight (QuantizedWeight, info, dequantized weight)."""
    n = codes.shape[1]
    if w_hat is None:
        w_hat = dequantize(codes, scales, zeros, bits, gs)
    packed = pack_bits(codes, bits)
    out, start = [], 0
    for k, info in zip(sizes, infos):
        rows = slice(start, start + k)
        qw = QuantizedWeight(packed[rows].clone(), (k, n), bits, gs, symmetric, scales[rows].clone(),
                             None if zeros is None else zeros[rows].clone())
        out.append((qw, dict(info), w_hat[rows]))
        start += k
    return out


def _gram_edges(d: int) -> list[int]:
    nb = max(1, min(8, d // 96))
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
    modifies its Hessian), quantized together by gptq_quantize_group. Sums are mirrored and normalised once,
    when apply() first reads self.H. Supports the one-forward mode (sequential: each group is quantized as soon
    as its input has been seen, so later linears of the layer see the quantized earlier ones)."""

    name = "gptq"
    sequential = True

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
        groups: dict[int, list[str]] = {}  # linears sharing one H object (q/k/v, gate/up): one gptq_quantize_group
        for name in ctx.linears:
            H = self.H.get(name)
            groups.setdefault(id(name) if H is None else id(H), []).append(name)
        records = {}
        for names in groups.values():
            linears = [as_linear(ctx.linears[n]) for n in names]
            H = self.H.pop(names[0], None)
            for n in names:
                self.H.pop(n, None)
                self.count.pop(n, None)
            with torch.no_grad():
                if H is None:
                    (linear,) = linears
                    qw = quantize_rtn(linear.weight, s.bits, s.group_size, s.symmetric)
                    results = [(qw, {**_NO_INFO, "warning": "no calibration tokens reached this layer: fell back to RTN"},
                                None)]
                else:
                    # a layer a pruning step emptied (>= 25 % exact zeros) keeps its zeros
                    keep = [m.weight.numel() - int(torch.count_nonzero(m.weight)) >= PRUNED_FRACTION * m.weight.numel()
                            for m in linears]
                    results = gptq_quantize_group([m.weight for m in linears], H, s.bits, s.group_size, s.symmetric,
                                                  damp=getattr(s, "damp", 0.01),
                                                  block_size=getattr(s, "block_size", 128),
                                                  act_order=getattr(s, "act_order", False),
                                                  static_groups=getattr(s, "static_groups", False), keep_zeros=keep)
            del H
            for name, linear, (qw, info, w_hat) in zip(names, linears, results):
                records[name] = replace_with_quantized(ctx.model, name, linear, qw, w_hat)
                records[name].update(method="gptq", **info)
        return [records[n] for n in ctx.linears]


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
