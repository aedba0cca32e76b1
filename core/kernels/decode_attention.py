"""Attention for a one-token query over a static KV cache with grouped KV heads (the decode step), split over the
cache length (flash-decoding):

    out[b, h, r] = softmax(scale * q[b, h, r] . K[b, h, :]^T + mask[b, :]) @ V[b, h, :]

q [B, HK, R, D] holds the R = n_rep query heads that share KV head h (what core.measure.decode's grouped_decode_sdpa
passes), K / V [B, HK, L, D] are the cache buffers, mask [1 or B, 1, 1, >= L] is additive (0 or a large negative
for slots not written yet). Program (b * HK + h, s) reads keys [s * CHUNK, (s + 1) * CHUNK) in blocks of BL with
an online softmax; with one split it writes the output, else its float32 (max, sum, weighted values) go to a
second kernel that combines the splits. The R query rows are padded to 16 so both products run on tensor cores.
Why: on an H100, cuDNN's SDPA took 8.7 us per layer for this shape (plus 1.4 us preparing it), a few per cent of a
4-bit decode step (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import pdl_launch_dependents, pdl_wait


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_ptr, stat_ptr, HK, L, R, scale,
                        sq_b, sq_h, sq_r, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, so_b, so_h, so_r,
                        CHUNK: tl.constexpr, SPLITS: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
                        BL: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    rr = tl.arange(0, RP)
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rr[:, None] * sq_r + dd[None, :], mask=(rr < R)[:, None], other=0.0)
    m_i = tl.full([RP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([RP], dtype=tl.float32)
    acc = tl.zeros([RP, D], dtype=tl.float32)
    kb = k_ptr + b * sk_b + h * sk_h
    vb = v_ptr + b * sv_b + h * sv_h
    for l0 in range(s * CHUNK, tl.minimum(s * CHUNK + CHUNK, L), BL):
        ll = l0 + tl.arange(0, BL)
        ok = ll < L
        k = tl.load(kb + ll[:, None] * sk_l + dd[None, :], mask=ok[:, None], other=0.0)
        # -1e30 at most: a block whose slots are all masked must not give exp(-inf - -inf)
        add = tl.load(m_ptr + b * sm_b + ll, mask=ok, other=0.0).to(tl.float32)
        add = tl.where(ok, tl.maximum(add, -1e30), -1e30)
        # .to: torch.compile passes scale as float64
        sc = (tl.dot(q, tl.trans(k), input_precision=PREC) * scale).to(tl.float32) + add[None, :]
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vb + ll[:, None] * sv_l + dd[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    pdl_launch_dependents(PDL, 2)
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + rr[:, None] * so_r + dd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(rr < R)[:, None])
    else:  # partials [B HK, SPLITS, RP, D] and stats [B HK, SPLITS, 2, RP]
        base = bh * SPLITS + s
        tl.store(part_ptr + base * RP * D + rr[:, None] * D + dd[None, :], acc)
        tl.store(stat_ptr + base * 2 * RP + rr, m_i)
        tl.store(stat_ptr + base * 2 * RP + RP + rr, l_i)


@triton.jit
def _combine_kernel(part_ptr, stat_ptr, o_ptr, HK, R, so_b, so_h, so_r,
                    SPLITS: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M = max_s m_s (a split of masked slots only has
    m_s far below M and weighs nothing)."""
    pdl_wait(PDL)
    bh = tl.program_id(0)
    rr = tl.arange(0, RP)
    dd = tl.arange(0, D)
    big = tl.full([RP], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        big = tl.maximum(big, tl.load(stat_ptr + (bh * SPLITS + s) * 2 * RP + rr))
    num = tl.zeros([RP, D], dtype=tl.float32)
    den = tl.zeros([RP], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        base = bh * SPLITS + s
        w = tl.exp(tl.load(stat_ptr + base * 2 * RP + rr) - big)
        den += w * tl.load(stat_ptr + base * 2 * RP + RP + rr)
        num += w[:, None] * tl.load(part_ptr + base * RP * D + rr[:, None] * D + dd[None, :])
    b = bh // HK
    h = bh % HK
    out = num / den[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + rr[:, None] * so_r + dd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rr < R)[:, None])


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> bool:
    """q [B, HK, R, D], K/V [B, HK, L, D] of one dtype with unit stride over D, D a power of two 16..256, an
    additive mask [1 or B, 1, 1, >= L]."""
    if query.dim() != 4 or key.dim() != 4:
        return False
    b, hk, r, d = query.shape
    return (key.shape[:2] == (b, hk) and key.shape == value.shape and key.shape[-1] == d
            and key.dtype == value.dtype == query.dtype
            and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 16 <= d <= 256 and d & (d - 1) == 0 and 1 <= r <= 64
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
            and mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1:3] == (1, 1)
            and mask.shape[-1] >= key.shape[2] and mask.stride(-1) == 1 and mask.is_floating_point())


