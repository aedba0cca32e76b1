"""Pruning masks as pure functions on tensors: scores, unstructured and N:M masks, OWL layer ratios.

Conventions (every function here):
- A mask is a bool tensor shaped like the weight [out, in], True = the weight is KEPT.
- Scores: higher = more important. Magnitude: |W|. Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, the
  norm of input feature j over the calibration tokens.
- Unstructured masks prune an exact count in each comparison group: round(sparsity * group size) weights with
  the lowest scores ("row": per output row, Wanda's group; "layer": the whole matrix, the classic magnitude
  baseline of the Wanda/SparseGPT papers). Ties are broken by position (stable), never by dropping the count.
- N:M (NVIDIA's convention, as in "2:4"): N weights KEPT in every M consecutive input columns of a row, so
  sparsity = 1 - N/M. The pattern is exact in every group; in_features must be a multiple of M.
"""
from __future__ import annotations

import re

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' (e.g. '2:4') -> (N, M) with 0 < N < M <= 256."""
    p = pattern.strip().lower()
    if p == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", p)
    if not m:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm <= 256:
        raise ValueError(f"N:M pattern needs 0 < N < M <= 256 (N kept out of every M), got {pattern!r}")
    return n, mm


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, feature_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2; feature_norm [in] (any positive multiple of it gives the same per-row masks)."""
    return weight.detach().abs().float() * feature_norm.to(weight.device, torch.float32).view(1, -1)


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 2-D score tensor with exactly k entries pruned per row (the k lowest)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Keep-mask pruning round(sparsity * group size) lowest-score entries in each group ("row" or "layer")."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scores.dim() != 2:
        raise ValueError(f"expected 2-D scores, got shape {tuple(scores.shape)}")
    if group == "row":
        return _prune_lowest(scores, round(sparsity * scores.shape[1]))
    if group == "layer":
        return _prune_lowest(scores.reshape(1, -1), round(sparsity * scores.numel())).view_as(scores)
    raise ValueError(f"group must be 'row' or 'layer', got {group!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly n kept (the n highest scores) in every m consecutive columns of each row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_f}")
    g = scores.reshape(out_f, in_f // m, m)
    idx = torch.sort(g, dim=2, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return keep.view(out_f, in_f)


def make_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured", group: str = "row"):
    nm = parse_pattern(pattern)
    return unstructured_mask(scores, sparsity, group) if nm is None else nm_mask(scores, *nm)


def pattern_sparsity(pattern: str, sparsity: float) -> float:
    """The sparsity a pattern really gives (N:M fixes it at 1 - N/M)."""
    nm = parse_pattern(pattern)
    return sparsity if nm is None else 1 - nm[0] / nm[1]


# ---- OWL: outlier-weighed layerwise sparsity (Yin et al. 2023) ---------------------------------------------

def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """Layerwise outlier distribution (LOD) of one decoder layer: the fraction of its Wanda scores (all its
    linears together) greater than m times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return (flat > m * flat.mean()).float().mean().item()


def owl_ratios(outliers: list[float], target: float, lam: float = 0.08, weights: list[float] | None = None,
               ) -> list[float]:
    """Per-layer sparsities from outlier ratios, as the OWL reference (`prune_wanda_outlier`): the ratios are
    rescaled linearly onto a range of width 2*lam, layers with more outliers getting LOWER sparsity, then
    shifted so the mean sparsity weighted by `weights` (parameter counts; equal if None) equals `target`
    exactly. Values are kept in [0, 1] (clipping re-centres the others, so the weighted mean stays exact)."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target sparsity must be in [0, 1], got {target}")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    o = torch.tensor(outliers, dtype=torch.float64)
    w = torch.ones_like(o) if weights is None else torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    span = (o.max() - o.min()).item()
    dev = -(o - o.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(o)  # more outliers -> less sparse
    s = target + dev - (w * dev).sum()
    for _ in range(100):  # clip to [0, 1], spreading what clipping removed over the layers still free
        s = s.clamp(0.0, 1.0)
        gap = target - (w * s).sum().item()
        if abs(gap) < 1e-12:
            break
        free = (s < 1.0) if gap > 0 else (s > 0.0)
        if not free.any():
            break
        s = s + free.double() * gap / (w * free.double()).sum()
    return s.tolist()

