"""Tensor-core W4A16 for small batches (2 <= M <= 16) on slimlm's packed rows, without repacking: mma.sync on
codes made into bf16 pairs in registers (sm_80+; GPU only).

    y[M, N] = x[M, K] @ dequant(W)[N, K]^T,   dequant(W)[n, k] = (code[n, k] - 8) * scale[n, k // group]

The trick that needs no repacking: a 32-bit word of a packed row holds codes k0..k0+7, and one lop3 makes codes
(i, i + 4) into a bf16 pair (128 + c_i, 128 + c_{i+4}), one bf16x2 FMA centres it (c - 8, exact). An m16n8k16
mma wants, per thread, pairs of *consecutive* k — but the order of k inside a dot product is free, so the kernel
defines a logical k order in which pair (i, i + 4) of a word IS a consecutive pair, and gathers x (the B operand)
in that same order. Thread (g = lane / 4, t = lane % 4) of a warp owns rows g and g + 8 of a 16-row tile and
words 4t..4t+3 of each 128-code chunk (one 16-byte load per row); mma m (0..7) of a chunk takes pair
(m % 2) * 2 + {0, 1} of word m // 2 as its k-low / k-high halves. A chunk is 128 codes, so with groups of a
multiple of 128 codes (or one group per row) its scale applies to the chunk's float32 mma result.

Each warp owns one 16-row tile; a program has NW warps and CHUNKS chunks of K; K split over programs writes float32
partials that a second kernel sums. The layout the mma needs (warp w, lane l holds elements [w, l, 0..3]) is the
blocked layout Triton gives a [NW, 32, 4] tile of 16-byte loads; tests/test_kernels.py checks the compiled layout.
Symmetric codes only (zeros: the dispatcher uses the older kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4_words import _sum_splits_kernel

# One chunk (8 mma k-steps) for one or two n8 tiles of the batch. Operands (pack = 4: 4 elements per thread each):
# outputs C0 (n-tile 0) $0..$3 [, C1 $4..$7], then words 0..3 of row g, words 0..3 of row g + 8, then the x pairs
# X[j][n] (j = word 0..3, n = n-tile): element p = x[col][k], x[col][k + 1] (bf16) at the codes of pair p of word j.


def _chunk_asm(nt: int) -> str:
    o = 4 * nt  # first input operand
    wa, wb, xb = o, o + 4, o + 8
    lines = ["{ .reg .b32 t, h, one, neg, a0, a1, a2, a3;", "mov.b32 one, 0x3F803F80; mov.b32 neg, 0xC308C308;"]
    lines += [f"mov.f32 ${i}, 0f00000000;" for i in range(4 * nt)]

    def pair(dst, word, p):
        """codes 2p, 2p + 1 of a word (byte p) -> bf16 pair (c_2p - 8, c_2p+1 - 8)."""
        src = f"${word}"
        if p:
            lines.append(f"shr.b32 t, {src}, {8 * p};")
            src = "t"
        lines.append(f"shl.b32 h, {src}, 12; lop3.b32 {dst}, {src}, 0xF, h, 0xEA; "
                     f"lop3.b32 {dst}, {dst}, 0x000F000F, 0x43004300, 0xEA; fma.rn.bf16x2 {dst}, {dst}, one, neg;")

    for m in range(8):
        j, pp = m // 2, (m % 2) * 2
        pair("a0", wa + j, pp)
        pair("a1", wb + j, pp)
        pair("a2", wa + j, pp + 1)
        pair("a3", wb + j, pp + 1)
        for n in range(nt):
            xr = xb + 4 * nt * j + 4 * n + pp
            c = f"{{${4 * n}, ${4 * n + 1}, ${4 * n + 2}, ${4 * n + 3}}}"
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {c}, {{a0, a1, a2, a3}}, "
                         f"{{${xr}, ${xr + 1}}}, {c};")
    lines.append("}")
    return " ".join(lines)


CHUNK_ASM_1: tl.constexpr = tl.constexpr(_chunk_asm(1))
CHUNK_ASM_2: tl.constexpr = tl.constexpr(_chunk_asm(2))


@triton.jit
def _tile_chunk(w_ptr, s_ptr, row_a, word, stride_wn, stride_sn, grp, e, N, x00, x01, x10, x11, x20, x21, x30, x31,
                NT: tl.constexpr):
    """One 16-row tile (rows row_a = g and g + 8 of each lane group), one chunk: scaled C fragments (c0, c1)."""
    row_b = row_a + 8
    wa = tl.load(w_ptr + row_a * stride_wn + word, mask=row_a < N, other=0)
    wb = tl.load(w_ptr + row_b * stride_wn + word, mask=row_b < N, other=0)
    row_c = row_a + 8 * (e // 2)  # row of C fragment element e
    s = tl.load(s_ptr + row_c * stride_sn + grp, mask=row_c < N, other=0.0).to(tl.float32)
    if NT == 1:
        c0 = tl.inline_asm_elementwise(CHUNK_ASM_1, "=f,=f,=f,=f" + ",r" * 24, [wa, wb, x00, x10, x20, x30],
                                       dtype=tl.float32, is_pure=True, pack=4)
        c1 = c0
    else:
        c0, c1 = tl.inline_asm_elementwise(CHUNK_ASM_2, "=f,=f,=f,=f,=f,=f,=f,=f" + ",r" * 40,
                                           [wa, wb, x00, x01, x10, x11, x20, x21, x30, x31],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    return c0 * s, c1 * s


@triton.jit
def _store_tile(y_ptr, acc0, acc1, row_a, e, t, M, N, stride_ym, NT: tl.constexpr, PARTIAL: tl.constexpr):
    """C element e of n-tile n: row row_a + 8 (e // 2), batch column 8 n + 2 t + e % 2."""
    row_c = row_a + 8 * (e // 2)
    bcol = 2 * t + e % 2
    ok = row_c < N
    if PARTIAL:
        tl.store(y_ptr + bcol * stride_ym + row_c, acc0, mask=ok & (bcol < M))
        if NT == 2:
            tl.store(y_ptr + (bcol + 8) * stride_ym + row_c, acc1, mask=ok & (bcol + 8 < M))
    else:
        tl.store(y_ptr + bcol * stride_ym + row_c, acc0.to(y_ptr.dtype.element_ty), mask=ok & (bcol < M))
        if NT == 2:
            tl.store(y_ptr + (bcol + 8) * stride_ym + row_c, acc1.to(y_ptr.dtype.element_ty),
                     mask=ok & (bcol + 8 < M))


@triton.jit
def _mma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K2, KW, stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                NW: tl.constexpr, CHUNKS: tl.constexpr, NT: tl.constexpr, SPLIT_K: tl.constexpr,
                GPC: tl.constexpr, TILES: tl.constexpr):
    """Program (axis 0: NW warps of TILES tiles of 16 rows; axis 1: CHUNKS chunks of 128 codes of K). Tensors are
    [4, 32 NW]: in Triton's default layout for that shape, warp w, lane l holds elements [0..3, 32 w + l], which
    is what the mma fragments need (the inline asm keeps the default layout; checked in tests/test_kernels.py).
    A warp's tiles share the x fragments of a chunk (loaded once). x_ptr: x as int32 (bf16 pairs), K2 = K / 2 of
    them per row. GPC: chunks per quantization group (0: one group per row)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    li = tl.arange(0, 32 * NW)[None, :]
    e = tl.arange(0, 4)[:, None]
    wi = li // 32
    lane = li % 32
    g = lane // 4
    t = lane % 4
    row0 = pid_n * (NW * 16 * TILES) + wi * (16 * TILES) + g  # row g of the warp's first tile
    col1 = g + 8
    ok_x0 = g < M
    ok_x1 = col1 < M
    acc0 = tl.zeros([4, 32 * NW], dtype=tl.float32)
    acc1 = tl.zeros([4, 32 * NW], dtype=tl.float32)
    acc2 = tl.zeros([4, 32 * NW], dtype=tl.float32)
    acc3 = tl.zeros([4, 32 * NW], dtype=tl.float32)
    for c in range(pid_k * CHUNKS, pid_k * CHUNKS + CHUNKS):
        word = c * 16 + 4 * t + e  # words 4t..4t+3 of the chunk
        # x pairs of word j = 4t + jj of the chunk: x32[col][64 c + 16 t + 4 jj + p], p = e
        xk = c * 64 + 16 * t + e
        x00 = tl.load(x_ptr + g * stride_xm + xk, mask=ok_x0, other=0)
        x10 = tl.load(x_ptr + g * stride_xm + xk + 4, mask=ok_x0, other=0)
        x20 = tl.load(x_ptr + g * stride_xm + xk + 8, mask=ok_x0, other=0)
        x30 = tl.load(x_ptr + g * stride_xm + xk + 12, mask=ok_x0, other=0)
        if NT == 2:
            x01 = tl.load(x_ptr + col1 * stride_xm + xk, mask=ok_x1, other=0)
            x11 = tl.load(x_ptr + col1 * stride_xm + xk + 4, mask=ok_x1, other=0)
            x21 = tl.load(x_ptr + col1 * stride_xm + xk + 8, mask=ok_x1, other=0)
            x31 = tl.load(x_ptr + col1 * stride_xm + xk + 12, mask=ok_x1, other=0)
        else:
            x01 = x00
            x11 = x10
            x21 = x20
            x31 = x30
        grp = 0 if GPC == 0 else c // GPC
        c0, c1 = _tile_chunk(w_ptr, s_ptr, row0, word, stride_wn, stride_sn, grp, e, N,
                             x00, x01, x10, x11, x20, x21, x30, x31, NT)
        acc0 += c0
        acc1 += c1
        if TILES == 2:
            c2, c3 = _tile_chunk(w_ptr, s_ptr, row0 + 16, word, stride_wn, stride_sn, grp, e, N,
                                 x00, x01, x10, x11, x20, x21, x30, x31, NT)
            acc2 += c2
            acc3 += c3
    out = y_ptr + pid_k * stride_ys
    _store_tile(out, acc0, acc1, row0, e, t, M, N, stride_ym, NT, SPLIT_K > 1)
    if TILES == 2:
        _store_tile(out, acc2, acc3, row0 + 16, e, t, M, N, stride_ym, NT, SPLIT_K > 1)


def supported(bits: int, group_size: int, in_features: int, has_zeros: bool, packed: torch.Tensor,
              m: int, dtype: torch.dtype) -> bool:
    """4-bit symmetric codes, bf16 x, 2 <= M <= 16, K a multiple of 128, groups of a multiple of 128 (or one per
    row), rows of whole 16-byte words."""
    return (bits == 4 and not has_zeros and dtype == torch.bfloat16 and 2 <= m <= 16 and in_features % 128 == 0
            and (group_size >= in_features or group_size % 128 == 0) and packed.dim() == 2
            and packed.stride(-1) == 1 and packed.stride(0) % 16 == 0 and packed.shape[1] * 2 == in_features)


def default_config(m: int, n: int, k: int) -> dict:
    """From benchmarks/gpu_w4_mma.py on an H100 (results/gpu_w4_mma.json): K split until the 64-row programs
    number >= 4 per SM (at most 8 ways), 4 warps; two tiles per warp (sharing x) for M > 8 on wide layers."""
    chunks = k // 128
    split = 1
    while split < 8 and chunks % (2 * split) == 0 and triton.cdiv(n, 64) * split < 4 * 132:
        split *= 2
    return {"NW": 4, "SPLIT_K": split, "num_warps": 4, "TILES": 2 if m > 8 and n >= 8192 else 1}


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, n_out: int,
           bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] bf16 (rows contiguous) -> y [M, N] bf16; symmetric 4-bit codes (see module docstring)."""
    m, k = x.shape
    if not supported(4, group_size, k, False, packed, m, x.dtype) or x.stride(-1) != 1 or x.stride(0) != k:
        raise ValueError(f"w4_mma takes bf16 x with 2..16 contiguous rows, K a multiple of 128 and groups of a "
                         f"multiple of 128; got M={m}, K={k}, {x.dtype}, group {group_size}")
    cfg = {**default_config(m, n_out, k), **(config or {})}
    if cfg["num_warps"] != cfg["NW"]:
        raise ValueError("one warp per 16-row tile: num_warps must equal NW")
    chunks = k // 128
    split = cfg["SPLIT_K"]
    if chunks % split:
        raise ValueError(f"SPLIT_K {split} does not divide {chunks} chunks")
    w = packed.view(torch.int32)
    gpc = 0 if group_size >= k else group_size // 128
    nt = 1 if m <= 8 else 2
    grid = (triton.cdiv(n_out, 16 * cfg["NW"] * cfg["TILES"]), split)
    if split == 1:
        y = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
        stride_ys = 0
    else:
        y = torch.empty(split, m, n_out, device=x.device, dtype=torch.float32)
        stride_ys = y.stride(0)
    x32 = x.view(torch.int32)
    _mma_kernel[grid](x32, w, scales, y, m, n_out, k // 2, w.shape[1], x32.stride(0), w.stride(0), scales.stride(0),
                      n_out, stride_ys, NW=cfg["NW"], CHUNKS=chunks // split, NT=nt, SPLIT_K=split, GPC=gpc, TILES=cfg["TILES"],
                      num_warps=cfg["num_warps"], num_stages=1)
    if split > 1:
        out = torch.empty(m, n_out, device=x.device, dtype=x.dtype)  # partials [split, M, N] read as [split, M N]
        _sum_splits_kernel[(triton.cdiv(m * n_out, 1024),)](y, y, out, m * n_out, stride_ys, SPLIT_K=split,
                                                            HAS_BIAS=False, BLOCK=1024)
        y = out
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
