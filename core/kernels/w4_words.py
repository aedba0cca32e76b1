"""A weight-only GEMV for 4- and 8-bit codes (M = 1, decode) that reads each packed row as 32-bit words.

    y[N] = x[K] @ dequant(W)[N, K]^T (+ bias),   dequant(W)[n, k] = (code[n, k] - zero[n, g]) * scale[n, g]

slimlm's packed rows (core.quant.packing: 4-bit byte j holds code 2j low, 2j+1 high; 8-bit one code per byte)
read as little-endian int32 are words of 8 (4-bit) or 4 (8-bit) codes in order: code i of word j is k = PER j + i.
So the stored format needs no repacking. A program owns one chunk of BKW words of K and ROWS rows: it loads x's
chunk into registers once, as PER vectors (x[PER j + i] for each position i) in the weight tile's layout, then
walks its rows BN at a time with 16-byte loads (the next rows' words fetched before the current ones are used).
Two inner loops:
  - 4-bit codes, bf16 x (PAIRS, GPU): per word, codes (i, i + 4) become one bf16 pair 128 + c with a lop3, one
    bf16x2 FMA centres them (c - 8, exact), four bf16x2 FMAs multiply them by x pairs (x[8j + i], x[8j + i + 4])
    packed once per program, and the two bf16 lanes are added in float32: ~2.3 instructions per code
    (_word_dot_bf16x2), for a bf16 rounding per product and per partial sum of four.
  - otherwise (8-bit codes, fp16 x, Triton's interpreter): each code is one shift and one lop3 into the bits of an
    exact float32, 128 + code (4-bit) or 128 + code / 2 (8-bit), and one FFMA; the chain starts at
    -(128 + z / UNIT) sum_i x_i, so it ends at sum_i (code_i - z) x_i / UNIT (UNIT = 1 for 4-bit, 2 for 8-bit).
Scales and zeros: where a group is 2**p words and fits in a chunk (GW), word partials are summed per group and
scaled once per (row, group); one group per row is scaled once per row; other group sizes (any multiple of PER,
incl. a last group the group size does not divide) gather a scale per (row, word). K longer than one chunk is split
over programs, whose float32 partials one small kernel sums (+ bias, cast).
Epilogues (K in one chunk, i.e. one token of a layer up to 4096 wide at 4 bits): pairs of rows per output, so that the
work of the kernel that would read the product is done here instead: silu(gate) * up of a merged gate/up (glu), or
the rotary embedding of a merged q/k/v with the KV-cache write (rope); benchmarks/gpu_gemv_epilogues.py.

Tried and dropped on an H100 (benchmarks/RESULTS.md): a version whose programs walk K with x loaded per step
(x reached each thread through shared memory every step; 1.65-1.78x bf16), tensor-core versions that feed tl.dot
per nibble position (0.5-0.94x bf16), four words per thread as a 3-D tile with one scale per quad (Triton put the
warps on rows, 255 registers: slower), a second block of rows in flight (slower: 18.0 vs 14.2 us on gate/up), two
words per bf16 accumulation (1-2 % faster, relative error 3.8e-3 instead of 3.0e-3: not kept) and loads left to
Triton's software pipeline (it does not pipeline loads that feed no tl.dot).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import pdl_launch_dependents, pdl_wait
from .rope_cache import _mul

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
INDUCTOR_SPLIT_SUM = True  # sum_splits under torch.compile as PyTorch ops (False: the Triton kernel; for A/B runs)


@triton.jit
def _code_f32(wu, i: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Code i of each uint32 word as an exact float32, without an int->float conversion: a 4-bit code moved to
    bits 16..19 of 0x43000000 is 128 + code; an 8-bit code moved to bits 15..22 is 128 + code / 2. USE_ASM (GPU):
    the mask-and-merge as ONE lop3 (ptxas emits two LOP3s for (t & m) | c with two immediates)."""
    if BITS == 4:
        if i < 4:
            t = wu << (16 - 4 * i)
        elif i == 4:
            t = wu
        else:
            t = wu >> (4 * i - 16)
        if USE_ASM:
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F0000, 0x43000000, 0xEA;", "=r,r", [t],
                                          dtype=tl.uint32, is_pure=True, pack=1)
        else:
            v = (t & 0x000F0000) | 0x43000000
    else:
        if i < 2:
            t = wu << (15 - 8 * i)
        else:
            t = wu >> (8 * i - 15)
        if USE_ASM:
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x007F8000, 0x43000000, 0xEA;", "=r,r", [t],
                                          dtype=tl.uint32, is_pure=True, pack=1)
        else:
            v = (t & 0x007F8000) | 0x43000000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _word_dot_bf16x2(wu, x04, x15, x26, x37):
    """sum_i (code_i - 8) x_i over one 32-bit word of 4-bit codes, in packed bf16 pairs (GPU only): one lop3
    makes codes (i, i + 4) into the bf16 pair (128 + c_i, 128 + c_{i+4}), one bf16x2 FMA takes off 136 (exact;
    centred codes keep the bf16 partial sums small, for asymmetric codes too: their zero is applied later as
    z - 8); the four pair products are summed in bf16 (two lanes of four terms), then the lanes are added in
    float32. ~2.3 instructions per code instead of ~3.9 (shift, lop3, FFMA per code in float32), for a bf16
    rounding per product and per partial sum of four (relative error ~3e-3 vs ~1.7e-3 on random inputs)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 v, t, p, one, neg, zero, lo, hi; mov.b32 one, 0x3F803F80; mov.b32 neg, 0xC308C308; "
        "mov.b32 zero, 0; "
        "lop3.b32 v, $1, 0x000F000F, 0x43004300, 0xEA; fma.rn.bf16x2 v, v, one, neg; "
        "fma.rn.bf16x2 p, v, $2, zero; shr.b32 t, $1, 4; "
        "lop3.b32 v, t, 0x000F000F, 0x43004300, 0xEA; fma.rn.bf16x2 v, v, one, neg; "
        "fma.rn.bf16x2 p, v, $3, p; shr.b32 t, $1, 8; "
        "lop3.b32 v, t, 0x000F000F, 0x43004300, 0xEA; fma.rn.bf16x2 v, v, one, neg; "
        "fma.rn.bf16x2 p, v, $4, p; shr.b32 t, $1, 12; "
        "lop3.b32 v, t, 0x000F000F, 0x43004300, 0xEA; fma.rn.bf16x2 v, v, one, neg; "
        "fma.rn.bf16x2 p, v, $5, p; "
        "shl.b32 lo, p, 16; and.b32 hi, p, 0xFFFF0000; add.f32 $0, lo, hi; }",
        "=f,r,r,r,r,r", [wu, x04, x15, x26, x37], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _x_pair(x_ptr, k, K, EVEN: tl.constexpr):
    """bf16 x[k] and x[k + 4] as one packed pair (uint32: x[k] low, x[k + 4] high)."""
    if EVEN:
        a = tl.load(x_ptr + k)
        b = tl.load(x_ptr + k + 4)
    else:
        a = tl.load(x_ptr + k, mask=k < K, other=0.0)
        b = tl.load(x_ptr + k + 4, mask=k + 4 < K, other=0.0)
    return a.to(tl.uint16, bitcast=True).to(tl.uint32) | (b.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)


@triton.jit
def _group_of_word(kw, gsize, PER: tl.constexpr, GSHIFT: tl.constexpr):
    """Quantization group of word kw (PER codes per word): a shift when a group is 2**GSHIFT words (an integer
    division costs ~20 instructions per element on the GPU), else a division."""
    if GSHIFT >= 0:
        return kw >> GSHIFT
    return (kw * PER) // gsize


@triton.jit
def _load_x(x_ptr, k, K, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(x_ptr + k).to(tl.float32)
    return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _pair_row(v, EPI: tl.constexpr, HALF_D: tl.constexpr):
    """The first weight row of output pair v: v itself, or for ROPE (EPI 2) row d of head h (v = h HALF_D + d)."""
    if EPI == 2:
        return (v // HALF_D) * (2 * HALF_D) + v % HALF_D
    return v


@triton.jit
def _rope_store(a, b, v, live, q_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, H, HK, sk_h, sk_l, sv_h, sv_l,
                HALF_D: tl.constexpr, USE_ASM: tl.constexpr):
    """Rows (d, d + HALF_D) of head h = v // HALF_D as a, b (float32 of output-dtype values): q and k rotated,
    a * cos + rotate_half * sin = (a cos_d - b sin_d, b cos_{d+HALF_D} + a sin_{d+HALF_D}); q stored to q_ptr, k
    and v into the caches at pos_ptr[0]."""
    dt = q_ptr.dtype.element_ty
    head = v // HALF_D
    d = v % HALF_D
    c0 = tl.load(cos_ptr + d).to(tl.float32)
    c1 = tl.load(cos_ptr + d + HALF_D).to(tl.float32)
    s0 = tl.load(sin_ptr + d).to(tl.float32)
    s1 = tl.load(sin_ptr + d + HALF_D).to(tl.float32)
    ra = (_mul(a, c0, USE_ASM).to(dt).to(tl.float32) + _mul(-b, s0, USE_ASM).to(dt).to(tl.float32)).to(dt)
    rb = (_mul(b, c1, USE_ASM).to(dt).to(tl.float32) + _mul(a, s1, USE_ASM).to(dt).to(tl.float32)).to(dt)
    pos = tl.load(pos_ptr)
    is_q = live & (head < H)
    tl.store(q_ptr + head * (2 * HALF_D) + d, ra, mask=is_q)
    tl.store(q_ptr + head * (2 * HALF_D) + d + HALF_D, rb, mask=is_q)
    is_k = live & (head >= H) & (head < H + HK)
    kp = k_ptr + (head - H) * sk_h + pos * sk_l + d
    tl.store(kp, ra, mask=is_k)
    tl.store(kp + HALF_D, rb, mask=is_k)
    is_v = live & (head >= H + HK)
    vp = v_ptr + (head - H - HK) * sv_h + pos * sv_l + d
    tl.store(vp, a.to(dt), mask=is_v)
    tl.store(vp + HALF_D, b.to(dt), mask=is_v)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                 N, K, KW, gsize, stride_wn, stride_sn, stride_ys, ROWS,
                 cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, H, HK, sk_h, sk_l, sv_h, sv_l, r_ptr,
                 HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BN: tl.constexpr, BKW: tl.constexpr, GSHIFT: tl.constexpr, EVEN: tl.constexpr,
                 BITS: tl.constexpr, USE_ASM: tl.constexpr, GW: tl.constexpr, PAIRS: tl.constexpr,
                 PDL: tl.constexpr, EPI: tl.constexpr = 0, HALF_D: tl.constexpr = 1, HAS_RES: tl.constexpr = False):
    """Program (axis 0: a block of ROWS rows, axis 1: a chunk of BKW words of K); see the module docstring.
    EVEN: N is a multiple of ROWS and every K chunk is full, so no load needs a mask. GW: words per group when a
    group is a power of two no longer than the chunk (partials summed per group, one scale load per group), -1
    for one group per row, 0 otherwise (a scale gathered per word). PDL: see core.kernels.pdl.
    EPI (K in one chunk), epilogues over pairs of rows, each tile BN / 2 pairs; N counts pairs:
      GLU   the rows are [gate; up], N each: writes silu(gate) * up;
      ROPE  the rows are q/k/v of a merged attention projection for one token, H + 2 HK heads of 2 HALF_D rows,
            paired (d, d + HALF_D) within a head: writes q rotated to y, k rotated and v into the caches (k_ptr,
            v_ptr [HK, L, 2 HALF_D] strides sk_h / sk_l...) at position pos_ptr[0], with cos / sin [2 HALF_D], each
            product and sum rounded as core.kernels.rope_cache rounds them.
    HAS_RES (no epilogue): writes residual (r_ptr, like y) + the product, as a residual add after it would."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL, 1)
    PER: tl.constexpr = 32 // BITS  # codes per word
    UNIT: tl.constexpr = 1.0 if BITS == 4 else 2.0  # 1 / the weight of a code in _code_f32's float
    SYM_ZERO: tl.constexpr = 8.0 if BITS == 4 else 128.0
    ZOFF: tl.constexpr = 8.0 if PAIRS else 0.0  # what part already took off each code, for the zero below
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    kw = pid_k * BKW + tl.arange(0, BKW)
    kmask = kw < KW
    k0 = kw * PER
    x0 = _load_x(x_ptr, k0, K, EVEN)
    x1 = _load_x(x_ptr, k0 + 1, K, EVEN)
    x2 = _load_x(x_ptr, k0 + 2, K, EVEN)
    x3 = _load_x(x_ptr, k0 + 3, K, EVEN)
    xs = (x0 + x1) + (x2 + x3)
    if BITS == 4:
        x4 = _load_x(x_ptr, k0 + 4, K, EVEN)
        x5 = _load_x(x_ptr, k0 + 5, K, EVEN)
        x6 = _load_x(x_ptr, k0 + 6, K, EVEN)
        x7 = _load_x(x_ptr, k0 + 7, K, EVEN)
        xs += (x4 + x5) + (x6 + x7)
    if PAIRS:  # 4-bit codes times bf16 x in packed pairs (_word_dot_bf16x2)
        x04 = _x_pair(x_ptr, k0, K, EVEN)
        x15 = _x_pair(x_ptr, k0 + 1, K, EVEN)
        x26 = _x_pair(x_ptr, k0 + 2, K, EVEN)
        x37 = _x_pair(x_ptr, k0 + 3, K, EVEN)
    # part = sum f x + init, f = 128 + code / UNIT: init = -(128 + z / UNIT) sum x gives sum (code - z) x / UNIT
    if HAS_Z:
        init = -128.0 * xs
        xsu = xs / UNIT
    else:
        init = -(128.0 + SYM_ZERO / UNIT) * xs
    g = _group_of_word(kw, gsize, PER, GSHIFT)
    if GW > 0:
        gi = pid_k * (BKW // GW) + tl.arange(0, BKW // GW)
        if HAS_Z:
            xsg = tl.sum(tl.reshape(xsu, [BKW // GW, GW]), axis=1)
    elif GW < 0 and HAS_Z:
        xsg = tl.sum(xsu, axis=0)
    STEP: tl.constexpr = BN // (1 + (EPI != 0))  # outputs (pairs of rows) per tile
    r0 = pid_n * ROWS
    rb = tl.arange(0, BN)
    vb = rb % STEP  # tile row i holds pair r + i % STEP: its first row for i < STEP, else its second
    if EPI == 1:  # GLU
        second = (rb // STEP) * N
    elif EPI == 2:  # ROPE
        second = (rb // STEP) * HALF_D
    else:
        second = 0
    rn = _pair_row(r0 + vb, EPI, HALF_D) + second
    if EVEN:
        wu = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :])
    else:
        wu = tl.load(w_ptr + rn[:, None] * stride_wn + kw[None, :], mask=(r0 + vb < N)[:, None] & kmask[None, :],
                     other=0)
    for r in range(r0, r0 + ROWS, STEP):
        nmask = r + vb < N
        rn = _pair_row(r + vb, EPI, HALF_D) + second
        wmask = nmask[:, None] & kmask[None, :]
        nxt = r + STEP + vb  # prefetch the next rows' words (masked off past this program's rows)
        nxt_mask = (nxt < r0 + ROWS)[:, None]
        if not EVEN:
            nxt_mask = nxt_mask & (nxt < N)[:, None] & kmask[None, :]
        wn = tl.load(w_ptr + (_pair_row(nxt, EPI, HALF_D) + second)[:, None] * stride_wn + kw[None, :],
                     mask=nxt_mask, other=0)
        u = wu.to(tl.uint32, bitcast=True)
        if PAIRS:  # sum (c - 8) x (symmetric) or sum c x
            part = _word_dot_bf16x2(u, x04[None, :], x15[None, :], x26[None, :], x37[None, :])
        else:
            part = init[None, :] + _code_f32(u, 0, BITS, USE_ASM) * x0[None, :]  # one FMA per code
            part += _code_f32(u, 1, BITS, USE_ASM) * x1[None, :]
            part += _code_f32(u, 2, BITS, USE_ASM) * x2[None, :]
            part += _code_f32(u, 3, BITS, USE_ASM) * x3[None, :]
            if BITS == 4:
                part += _code_f32(u, 4, BITS, USE_ASM) * x4[None, :]
                part += _code_f32(u, 5, BITS, USE_ASM) * x5[None, :]
                part += _code_f32(u, 6, BITS, USE_ASM) * x6[None, :]
                part += _code_f32(u, 7, BITS, USE_ASM) * x7[None, :]
        if GW > 0:  # sum each group's words first, then one scale (and zero) per (row, group)
            pg = tl.sum(tl.reshape(part, [BN, BKW // GW, GW]), axis=2)
            gmask = nmask[:, None] & (gi * GW < KW)[None, :]
            s = tl.load(s_ptr + rn[:, None] * stride_sn + gi[None, :], mask=gmask, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + rn[:, None] * stride_sn + gi[None, :], mask=gmask, other=0).to(tl.float32)
                pg -= (z - ZOFF) * xsg[None, :]
            y = tl.sum(s * pg, axis=1) * UNIT
        elif GW < 0:  # one group per row
            s = tl.load(s_ptr + rn * stride_sn, mask=nmask, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + rn * stride_sn, mask=nmask, other=0).to(tl.float32)
                y = s * (tl.sum(part, axis=1) - (z - ZOFF) * xsg) * UNIT
            else:
                y = s * tl.sum(part, axis=1) * UNIT
        else:
            if EVEN:
                s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :]).to(tl.float32)
            else:
                s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0).to(tl.float32)
                part -= (z - ZOFF) * xsu[None, :]
            y = tl.sum(s * part, axis=1) * UNIT
        if SPLIT_K == 1:
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            if EPI == 0:
                yo = y.to(y_ptr.dtype.element_ty)
                if HAS_RES:
                    yo = _add_residual(yo, r_ptr, rn, nmask)
                tl.store(y_ptr + rn, yo, mask=nmask)
            else:  # both rows of each pair, rounded to the output dtype first as the separate product would be
                dt = y_ptr.dtype.element_ty
                y2 = tl.reshape(y.to(dt).to(tl.float32), [2, STEP])
                half = tl.arange(0, 2)[:, None]
                a = tl.sum(tl.where(half == 0, y2, 0.0), axis=0)
                b = tl.sum(tl.where(half == 1, y2, 0.0), axis=0)
                vo = r + tl.arange(0, STEP)
                if EPI == 1:  # GLU
                    tl.store(y_ptr + vo, (a / (1.0 + tl.exp(-a)) * b).to(dt), mask=vo < N)
                else:
                    _rope_store(a, b, vo, vo < N, y_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, H, HK,
                                sk_h, sk_l, sv_h, sv_l, HALF_D, USE_ASM)
        else:
            tl.store(y_ptr + pid_k * stride_ys + rn, y, mask=nmask)
        wu = wn
    pdl_launch_dependents(PDL, 2)


@triton.jit
def _sum_splits_kernel(p_ptr, b_ptr, y_ptr, r_ptr, N, NB, stride_ps, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr, HAS_RES: tl.constexpr):
    """y[i] = sum_s partial[s, i] (+ bias[i % NB]) over the flat [M N] outputs, in y's dtype: one launch instead of
    sum + add + cast; HAS_RES: then + residual[i], rounded again (_add_residual). With PDL it only waits (launched
    early, it hides its launch behind the GEMV's tail)."""
    pdl_wait(PDL)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sp in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + sp * stride_ps + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn % NB, mask=mask, other=0.0).to(tl.float32)
    out = acc.to(y_ptr.dtype.element_ty)
    if HAS_RES:
        out = _add_residual(out, r_ptr, rn, mask)
    tl.store(y_ptr + rn, out, mask=mask)


@triton.jit
def _add_residual(y, r_ptr, rn, mask):
    """residual + y for y already in the output dtype, rounded as PyTorch's separate add rounds it."""
    return (tl.load(r_ptr + rn, mask=mask, other=0.0).to(tl.float32) + y.to(tl.float32)).to(y.dtype)


def split_output(x: torch.Tensor, m: int, n: int, split: int) -> tuple[torch.Tensor, int]:
    """Where a kernel that splits K over programs writes: y [M, N] in x.dtype when K is not split, else float32
    partials [split, M, N] for sum_splits. Returns y and the stride between splits (0 when not split)."""
    if split == 1:
        return torch.empty(m, n, device=x.device, dtype=x.dtype), 0
    y = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    return y, y.stride(0)


def sum_block(split: int) -> int:
    """Outputs per program of the summing kernel: each program adds ~2048 partials (128..512 outputs). On an H100
    that was the best or within 0.2 us of it at every decode-sized output (benchmarks/gpu_sum_splits.py,
    results/gpu_sum_splits.json); a fixed 1024 left few programs and took 1.7-3.4 us instead of 0.8-1.6."""
    return max(128, min(512, 2048 // triton.next_power_of_2(split)))


def sum_splits(y: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None, block: int | None = None,
               num_warps: int = 4, residual: torch.Tensor | None = None) -> torch.Tensor:
    """[M, N] in dtype: the sum of split_output's float32 partials [split, M, N] (+ bias [N]) (then residual + it,
    residual [M, N] in dtype). Under torch.compile in PyTorch ops: Inductor unrolls a sum over <= 8 splits into the
    kernel that reads the result (the residual add and the next norm), which saves a launch per split layer."""
    if torch.compiler.is_compiling() and INDUCTOR_SPLIT_SUM:
        out = (y.sum(0) if bias is None else y.sum(0) + bias.float()).to(dtype)
        return out if residual is None else residual + out
    split, m, n = y.shape
    out = torch.empty(m, n, device=y.device, dtype=dtype)
    block = block or sum_block(split)  # block / num_warps: overrides for benchmarks/gpu_sum_splits.py
    grid = triton.cdiv(m * n, block)
    pdl_mode = pdl.mode(y.device, grid, early=False)  # it only waits
    _sum_splits_kernel[(grid,)](y, y if bias is None else bias, out, out if residual is None else residual, m * n,
                                n, y.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, PDL=pdl_mode,
                                HAS_RES=residual is not None, num_warps=num_warps, **pdl.launch(pdl_mode))
    return out


# --- launchers -------------------------------------------------------------------------------------------------


def supported(bits: int, group_size: int, in_features: int, packed: torch.Tensor) -> bool:
    """4- or 8-bit rows whose bytes fill whole 32-bit words, groups of whole words (or one group per row)."""
    return (bits in (4, 8) and packed.dim() == 2 and packed.shape[1] % 4 == 0 and packed.stride(-1) == 1
            and packed.stride(0) % 4 == 0 and word_aligned(packed)
            and (group_size >= in_features or group_size % (32 // bits) == 0))


def word_aligned(packed: torch.Tensor) -> bool:
    """Whether packed starts on a 4-byte boundary of its storage. Under torch.compile, taken as true: Dynamo cannot
    trace storage_offset() (it broke the compiled decode step at every linear); slimlm's packers and loaders make
    buffers at offset 0, and a misaligned view fails .view(torch.int32), which the dispatcher reports and routes to
    the reference path."""
    return torch.compiler.is_compiling() or packed.storage_offset() % 4 == 0


def group_shift(group_size: int, in_features: int, bits: int = 4) -> int:
    """log2(words per group) when that is a power of two (one group per row counts: any shift past the row),
    else -1 (the kernels divide)."""
    if group_size >= in_features:
        return 30
    words = group_size // (32 // bits)
    return words.bit_length() - 1 if words & (words - 1) == 0 else -1


def _check(bits, group_size, k, packed, bkw):
    if not supported(bits, group_size, k, packed):
        raise ValueError(f"w4_words takes 4/8-bit rows of whole 32-bit words and groups of whole words; got {bits} "
                         f"bits, group {group_size}, {packed.shape[1]} bytes per row")
    if bkw & (bkw - 1):
        raise ValueError(f"BKW must be a power of two, got {bkw}")


def default_gemv_config(n: int, k: int, bits: int = 4, pairs: bool = False) -> dict:
    """Tile rules from benchmarks/gpu_w4_words.py on an H100, each Llama-3-8B shape's best config or within 5 % of
    it. pairs (4-bit codes, bf16 x: _word_dot_bf16x2; results/gpu_w4_words_pairs.json): 8 rows at a time, K in one
    chunk when a row has at most 512 words, else chunks of 256 (split K, 4 warps), 32 rows per program for wide
    layers (N >= 8192) or a split K, 16 for 4096 < N < 8192, else 8, 8 warps. Codes in float32 (8-bit, fp16 x; results/gpu_w4_words.json):
    4 rows at a time, chunks of 512 / 256 words (2 warps when split), 16 or 8 rows per program."""
    kw = -(-k // (32 // bits))
    split = kw > 512
    bkw = 256 if split else min(512, max(32, triton.next_power_of_2(kw)))
    if pairs:  # 16 rows from 4096 < N < 8192 (merged q/k/v, 6144: 7.7 vs 8.3 us; gpu_w4_gemv_merged_sweep_s11.json)
        rows = 32 if split or n >= 8192 else 16 if n > 4096 else 8
        return {"ROWS": rows, "BN": 8, "BKW": bkw, "num_warps": 4 if split else 8, "num_stages": 1}
    return {"ROWS": 16 if split or n >= 8192 else 8, "BN": 4, "BKW": bkw, "num_warps": 2 if split else 4,
            "num_stages": 1}


def glu_supported(n_out: int, k: int, bits: int) -> bool:
    """Whether gemv(..., glu=True) takes a stacked [gate; up] weight of n_out rows: an even n_out and K in one
    chunk of the default tile (at most 512 words: 4096 4-bit codes), since the epilogue needs each row's whole sum."""
    return n_out % 2 == 0 and n_out > 0 and -(-k // (32 // bits)) <= 512


def rope_supported(x: torch.Tensor, n_out: int, bits: int, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int) -> bool:
    """Whether gemv(..., rope=...) takes this merged q/k/v projection of one token: K in one chunk, n_out =
    (heads + 2 kv_heads) D for the caches' head width D (an even power of two), caches [1, kv_heads, L, D] of x's
    dtype with unit stride over D, cos / sin of D contiguous values, one position."""
    d = k_cache.shape[-1] if k_cache.dim() == 4 else 0
    return (glu_supported(n_out, x.shape[-1], bits) and d >= 2 and d & (d - 1) == 0
            and n_out == (heads + 2 * kv_heads) * d
            and all(c.shape[:2] == (1, kv_heads) and c.shape[3] == d and c.dtype == x.dtype and c.stride(3) == 1
                    for c in (k_cache, v_cache)) and v_cache.shape == k_cache.shape
            and all(t.numel() == d and t.stride(-1) == 1 and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
                    for t in (cos, sin)) and pos.numel() == 1)


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
         group_size: int, n_out: int, bias: torch.Tensor | None = None, config: dict | None = None,
         glu: bool = False, rope: tuple | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (contiguous) -> y [1, N] in x.dtype; K is split into chunks of BKW words (one per program column).
    With an epilogue (K in one chunk; a config's ROWS then counts outputs, pairs of rows):
      glu   the n_out rows are [gate; up] of a gated MLP: returns silu(gate) * up [1, n_out / 2] (glu_supported);
      rope  (cos, sin, pos, k_cache, v_cache, heads, kv_heads): the rows are a merged q/k/v projection of one
            token; returns q rotated [1, heads D], and writes k rotated and v into the caches at pos
            (rope_supported), as core.kernels.rope_cache.rope_to_cache does with the plain product.
    residual [1, N] in x.dtype (no epilogue): returns residual + y, added where y is written (or summed over splits),
    rounded as a separate add would round it."""
    m, k = x.shape
    if m != 1:
        raise ValueError("gemv_words takes one row of x")
    use_asm = (config or {}).get("USE_ASM", not INTERPRET)
    pairs = use_asm and bits == 4 and x.dtype == torch.bfloat16 and (config or {}).get("PAIRS", True)
    epi = 1 if glu else 2 if rope is not None else 0
    cfg = default_gemv_config(n_out, k, bits, pairs)
    if epi:
        cfg["ROWS"] //= 2  # the same rows per program as the plain product
    cfg.update(config or {})
    _check(bits, group_size, k, packed, cfg["BKW"])
    n_rows = n_out // 2 if epi else n_out
    step = cfg["BN"] // 2 if epi else cfg["BN"]
    if epi and (n_out % 2 or cfg["BN"] % 2):
        raise ValueError(f"an epilogue over pairs of rows needs an even number of rows and BN, got {n_out} and "
                         f"{cfg['BN']}")
    if cfg["ROWS"] % step:
        raise ValueError("ROWS must be a multiple of BN" + (" / 2" if epi else ""))
    w = packed.view(torch.int32)
    kw = w.shape[1]
    split = triton.cdiv(kw, cfg["BKW"])
    if epi and split > 1:
        raise ValueError(f"an epilogue needs K in one chunk; {kw} words of K do not fit {cfg['BKW']}")
    if residual is not None and (epi or residual.shape != (1, n_out) or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError(f"residual takes a contiguous [1, {n_out}] tensor of x's dtype and no epilogue; got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    rope_args, half_d = (x, x, x, x, x, 0, 0, 0, 0, 0, 0), 1
    if rope is not None:
        cos, sin, pos, kc, vc, heads, kv_heads = rope
        if not rope_supported(x, n_out, bits, cos, sin, pos, kc, vc, heads, kv_heads):
            raise ValueError(f"rope takes a q/k/v projection of (heads + 2 kv_heads) D rows and caches [1, kv_heads, "
                             f"L, D] of x's dtype; got {n_out} rows, caches {tuple(kc.shape)} {kc.dtype}, heads "
                             f"{heads} / {kv_heads}")
        half_d = kc.shape[-1] // 2
        rope_args = (cos, sin, pos, kc, vc, heads, kv_heads, kc.stride(1), kc.stride(2), vc.stride(1), vc.stride(2))
        y, stride_ys = torch.empty(1, heads * 2 * half_d, device=x.device, dtype=x.dtype), 0
    else:
        y, stride_ys = split_output(x, 1, n_rows, split)
    args = (x, w, scales, scales if zeros is None else zeros, scales if bias is None else bias, y,
            n_rows, k, kw, group_size, w.stride(0), scales.stride(0), stride_ys, cfg["ROWS"], *rope_args,
            x if residual is None else residual)
    common = {"HAS_Z": zeros is not None, "HAS_BIAS": bias is not None and split == 1, "SPLIT_K": split,
              "BN": cfg["BN"], "GSHIFT": group_shift(group_size, k, bits), "BITS": bits,
              "EVEN": n_rows % cfg["ROWS"] == 0 and kw % cfg["BKW"] == 0 and k == (32 // bits) * kw,
              "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    grid = (triton.cdiv(n_rows, cfg["ROWS"]), split)
    gw = 0
    if group_size >= k:
        gw = -1
    elif common["GSHIFT"] >= 0 and (1 << common["GSHIFT"]) <= cfg["BKW"] and cfg.get("GROUPED", True):
        gw = 1 << common["GSHIFT"]
    pdl_mode = pdl.mode(x.device, grid[0] * grid[1])
    _gemv_kernel[grid](*args, BKW=cfg["BKW"], USE_ASM=use_asm, GW=gw, PAIRS=pairs, PDL=pdl_mode, EPI=epi,
                       HALF_D=half_d, HAS_RES=residual is not None and split == 1, **common, **pdl.launch(pdl_mode))
    return y if split == 1 else sum_splits(y, x.dtype, bias, residual=residual)
