"""Rotary embedding of q and k and the KV-cache write, for the merged q/k/v projection (core.merge), as one kernel.

transformers applies the rotary embedding as q * cos + rotate_half(q) * sin (rotate_half(x) = cat(-x2, x1) of x's
two halves) for q and for k, then the cache writes k and v: about a dozen small kernels per decoder layer in an
uncompiled decode step, three after torch.compile (benchmarks/RESULTS.md). Here one program per (token, block of
HB heads) reads the stacked projection output [B, S, (H + 2 HK) D] (q heads, then k heads, then v heads), and
writes rotated q to q_out [B, S, H, D], rotated k and v to the caches [B, HK, L, D] at position pos[s]. Each
product and the sum are rounded to the input dtype as PyTorch's eager ops round them, so the outputs equal
transformers' bit for bit (tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import pdl_launch_dependents, pdl_wait

HEADS_PER_PROGRAM = 8
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _mul(a, b, USE_ASM: tl.constexpr):
    """a * b in float32, as an explicitly rounded PTX mul: the compiler may not contract it with the following add
    into an FMA (which rounds once where PyTorch's separate kernels round twice)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return a * b


@triton.jit
def _rope_cache_kernel(x_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, S, H, HK,
                       sx_b, sx_s, sc_b, sc_s, ss_b, ss_s, sq_b, sq_s, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                       D: tl.constexpr, HB: tl.constexpr, USE_ASM: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)  # PDL: see core.kernels.pdl
    pdl_launch_dependents(PDL, 1)
    t = tl.program_id(0)
    b = t // S
    s = t % S
    hh = tl.program_id(1) * HB + tl.arange(0, HB)
    dd = tl.arange(0, D)
    partner = (dd + D // 2) % D
    live = (hh < H + 2 * HK)[:, None]
    row = x_ptr + b * sx_b + s * sx_s + hh[:, None] * D
    x = tl.load(row + dd[None, :], mask=live, other=0.0)
    xp = tl.load(row + partner[None, :], mask=live, other=0.0)
    xp = tl.where((dd < D // 2)[None, :], -xp, xp)  # rotate_half(x)
    c = tl.load(cos_ptr + b * sc_b + s * sc_s + dd)[None, :]
    sn = tl.load(sin_ptr + b * ss_b + s * ss_s + dd)[None, :]
    pdl_launch_dependents(PDL, 2)
    dt = x.dtype
    y = (_mul(x.to(tl.float32), c.to(tl.float32), USE_ASM).to(dt).to(tl.float32)
         + _mul(xp.to(tl.float32), sn.to(tl.float32), USE_ASM).to(dt).to(tl.float32)).to(dt)
    pos = tl.load(pos_ptr + s)
    tl.store(q_ptr + b * sq_b + s * sq_s + hh[:, None] * D + dd[None, :], y, mask=(hh < H)[:, None])
    kh = hh - H
    tl.store(k_ptr + b * sk_b + kh[:, None] * sk_h + pos * sk_l + dd[None, :], y,
             mask=((hh >= H) & (hh < H + HK))[:, None])
    vh = hh - H - HK
    tl.store(v_ptr + b * sv_b + vh[:, None] * sv_h + pos * sv_l + dd[None, :], x,
             mask=((hh >= H + HK) & (hh < H + 2 * HK))[:, None])


def supported(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> bool:
    """qkv [B, S, (heads + 2 kv_heads) head_dim] with unit stride over its last dim, cos / sin [B or 1, S, head_dim]
    (the full head rotated), caches [B, kv_heads, L, head_dim] of qkv's dtype, head_dim an even power of two."""
    b, s = qkv.shape[:2] if qkv.dim() == 3 else (0, 0)
    return (qkv.dim() == 3 and qkv.shape[2] == (heads + 2 * kv_heads) * head_dim and qkv.stride(2) == 1
            and qkv.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 2 <= head_dim <= 512 and head_dim & (head_dim - 1) == 0
            and all(t.dim() == 3 and t.shape[0] in (1, b) and t.shape[1:] == (s, head_dim) and t.stride(2) == 1
                    for t in (cos, sin))
            and all(c.shape == (b, kv_heads, c.shape[2], head_dim) and c.dtype == qkv.dtype and c.stride(3) == 1
                    for c in (k_cache, v_cache)))


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Rotated q as [B, heads, S, D] (a transposed view, as transformers' attention gets it); k rotated and v
    written into k_cache / v_cache at positions pos [S]. See the module docstring."""
    head_dim = k_cache.shape[-1]
    if not supported(qkv, cos, sin, k_cache, v_cache, heads, kv_heads, head_dim) or pos.shape != qkv.shape[1:2]:
        raise ValueError(f"rope_to_cache takes qkv [B, S, (H + 2 HK) D], cos / sin [B, S, D], pos [S] and caches "
                         f"[B, HK, L, D]; got {tuple(qkv.shape)}, {tuple(cos.shape)}, {tuple(pos.shape)}, "
                         f"{tuple(k_cache.shape)}, heads {heads} / {kv_heads}")
    b, s, _ = qkv.shape
    q = torch.empty(b, s, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    hb = HEADS_PER_PROGRAM
    cb = [0 if t.shape[0] == 1 else t.stride(0) for t in (cos, sin)]
    grid = (b * s, triton.cdiv(heads + 2 * kv_heads, hb))
    mode = pdl.mode(qkv.device, grid[0] * grid[1])
    _rope_cache_kernel[grid](qkv, cos, sin, pos, q, k_cache, v_cache, s, heads, kv_heads,
                             qkv.stride(0), qkv.stride(1), cb[0], cos.stride(1), cb[1], sin.stride(1),
                             q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                             D=head_dim, HB=hb, USE_ASM=not INTERPRET, PDL=mode,
                             num_warps=4 if head_dim * hb >= 1024 else 1, **pdl.launch(mode))
    return q.transpose(1, 2)