def default_splits(batch_heads: int, length: int, sms: int = 132) -> int:
    """Splits of the cache length: enough programs to reach ~one per SM, at least 128 keys each, at most 16."""
    splits = 1
    while splits < 16 and batch_heads * splits < sms and length >= 256 * splits:
        splits *= 2
    return splits


def default_tile(dtype: torch.dtype, head_dim: int, per_split: int) -> dict:
    """Keys per loop step (BL) and warps: see decode_attention. Float32 tiles take 2-4x the shared memory (a float32
    block of 256 does not fit an H100's)."""
    if dtype == torch.float32:
        return {"BL": 64, "num_warps": 4}
    if 128 < per_split <= 256 and head_dim <= 128:
        return {"BL": 256, "num_warps": 8}
    return {"BL": 128, "num_warps": 4}


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None, splits: int | None = None, block: int | None = None,
                     num_warps: int | None = None, num_stages: int = 2) -> torch.Tensor:
    """[B, HK, R, D] in query's dtype; see the module docstring. block: keys per loop step, by default (16-bit) 128
    (faster than 64 on an H100 at 192-16384 cached tokens, batch 1 and 16: results/gpu_decode_attention_*_s11.json)
    or the whole split in one step of 256 (8 warps) when it holds 129-256 keys: one round trip to memory, not two
    (0.85 us less per layer in the decode step); float32: 64."""
    if not supported(query, key, value, mask):
        raise ValueError(f"decode_attention takes q [B, HK, R, D], K/V [B, HK, L, D] and an additive mask "
                         f"[1|B, 1, 1, >=L]; got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(mask.shape)}, "
                         f"{query.dtype}")
    b, hk, r, d = query.shape
    length = key.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    if splits is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 8
        splits = default_splits(b * hk, length, sms)
    per_split = triton.cdiv(length, splits)
    tile = default_tile(query.dtype, d, per_split)
    block = tile["BL"] if block is None else block
    num_warps = tile["num_warps"] if num_warps is None else num_warps
    chunk = triton.cdiv(per_split, block) * block
    splits = triton.cdiv(length, chunk)
    rp = max(16, triton.next_power_of_2(r))
    out = torch.empty(b, hk, r, d, device=query.device, dtype=query.dtype)
    if splits > 1:
        part = torch.empty(b * hk, splits, rp, d, device=query.device, dtype=torch.float32)
        stat = torch.empty(b * hk, splits, 2, rp, device=query.device, dtype=torch.float32)
    else:
        part = stat = out
    sm_b = mask.stride(0) if mask.shape[0] > 1 else 0
    pdl_mode = pdl.mode(query.device, b * hk * splits, early=False)  # the next kernel launches after the loop
    _decode_attn_kernel[(b * hk, splits)](
        query, key, value, mask, out, part, stat, hk, length, r, scale,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), sm_b, out.stride(0), out.stride(1), out.stride(2),
        CHUNK=chunk, SPLITS=splits, RP=rp, D=d, BL=block, num_warps=num_warps, num_stages=num_stages,
        PREC="ieee" if query.dtype == torch.float32 else "tf32",  # float32 as SDPA computes it, not in TF32
        PDL=pdl_mode, **pdl.launch(pdl_mode))
    if splits > 1:
        _combine_kernel[(b * hk,)](part, stat, out, hk, r, out.stride(0), out.stride(1), out.stride(2),
                                   SPLITS=splits, RP=rp, D=d, PDL=pdl_mode, num_warps=4, **pdl.launch(pdl_mode))
    return out
