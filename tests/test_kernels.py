"""Weight-only quantized matmul kernels (core.kernels): the Triton kernels run on CPU under Triton's interpreter
(TRITON_INTERPRET=1) on small shapes against dequantize + matmul in float32; the dispatcher's choices and the
reference fallback are tested without a GPU. benchmarks/gpu_kernels.py checks the same kernels on a GPU."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core.kernels import dispatch
from core.kernels.dispatch import kernel_for, quant_matmul, reference_matmul
from core.quant.linear import QuantLinear
from core.quant.rtn import quantize_rtn


TRITON = importlib.util.find_spec("triton") is not None
# Triton picks interpreter or GPU mode when it is first imported, so the kernel tests run in a child pytest
# process started with TRITON_INTERPRET=1 (test_kernels_in_triton_interpreter); in this process they skip.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRETED, reason="run in a child process with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_kernels_in_triton_interpreter():
    if not TRITON:
        pytest.skip("triton is not installed (pip install -e '.[test]' installs it): Triton kernels untested on CPU")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp",
                        os.path.abspath(__file__)], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:]


@pytest.fixture(scope="module")
def k():
    import core.kernels.w4a16 as mod

    assert mod.INTERPRET
    return mod


def _layer(n, kdim, bits, group_size, symmetric, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, kdim, generator=g) * 0.05
    w[:, 0] += 0.2  # a skewed range per row, so asymmetric zeros are not all mid-scale
    q = QuantLinear.from_linear(torch.nn.Linear(kdim, n, bias=False), quantize_rtn(w, bits, group_size, symmetric))
    if bias:
        q.bias = torch.nn.Parameter(torch.randn(n, generator=g) * 0.1, requires_grad=False)
    return q


def _x(m, kdim, dtype, seed=1):
    x = torch.randn(m, kdim, generator=torch.Generator().manual_seed(seed))
    return (x + 0.1 * torch.sign(x)).to(dtype)  # never zero


def _oracle(x, q):
    """float32 dequantize + matmul (+ bias)."""
    y = x.float() @ q.qweight.dequantize(torch.float32).t()
    return y if q.bias is None else y + q.bias.float()


def _rel(y, ref):
    assert torch.isfinite(y).all()
    return float((y.float() - ref).norm() / ref.norm())


def _tol(dtype):
    return 8e-3 if dtype == torch.bfloat16 else 2e-3  # one rounding of the output (and of x) to 16 bits


def _args(q):
    return q.packed, q.scales, q.zeros, q.bits, q.group_size, q.out_features


# (N, K, group_size, bits, symmetric, M, dtype): K=576 with g=128 leaves a last group of 64; K=200 with g=64 a
# last group of 8; per-channel (None) with odd K puts the last code of a row in a half-used byte.
GEMV_CASES = [
    (24, 576, 128, 4, False, 1, torch.float16),
    (40, 576, 128, 4, True, 3, torch.bfloat16),
    (17, 99, None, 4, False, 2, torch.float16),
    (33, 200, 64, 4, True, 4, torch.float16),
    (20, 200, 64, 8, False, 1, torch.bfloat16),
    (24, 160, 32, 8, True, 5, torch.float16),
]


@interp
@pytest.mark.parametrize("n,kdim,gs,bits,sym,m,dtype", GEMV_CASES)
def test_interp_gemv_matches_reference(k, n, kdim, gs, bits, sym, m, dtype):
    q = _layer(n, kdim, bits, gs, sym)
    x = _x(m, kdim, dtype)
    y = k.gemv(x, *_args(q), q.bias, config={"BN": 8, "UNROLL": 2})
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel(y, _oracle(x, q)) < _tol(dtype)


BF16_DOT = ("Triton's interpreter (3.8) multiplies bf16 tl.dot operands as their raw uint16 bits; the bf16 "
            "tensor-core path is checked on the GPU by benchmarks/gpu_kernels.py")
GEMM_CASES = [  # + split-K
    (24, 576, 128, 4, False, 5, torch.float16, 1),
    (40, 576, 128, 4, True, 17, torch.float16, 1),
    (33, 576, 128, 4, False, 33, torch.float16, 3),
    (17, 99, None, 4, True, 7, torch.float16, 1),
    (36, 200, 64, 8, False, 19, torch.float16, 2),
    (24, 160, 32, 8, True, 3, torch.float16, 1),
    (40, 576, 128, 4, True, 17, torch.bfloat16, 1),
]


@interp
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "dequant-tile"])
@pytest.mark.parametrize("n,kdim,gs,bits,sym,m,dtype,split", GEMM_CASES)
def test_interp_gemm_matches_reference(k, n, kdim, gs, bits, sym, m, dtype, split, fold):
    if dtype == torch.bfloat16:
        pytest.skip(BF16_DOT)
    q = _layer(n, kdim, bits, gs, sym)
    x = _x(m, kdim, dtype)
    cfg = {"BM": 16, "BN": 16, "BK": min(gs, 64) if gs else 32, "FOLD": fold}
    y = k.gemm(x, *_args(q), q.bias, config=cfg, split_k=split)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel(y, _oracle(x, q)) < _tol(dtype)


# word-reading GEMV (w4_words): 4-bit rows of whole 32-bit words; K=576 g=96 has 12 words per group (the
# division path), g=128 the shift path with a short last group, None one group per row; BKW below the row's
# words splits K (partials summed by a second kernel), ROWS not a multiple of N leaves a partial last block.
# Power-of-two groups no longer than a chunk are summed per group before the scale (GW > 0), others gather a
# scale per word; each case runs both ways.
WORDS_GEMV_CASES = [  # N, K, group, symmetric, dtype, config
    (24, 576, 128, False, torch.float16, {"ROWS": 8, "BN": 4, "BKW": 32}),
    (40, 576, 128, True, torch.bfloat16, {"ROWS": 16, "BN": 8, "BKW": 128}),
    (17, 576, 96, False, torch.bfloat16, {"ROWS": 8, "BN": 2, "BKW": 16}),
    (33, 200, 64, True, torch.float16, {"ROWS": 12, "BN": 4, "BKW": 32}),
    (20, 200, None, False, torch.float16, {"ROWS": 4, "BN": 4, "BKW": 8}),
    (36, 576, 64, True, torch.float16, None),  # the default tile rule
    (32, 512, 128, False, torch.float16, {"ROWS": 16, "BN": 4, "BKW": 64}),  # EVEN: no masks
    (32, 1024, 64, True, torch.bfloat16, {"ROWS": 8, "BN": 2, "BKW": 32}),  # EVEN, K split in 4
    (16, 1024, 256, False, torch.bfloat16, {"ROWS": 8, "BN": 4, "BKW": 16}),  # a group (32 words) > a chunk
]
# 8-bit: 4 codes per word; K=200 g=64 has 16 words per group and a short last group, g=36 9 words (division)
WORDS8_GEMV_CASES = [
    (24, 200, 64, False, torch.float16, {"ROWS": 8, "BN": 4, "BKW": 16}),
    (20, 576, 36, True, torch.bfloat16, {"ROWS": 4, "BN": 2, "BKW": 32}),
    (32, 512, None, False, torch.bfloat16, {"ROWS": 16, "BN": 4, "BKW": 32}),  # EVEN, K split in 4
    (36, 576, 128, True, torch.float16, None),
]


@interp
@pytest.mark.parametrize("bits,n,kdim,gs,sym,dtype,cfg",
                         [(4, *c) for c in WORDS_GEMV_CASES] + [(8, *c) for c in WORDS8_GEMV_CASES])
def test_interp_words_gemv_matches_reference(bits, n, kdim, gs, sym, dtype, cfg):
    from core.kernels import w4_words

    q = _layer(n, kdim, bits, gs, sym)
    x = _x(1, kdim, dtype)
    for grouped in (True, False):  # partials summed per group where groups allow it, and a scale per word
        for bias in (q.bias, None):
            y = w4_words.gemv(x, *_args(q)[:5], n, bias, config={**(cfg or {}), "GROUPED": grouped})
            assert y.dtype == dtype and y.shape == (1, n)
            ref = _oracle(x, q) - (0 if bias is not None else q.bias.float())
            assert _rel(y, ref) < _tol(dtype)


def test_words_default_tiles_follow_the_sweep():
    pytest.importorskip("triton")
    from core.kernels import w4_words

    rule = w4_words.default_gemv_config
    assert rule(14336, 4096) == {"ROWS": 16, "BN": 4, "BKW": 512, "num_warps": 4, "num_stages": 1}  # gate/up
    assert rule(4096, 14336) == {"ROWS": 16, "BN": 4, "BKW": 256, "num_warps": 2, "num_stages": 1}  # down: 7 chunks
    assert rule(4096, 4096)["ROWS"] == 8 and rule(1024, 4096)["ROWS"] == 8
    assert rule(576, 576)["BKW"] == 128  # a short row is not padded to 512 words
    pairs = {"gate/up": rule(14336, 4096, 4, True), "down": rule(4096, 14336, 4, True), "q/o": rule(4096, 4096, 4, True)}
    assert pairs["gate/up"] == {"ROWS": 32, "BN": 8, "BKW": 512, "num_warps": 8, "num_stages": 1}
    assert pairs["down"] == {"ROWS": 32, "BN": 8, "BKW": 256, "num_warps": 4, "num_stages": 1}
    assert pairs["q/o"]["ROWS"] == 8 and pairs["q/o"]["num_warps"] == 8


@interp
def test_interp_words_refuse_what_they_cannot_read():
    from core.kernels import w4_words

    x = _x(1, 202, torch.float16)
    odd = _layer(8, 202, 4, 64, True)  # 101 bytes per row: not whole words
    with pytest.raises(ValueError, match="whole 32-bit words"):
        w4_words.gemv(x, *_args(odd)[:5], 8)
    q = _layer(8, 576, 4, 36, True)  # groups of 4.5 words
    with pytest.raises(ValueError, match="groups of whole words"):
        w4_words.gemv(_x(1, 576, torch.float16), *_args(q)[:5], 8)
    with pytest.raises(ValueError, match="4/8-bit rows"):
        w4_words.gemv(_x(1, 576, torch.float16), *_args(_layer(8, 576, 3, 64, True))[:5], 8)
    with pytest.raises(ValueError, match="one row"):
        w4_words.gemv(_x(2, 576, torch.float16), *_args(_layer(8, 576, 4, 64, True))[:5], 8)
    with pytest.raises(ValueError, match="multiple of BN"):
        w4_words.gemv(_x(1, 576, torch.float16), *_args(_layer(8, 576, 4, 64, True))[:5], 8,
                      config={"ROWS": 6, "BN": 4})


@interp
def test_interp_kernels_without_bias_and_poisoned_output(k):
    q = _layer(20, 576, 4, 128, False, bias=False)
    x = _x(2, 576, torch.float16)
    ref = _oracle(x, q)
    for y in (k.gemv(x, *_args(q), None, config={"BN": 16, "UNROLL": 1}),
              k.gemm(x, *_args(q), None, config={"BM": 16, "BN": 16, "BK": 128, "FOLD": True}),
              k.gemm(x, *_args(q), None, config={"BM": 16, "BN": 16, "BK": 128, "FOLD": False})):
        assert _rel(y, ref) < 2e-3  # outputs come from torch.empty: every element must have been written


@interp
@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (4, None, True), (8, 64, False)])
def test_interp_dequantize_kernel_matches_reference(k, bits, gs, sym):
    q = _layer(19, 201, bits, gs, sym)
    w = k.dequantize(q.packed, q.scales, q.zeros, q.bits, q.group_size, q.in_features, torch.float16, bn=16)
    assert torch.equal(w, q.qweight.dequantize(torch.float16))
    # the interpreter casts float32 -> bf16 by truncation (the GPU rounds to nearest): within one bf16 step
    w = k.dequantize(q.packed, q.scales, q.zeros, q.bits, q.group_size, q.in_features, torch.bfloat16, bn=16)
    torch.testing.assert_close(w.float(), q.qweight.dequantize(torch.float32), rtol=2 ** -7, atol=0)


@interp
@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant+cublas", "gemv_words"])
def test_interp_quant_matmul_forced_paths_keep_leading_dims(k, path):
    q = _layer(24, 256, 4, 64, False)
    x = _x(6, 256, torch.float16).view(2, 3, 256)
    if path == "gemv":
        x = x[:1, :2]
    if path == "gemv_words":
        x = x[:1, :1]
    y = quant_matmul(x, q, path=path)
    assert y.shape == (*x.shape[:-1], 24)
    assert _rel(y.reshape(-1, 24), _oracle(x.reshape(-1, 256), q)) < 2e-3


@interp
def test_interp_launchers_refuse_tiles_that_straddle_groups(k):
    q = _layer(24, 256, 4, 64, False)
    x = _x(2, 256, torch.float16)
    with pytest.raises(ValueError):
        k.gemm(x, *_args(q), None, config={"BM": 16, "BN": 16, "BK": 128})
    with pytest.raises(ValueError):
        k.gemv(x, *_args(q), None, config={"BN": 16, "BKB": 64})


@interp
def test_interp_supported_agrees_with_dispatch_rule(k):
    for bits in (2, 3, 4, 5, 8):
        for kdim in (64, 99, 576):
            for gs in (8, 16, 24, 32, 48, 64, 96, 100, 128, kdim):
                gs = min(gs, kdim)
                ok = bits in dispatch.KERNEL_BITS and dispatch._group_ok(bits, gs, kdim)
                assert k.supported(bits, gs, kdim) == ok, (bits, kdim, gs)


# --- dispatch, no triton needed ------------------------------------------------------------------------------

def _fake_x(m, dtype=torch.bfloat16, cuda=True, kdim=256, requires_grad=False):
    return SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(m, kdim), requires_grad=requires_grad,
                           device=SimpleNamespace(index=0))


def _fake_q(bits=4, gs=128, kdim=256, cuda=True, offset=0):
    row = -(-kdim * bits // 8)  # packed bytes per row
    packed = SimpleNamespace(is_cuda=cuda, shape=(8, row), dim=lambda: 2, stride=lambda d=None: (row, 1)[d],
                             storage_offset=lambda: offset)
    return SimpleNamespace(packed=packed, bits=bits, group_size=gs, in_features=kdim, bias=None)


def test_dispatch_choices(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    # M = 1, 4-bit rows of whole 32-bit words, groups of whole words: the word-reading GEMV
    assert kernel_for(_fake_x(1), _fake_q()) == "gemv_words"
    assert kernel_for(_fake_x(1), _fake_q(gs=48)) == "gemv_words"  # 6 words per group: it divides
    assert kernel_for(_fake_x(1, kdim=200), _fake_q(gs=64, kdim=200)) == "gemv_words"  # 100 bytes per row
    assert kernel_for(_fake_x(1, kdim=202), _fake_q(gs=64, kdim=202)) == "gemm"  # 101 bytes: not whole words
    assert kernel_for(_fake_x(1), _fake_q(offset=2)) == "gemm"  # a view that does not start on a word
    assert kernel_for(_fake_x(1), _fake_q(bits=8)) == "gemv_words"
    assert kernel_for(_fake_x(1), _fake_q(bits=8, gs=36)) == "gemv_words"  # 9 words per group
    assert kernel_for(_fake_x(1), _fake_q(bits=8, gs=30)) == "reference"  # 7.5 words per group: no kernel
    transposed = _fake_q()
    transposed.packed.stride = lambda d=None: (1, 8)[d]  # a column-major buffer: no kernel reads it
    assert kernel_for(_fake_x(1), transposed) == "reference"
    monkeypatch.setattr(dispatch, "GEMV_MAX_M", 4)  # the shipped value (0) turns gemv off: test the rule itself
    assert kernel_for(_fake_x(2), _fake_q()) == "gemv"
    assert kernel_for(_fake_x(4), _fake_q()) == "gemv"
    assert kernel_for(_fake_x(5), _fake_q()) == "gemm"
    monkeypatch.setattr(dispatch, "GEMV_MAX_M", 0)
    assert kernel_for(_fake_x(2), _fake_q()) == "gemm"
    assert kernel_for(_fake_x(dispatch.DOT_MAX_M), _fake_q(bits=8)) == "gemm"
    assert kernel_for(_fake_x(dispatch.DOT_MAX_M + 1), _fake_q()) == "dequant+cublas"
    assert kernel_for(_fake_x(16, torch.float16), _fake_q(gs=32)) == "gemm"
    assert kernel_for(_fake_x(16, kdim=99), _fake_q(gs=99, kdim=99)) == "gemm"  # per-channel, odd K
    # everything else keeps the reference path
    assert kernel_for(_fake_x(1, cuda=False), _fake_q(cuda=False)) == "reference"
    assert kernel_for(_fake_x(1, torch.float32), _fake_q()) == "reference"
    assert kernel_for(_fake_x(1), _fake_q(bits=3)) == "reference"
    assert kernel_for(_fake_x(2), _fake_q(gs=48)) == "reference"  # 4-bit tiles need groups of a multiple of 32
    assert kernel_for(_fake_x(2), _fake_q(bits=8, gs=24)) == "reference"
    assert kernel_for(_fake_x(0), _fake_q()) == "reference"
    assert kernel_for(_fake_x(1, requires_grad=True), _fake_q()) == "reference"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert kernel_for(_fake_x(1), _fake_q()) == "reference"


def test_quantlinear_on_cpu_takes_the_reference_path(monkeypatch):
    q = _layer(24, 576, 4, 128, False)
    x = _x(3, 576, torch.bfloat16)
    assert kernel_for(x, q) == "reference"
    monkeypatch.setitem(sys.modules, "core.kernels.w4a16", None)  # importing the Triton module would now fail
    y = q(x)
    ref = F.linear(x, q.qweight.dequantize(torch.bfloat16), q.bias.to(torch.bfloat16))
    assert torch.equal(y, ref) and torch.equal(reference_matmul(x, q), ref)
    assert torch.equal(quant_matmul(x, q), ref)


def test_failing_kernel_falls_back_to_reference_once(monkeypatch, caplog):
    q = _layer(24, 256, 4, 64, True)
    x = _x(2, 256, torch.float16)
    broken = SimpleNamespace(gemv=lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no GPU here")))
    monkeypatch.setitem(sys.modules, "core.kernels.w4a16", broken)
    monkeypatch.setattr("core.kernels.w4a16", broken, raising=False)
    monkeypatch.setattr(dispatch, "_failed", set())
    y = quant_matmul(x, q, path="gemv")
    assert torch.equal(y, reference_matmul(x, q))
    assert ("gemv", None, 4, torch.float16) in dispatch._failed
    assert "failed" in caplog.text


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,kdim", [(7, 300), (3, 2048), (1, 5)])
def test_interp_per_token_fp8_quantization_matches_reference(m, kdim, dtype):
    from core.kernels.fp8_quant import per_token_fp8
    from core.quant.w8a8 import quantize_per_token_fp8

    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, kdim, generator=g) * torch.logspace(-3, 3, kdim)).to(dtype)
    if m > 1:
        x[1] = 0  # an all-zero row gets scale 1
    q, s = per_token_fp8(x)
    q_ref, s_ref = quantize_per_token_fp8(x)
    assert torch.equal(s, s_ref)
    # Triton's interpreter emulates the float32 -> FP8 conversion inexactly (up to a binade off for ~1 % of values),
    # so here only the row, the scale and the magnitude are checked. On the GPU the codes must be exact:
    # core.quant.w8a8.fp8_kernel_ok refuses the kernel at first use otherwise, and benchmarks/gpu_fp8_prefill.py
    # checks every shape it times.
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0.5, atol=2 ** -9)


def test_importing_kernels_pulls_no_app_dependency():
    code = ("import sys, core.quant.linear, core.kernels; "
            "bad = [m for m in ('triton', 'streamlit', 'bitsandbytes', 'gguf', 'plotly') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_words_bf16_pair_constants():
    """The PTX of the bf16-pair word dot (GPU only) rests on three constants: 0x4300 | c is bf16 128 + c, and its
    FMA by one (0x3F80) plus -136 (0xC308) gives c - 8 exactly, in both halves of a pair."""
    pytest.importorskip("triton")
    import inspect
    import re

    from core.kernels import w4_words

    src = inspect.getsource(w4_words._word_dot_bf16x2.fn)
    consts = {name: int(v, 16) for name, v in re.findall(r"mov\.b32 (\w+), (0x[0-9A-Fa-f]+);", src)}

    def halves(word):
        bits = [(word >> sh) & 0xFFFF for sh in (0, 16)]
        return [torch.tensor([b - (b >> 15) * 65536], dtype=torch.int16).view(torch.bfloat16).item() for b in bits]

    assert halves(consts["one"]) == [1.0, 1.0] and halves(consts["neg"]) == [-136.0, -136.0]
    magic = int(re.search(r"lop3\.b32 v, \$1, 0x000F000F, (0x[0-9A-F]+), 0xEA", src).group(1), 16)
    for c in range(16):
        word = magic | c | (c << 16)  # what the lop3 makes of codes (c, c)
        v = torch.tensor(halves(word), dtype=torch.bfloat16)
        assert torch.equal(v * 1.0 + (-136.0), torch.tensor([c - 8.0, c - 8.0], dtype=torch.bfloat16))
