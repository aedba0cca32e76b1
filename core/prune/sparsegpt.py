"""SparseGPT (Frantar & Alistarh 2023; follows IST-DASLab/sparsegpt `fasterprune`), pure math.

Columns are processed left to right in blocks; within a block, each pruned weight's error is spread onto the
columns not yet processed through the upper Cholesky factor of H^-1 (H = 2/n X^T X, the same Hessian GPTQ
uses), so the layer's outputs stay close. Mask selection uses the OBS saliency w^2 / [chol(H^-1)]_jj^2:
per block of `block_size` columns over all rows (unstructured; the block's quota is exact, so the layer's
total is exactly round(sparsity * numel)), or per M consecutive columns of a row (N:M, chosen when the
group's first column is reached, from the weights updated so far).
"""
from __future__ import annotations

import torch

from ..quant.gptq import _inverse_cholesky, _output_error
from .masks import magnitude_scores, make_mask, parse_pattern


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    pattern: str = "unstructured", block_size: int = 128, damp: float = 0.01,
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune weight [out, in] given the Hessian [in, in] of its inputs.

    Returns (new weight in weight's dtype with zeros where pruned, keep-mask [out, in] bool, info) where info has
    damp (relative damping used; None on fallback), warning (str or None), out_rel_error (relative output error
    ||X (W - W')^T|| / ||X W^T|| on the calibration inputs, from the undamped H). Falls back to magnitude
    pruning (with a warning) when H carries no signal or is not positive definite even with raised damping.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.device.type != "cpu":
        return _sparsegpt(weight, hessian, sparsity, pattern, block_size, damp)
    threads = torch.get_num_threads()  # the column loop is many small ops: 1 thread is faster (see gptq.py)
    torch.set_num_threads(1)
    try:
        return _sparsegpt(weight, hessian, sparsity, pattern, block_size, damp)
    finally:
        torch.set_num_threads(threads)


def _fallback(W0, sparsity, pattern, info, warning, H0=None):
    keep = make_mask(magnitude_scores(W0), sparsity, pattern, "layer")
    W = W0 * keep
    info.update(warning=warning, damp=None)
    if H0 is not None and torch.isfinite(H0).all():
        info["out_rel_error"] = _output_error(W0, W, H0)
    return W, keep, info


def _sparsegpt(weight, hessian, sparsity, pattern, block_size, damp):
    nm = parse_pattern(pattern)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    W0 = weight.detach().float()
    out_f, n = W0.shape
    if nm is not None and n % nm[1]:
        raise ValueError(f"{pattern} sparsity needs in_features divisible by {nm[1]}, got {n}")
    H0 = hessian.detach().to(device=W0.device, dtype=torch.float32)
    info = {"damp": None, "warning": None, "out_rel_error": None}
    if not torch.isfinite(H0).all() or not (H0.diagonal() > 0).any():
        W, keep, info = _fallback(W0, sparsity, pattern, info, "no calibration signal reached this layer "
                                  "(Hessian all zero or not finite): fell back to magnitude pruning")
        return W.to(weight.dtype), keep, info

    H, W = H0.clone(), W0.clone(memory_format=torch.contiguous_format)  # (a Conv1D's weight is a transposed view)
    dead = H.diagonal() == 0  # inputs always zero: pruning their weights costs nothing, so they go first
    H[dead, dead] = 1
    Hinv, used = _inverse_cholesky(H, damp)
    del H
    if Hinv is None:
        W, keep, info = _fallback(W0, sparsity, pattern, info, f"Hessian not positive definite even with "
                                  f"damp={used:g}: fell back to magnitude pruning", H0)
        return W.to(weight.dtype), keep, info
    info["damp"] = used
    if used != damp:
        info["warning"] = f"Hessian not positive definite with damp={damp:g}: raised damping to {used:g}"

    if nm is not None:
        n_keep, m = nm
        block_size = -(-block_size // m) * m  # N:M groups never straddle blocks
    keep = torch.ones(out_f, n, dtype=torch.bool, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        Err1 = torch.zeros_like(W1)
        prune1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
        dead1 = dead[i1:i2]
        if nm is None:
            k = round(sparsity * out_f * i2) - round(sparsity * out_f * i1)
            if k:
                score = W1**2 / d.view(1, -1) ** 2
                score[:, dead1] = -1
                idx = torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices
                prune1.view(-1)[idx] = True
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                score = W1[:, i:i + m] ** 2 / d[i:i + m].view(1, -1) ** 2
                score[:, dead1[i:i + m]] = -1
                idx = torch.topk(score, m - n_keep, dim=1, largest=False).indices
                prune1[:, i:i + m].scatter_(1, idx, True)
            w = W1[:, i]
            q = torch.where(prune1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exactly zero where pruned (the update leaves rounding residue)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    info["out_rel_error"] = _output_error(W0, W, H0)
    return W.to(weight.dtype), keep, info
