"""Quantization math against plain float64 references, on random (never all-zero) weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.quant import (
    QuantLinear,
    fake_quantize,
    module_bytes,
    pack_bits,
    packed_size,
    quantize_model_rtn,
    quantize_rtn,
    relative_error,
    unpack_bits,
)
from core.recipe import BnbStep, RTNStep


def rand_weight(out, n, seed=0, scale=0.02, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * scale
    if outliers:
        w[:, ::17] *= 4  # some outlier columns, as in real LLM weights
    return w


def tiny_llama(tie=True, seed=0, intermediate=96):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 5, 7, 13, 64, 1001])
def test_pack_roundtrip(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (3, numel), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_size(numel, bits))
    assert torch.equal(unpack_bits(packed, bits, numel), codes)
    assert torch.equal(unpack_bits(pack_bits(codes[1], bits), bits, numel), codes[1])  # 1-D too


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_small_codes_same_bytes_as_wide_words(bits):
    """The uint8 fast path of 1/2/4-bit packing gives the bytes of the general path (int64 words)."""
    codes = torch.randint(0, 2**bits, (5, 77), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    k = 8 // bits
    c = torch.nn.functional.pad(codes.long(), (0, -77 % k)).reshape(5, -1, k)
    expected = (c << (torch.arange(k) * bits)).sum(-1).to(torch.uint8)
    assert torch.equal(pack_bits(codes, bits), expected)
    # codes handed over as a transposed view (GPTQ builds them column by column): same bytes, rows contiguous,
    # the input untouched (the CUDA kernels read each packed row as contiguous bytes)
    codes_t = codes.t().contiguous().t()
    before = codes_t.clone()
    packed = pack_bits(codes_t, bits)
    assert torch.equal(packed, expected) and packed.is_contiguous() and torch.equal(codes_t, before)


def test_pack_layout_is_dense():
    assert torch.equal(pack_bits(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4), torch.tensor([0x21, 0x43]).byte())
    assert packed_size(8, 3) == 3 and packed_size(9, 3) == 6 and packed_size(4, 2) == 1 and packed_size(5, 8) == 5
    assert packed_size(8, 7) == 7 and packed_size(8, 1) == 1


# ---------------------------------------------------------------- RTN vs a float64 loop

def fp16_ceil(s: torch.Tensor) -> torch.Tensor:
    h = s.half()
    up = torch.nextafter(h, torch.full_like(h, math.inf))
    return torch.where(h.double() < s, up, h).double()


def reference_rtn(w, bits, group_size, symmetric):
    """Group by group: returns (w_hat, scales) in float64."""
    w = w.double()
    n = w.shape[1]
    g = group_size or n
    w_hat, scales = torch.empty_like(w), []
    qmax = 2**bits - 1
    for c0 in range(0, n, g):
        seg = w[:, c0:c0 + g]  # the last group is just shorter
        if symmetric:
            scale = seg.abs().amax(1) / (2 ** (bits - 1) - 1)
        else:
            lo, hi = seg.amin(1).clamp(max=0), seg.amax(1).clamp(min=0)
            scale = (hi - lo) / qmax
        scale = fp16_ceil(torch.where(scale == 0, torch.ones_like(scale), scale))
        zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else torch.round(-lo / scale).clamp(0, qmax)
        q = (torch.round(seg / scale[:, None]) + zero[:, None]).clamp(0, qmax)
        w_hat[:, c0:c0 + g] = (q - zero[:, None]) * scale[:, None]
        scales.append(scale)
    return w_hat, torch.stack(scales, 1)


SHAPES = [(16, 576, 128), (24, 100, 32), (16, 128, None), (8, 128, 64), (8, 40, 1000)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("out,n,group", SHAPES)
def test_rtn_matches_reference(bits, symmetric, out, n, group):
    w = rand_weight(out, n, seed=bits + n)
    qw = quantize_rtn(w, bits, group, symmetric)
    ref, ref_scales = reference_rtn(w, bits, group, symmetric)
    n_groups = math.ceil(n / (group or n))
    assert qw.scales.shape == (out, n_groups) and qw.scales.dtype == torch.float16
    assert (qw.zeros is None) == symmetric
    assert qw.group_size == min(group or n, n)
    assert torch.equal(qw.scales.double(), ref_scales)
    torch.testing.assert_close(qw.dequantize(torch.float64), ref, rtol=0, atol=1e-9)
    codes = qw.codes()
    assert codes.shape == (out, n) and int(codes.max()) < 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_at_most_half_a_step(bits, symmetric):
    w = rand_weight(32, 100, seed=3)
    qw = quantize_rtn(w, bits, 32, symmetric)
    step = qw.scales.float().repeat_interleave(32, 1)[:, :100]
    assert ((w - qw.dequantize()).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_int8_per_channel_error_below_1pct():
    w = rand_weight(64, 256, seed=5, outliers=False)
    assert relative_error(w, fake_quantize(w, 8, None, True)) < 0.01


@pytest.mark.parametrize("symmetric", [True, False])
def test_more_bits_less_error(symmetric):
    w = rand_weight(64, 256, seed=6)
    errs = [relative_error(w, fake_quantize(w, b, 64, symmetric)) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_zero_group_is_exact_and_finite():
    w = rand_weight(4, 64, seed=7)
    w[1] = 0
    w_hat = quantize_rtn(w, 4, 32, False).dequantize()
    assert torch.isfinite(w_hat).all() and (w_hat[1] == 0).all()


def test_fake_quantize_keeps_dtype():
    w = rand_weight(8, 64).bfloat16()
    assert fake_quantize(w, 4, 32).dtype == torch.bfloat16


# ---------------------------------------------------------------- QuantLinear

def test_packed_bytes():
    qw = quantize_rtn(rand_weight(64, 128), 4, None, True)
    assert qw.packed.numel() == 4096 and qw.nbytes == 4096 + 64 * 2
    qa = quantize_rtn(rand_weight(64, 128), 4, 32, False)
    assert qa.nbytes == 4096 + 64 * 4 * 2 + 64 * 4
    q3 = quantize_rtn(rand_weight(64, 576), 3, 128, True)
    assert q3.packed.shape == (64, 216) and q3.scales.shape == (64, 5)
    lin = nn.Linear(128, 64, bias=False)
    assert module_bytes(QuantLinear.from_linear(lin, qa)) == qa.nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_forward_is_linear_with_dequantized_weight(dtype):
    lin = nn.Linear(100, 24)
    with torch.no_grad():
        lin.weight.copy_(rand_weight(24, 100, seed=8))
    qw = quantize_rtn(lin.weight, 4, 32, False)
    q = QuantLinear.from_linear(lin, qw)
    x = torch.randn(3, 5, 100).to(dtype)
    expected = F.linear(x, qw.dequantize(dtype), lin.bias.to(dtype))
    assert torch.equal(q(x), expected)
    assert "bits=4" in repr(q) and "group_size=32" in repr(q)


def test_quantlinear_state_dict_and_cast():
    lin = nn.Linear(100, 24)
    q = QuantLinear.from_linear(lin, quantize_rtn(lin.weight, 3, 32, False))
    sd = q.state_dict()
    assert set(sd) == {"packed", "scales", "zeros", "bias"}
    fresh = QuantLinear(100, 24, 3, 32, False, bias=True)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 100)
    assert torch.equal(fresh(x), q(x))
    fresh.to(torch.bfloat16)
    assert fresh.scales.dtype == torch.float16 and fresh.packed.dtype == torch.uint8
    assert fresh.bias.dtype == torch.bfloat16


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def test_quantize_model_rtn_tiny_llama():
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
    emb = model.model.embed_tokens.weight.detach().clone()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    calls = []
    records = quantize_model_rtn(model, RTNStep(bits=8), progress=lambda *a: calls.append(a))
    assert len(records) == n_linear - 1 and calls[-1] == ("rtn", len(records), len(records))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(records)
    r = records[0]
    assert set(r) == {"name", "shape", "bits", "group_size", "rel_error", "bytes", "orig_bytes"}
    assert r["bits"] == 8 and r["group_size"] == r["shape"][1] and r["rel_error"] < 0.01 and r["bytes"] < r["orig_bytes"]
    with torch.no_grad():
        out = model(x).logits
    assert rel_diff(out, ref) < 0.02
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantize_tied_lm_head_keeps_embedding_float():
    model = tiny_llama(tie=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
    records = quantize_model_rtn(model, RTNStep(bits=8, skip=[]))
    assert records[-1]["name"] == "lm_head" and isinstance(model.lm_head, QuantLinear)
    model.tie_weights()  # must not re-tie a float weight onto the quantized head
    assert isinstance(model.lm_head, QuantLinear) and "weight" not in dict(model.lm_head.named_parameters())
    assert torch.equal(model.model.embed_tokens.weight, emb)
    with torch.no_grad():
        assert rel_diff(model(x).logits, ref) < 0.02


def test_model_state_dict_roundtrip():
    step = RTNStep(bits=4, group_size=32, symmetric=False)
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    quantize_model_rtn(a, step)
    quantize_model_rtn(b, step)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_module_bytes_counts_tied_once_and_shrinks():
    model = tiny_llama(tie=True)
    params = {id(p): p for p in model.parameters()}.values()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    before = module_bytes(model)
    assert before == sum(p.numel() * p.element_size() for p in params) + buffers
    records = quantize_model_rtn(model, RTNStep(bits=4, group_size=32))
    saved = sum(r["orig_bytes"] - r["bytes"] for r in records)
    assert module_bytes(model) == before - saved


# ---------------------------------------------------------------- bitsandbytes

def _require(mode):
    from core.quant.bnb import bnb_status

    s = bnb_status()
    if not s[mode]:
        pytest.skip(f"bitsandbytes {mode} unavailable on this CPU: {s['detail']}")


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_bnb_tiny_linear(mode):
    _require(mode)
    import bitsandbytes as bnb

    from core.quant.bnb import dequantize_bnb_weight

    lin = nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(rand_weight(64, 128, seed=9, outliers=False))
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0)
    else:
        q = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type=mode)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu").eval()
    w_hat = dequantize_bnb_weight(q)
    assert relative_error(lin.weight, w_hat) < (0.01 if mode == "int8" else 0.15)
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert rel_diff(q(x), lin(x)) < (0.03 if mode == "int8" else 0.2)
        assert rel_diff(q(x), F.linear(x, w_hat.float(), lin.bias)) < 0.02


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """Saved tiny Llamas: 'aligned' has every in_features a multiple of 64 (bnb's 4-bit block), 'unaligned' not."""
    out = {}
    for kind, inter in [("aligned", 128), ("unaligned", 96)]:
        d = tmp_path_factory.mktemp(kind)
        model = tiny_llama(tie=True, intermediate=inter)
        model.save_pretrained(d)
        out[kind] = d, model
    return out


@pytest.mark.parametrize("step", [BnbStep(mode="int8"), BnbStep(mode="nf4", double_quant=True), BnbStep(mode="fp4")],
                         ids=["int8", "nf4dq", "fp4"])
def test_load_with_bnb(saved_tiny, step):
    _require(step.mode)
    from core.quant.bnb import bnb_layer_records, load_with_bnb

    d, ref_model = saved_tiny["aligned"]
    model = load_with_bnb(d, step, "fp32", device="cpu")
    records = bnb_layer_records(model, ref_model)
    assert len(records) == 14 and all(r["bits"] == (8 if step.mode == "int8" else 4) for r in records)
    assert all(r["rel_error"] < (0.01 if step.mode == "int8" else 0.15) for r in records), records
    assert module_bytes(model) == module_bytes(ref_model) - sum(r["orig_bytes"] - r["bytes"] for r in records)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():  # inference mode: bnb may repack 4-bit weights for its CPU kernel here
        out, ref = model(x).logits, ref_model(x).logits
    assert rel_diff(out, ref) < (0.02 if step.mode == "int8" else 0.15)
    after = bnb_layer_records(model, ref_model)
    assert all(abs(a["rel_error"] - b["rel_error"]) < 0.01 for a, b in zip(records, after))
    assert module_bytes(model) < module_bytes(ref_model)


def test_bnb_4bit_unaligned_layers(saved_tiny):
    _require("nf4")
    from core.errors import UnsupportedError
    from core.quant.bnb import bnb_layer_records, bnb_status, load_with_bnb

    d, ref_model = saved_tiny["unaligned"]
    if not bnb_status()["4bit_unaligned"]:
        with pytest.raises(UnsupportedError, match="not a multiple of 64"):
            load_with_bnb(d, BnbStep(mode="nf4"), "fp32", device="cpu")
    else:
        model = load_with_bnb(d, BnbStep(mode="nf4"), "fp32", device="cpu")
        assert all(r["rel_error"] < 0.15 for r in bnb_layer_records(model, ref_model))
