"""W8A8 (int8 / FP8 weights and dynamic per-token activations) and SmoothQuant, on random tensors and a
tiny random Llama."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.quant.linear import find_linears
from core.quant.memory_accounting import module_bytes
from core.quant.w8a8 import (
    FP8Linear,
    W8A8Linear,
    fold_smoothing,
    fp8_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    int_mm_ok,
    quantize_model_w8a8,
    quantize_per_channel_fp8,
    quantize_per_channel_int8,
    quantize_per_token_fp8,
    quantize_per_token_int8,
    set_fast_path,
    smooth_model,
    smoothing_groups,
    smoothquant_scales,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _tiny_llama(kv_heads=2, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=300, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n=2, length=24, seed=1):
    return torch.randint(1, 300, (n, length), generator=_gen(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def _kl(logits, ref):
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                          reduction="batchmean"))


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (3, 7, 5), (16, 24, 40), (17, 100, 96), (33, 576, 192), (5, 1536, 72)])
def test_int8_fast_path_matches_reference_exactly(m, k, n):
    g = _gen(m * k + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ref = int8_matmul_reference(a, w)
    assert ref.dtype == torch.int32
    assert torch.equal(ref, (a.long() @ w.long().t()).int())  # the integer product itself
    assert int_mm_ok("cpu")  # torch._int_mm exists and is exact on CPU in this build
    assert torch.equal(int8_matmul(a, w, fast=True), ref)


@pytest.mark.parametrize("cls", [W8A8Linear, FP8Linear])
@pytest.mark.parametrize("shape", [(1, 64, 32), (2, 9, 33, 17)])
def test_w8a8_linear_close_to_float_and_paths_agree(cls, shape):
    g = _gen(len(shape))
    *lead, k, n = shape
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(*lead, k, generator=g) + 0.1
    q = cls.from_linear(lin)
    y_fast = q(x)
    q.fast = False
    y_ref = q(x)
    assert y_fast.shape == (*lead, n)
    assert torch.equal(y_fast, y_ref) if cls is W8A8Linear else torch.allclose(y_fast, y_ref, rtol=1e-2)
    with torch.no_grad():
        assert _rel(y_ref - lin.bias, lin(x) - lin.bias) < (0.02 if cls is W8A8Linear else 0.08)


def test_int8_quantization_round_trip_bounds():
    g = _gen(2)
    w = torch.randn(48, 80, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    q, s = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and s.dtype == torch.float32
    assert q.abs().max() <= 127 and (q.abs().amax(1) == 127).all()  # each row's absmax uses the full range
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()
    x = torch.randn(7, 80, generator=g) * 3
    qx, sx = quantize_per_token_int8(x)
    assert sx.shape == (7, 1)
    assert ((qx.float() * sx - x).abs() <= sx / 2 * (1 + 1e-5)).all()
    zq, zs = quantize_per_channel_int8(torch.zeros(3, 8))  # an all-zero row must not divide by zero
    assert (zq == 0).all() and (zs == 1).all()


def test_fp8_quantization_round_trip_bounds():
    g = _gen(3)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-3, 1, 32)[:, None]
    q, s = quantize_per_channel_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (32,)
    assert torch.allclose(q.float().abs().amax(1), torch.full((32,), 448.0))
    # e4m3: 3 mantissa bits -> relative rounding error <= 2**-4; subnormals (< 2**-6) step 2**-9
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= torch.maximum(w.abs() * 2**-4, s[:, None] * 2**-10) * (1 + 1e-5)).all()
    x = torch.randn(5, 64, generator=g)
    qx, sx = quantize_per_token_fp8(x)
    assert sx.shape == (5, 1) and _rel(qx.float() * sx, x) < 0.05


def test_fp8_reference_matches_float64():
    g = _gen(4)
    (aq, a_s), (wq, w_s) = quantize_per_token_fp8(torch.randn(9, 96, generator=g)), \
        quantize_per_channel_fp8(torch.randn(40, 96, generator=g))
    exact = (aq.double() * a_s.double()) @ (wq.double() * w_s.double()[:, None]).t()
    y = fp8_matmul_reference(aq, a_s, wq, w_s)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [W8A8Linear, FP8Linear])
def test_module_bytes_and_state_dict_round_trip(cls):
    lin = nn.Linear(96, 40, bias=False)
    q = cls.from_linear(lin)
    assert module_bytes(q) == q.weight_bytes == 96 * 40 + 4 * 40
    assert module_bytes(cls.from_linear(nn.Linear(96, 40))) == 96 * 40 + 4 * 40 + 4 * 40  # + float32 bias
    fresh = cls(96, 40, bias=False)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 96, generator=_gen(5))
    assert torch.equal(fresh(x), q(x))
    half = copy.deepcopy(q).half()  # casting the model must keep codes and float32 scales
    assert half.qweight.dtype == q.qweight.dtype and half.weight_scale.dtype == torch.float32
    assert half(x.half()).dtype == torch.float16


@pytest.mark.parametrize("scheme,max_kl", [("int8", 1e-3), ("fp8", 5e-3)])
def test_quantize_model_w8a8_tiny_llama(scheme, max_kl):
    model = _tiny_llama()
    ids = _ids()
    ref = _logits(model, ids)
    emb = model.get_input_embeddings().weight.detach().clone()
    calls = []
    records = quantize_model_w8a8(model, scheme, progress=lambda *a: calls.append(a))
    assert len(records) == 2 * 7 and calls[-1] == ("w8a8", 14, 14)
    r = records[0]
    assert set(r) == {"name", "shape", "bits", "group_size", "rel_error", "bytes", "orig_bytes", "scheme"}
    assert r["bits"] == 8 and r["group_size"] is None and r["scheme"] == scheme
    assert r["bytes"] == r["shape"][0] * r["shape"][1] + 4 * r["shape"][0] and r["orig_bytes"] == 4 * r["shape"][0] * r["shape"][1]
    assert 0 < r["rel_error"] < (0.01 if scheme == "int8" else 0.05)
    assert isinstance(model.lm_head, nn.Linear) and torch.equal(model.get_input_embeddings().weight, emb)
    logits = _logits(model, ids)
    assert _kl(logits, ref) < max_kl and _rel(logits, ref) < 0.05

    again = _tiny_llama(seed=1)  # different weights, then loaded from the quantized state_dict
    quantize_model_w8a8(again, scheme)
    again.load_state_dict(model.state_dict())
    assert torch.equal(_logits(again, ids), logits)


def test_quantize_model_w8a8_rejects_unknown_scheme():
    from core.errors import UnsupportedError

    with pytest.raises(UnsupportedError):
        quantize_model_w8a8(_tiny_llama(), "int4")


def test_fold_smoothing_is_exact_for_norm_and_linear():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = _gen(6)
    norm = LlamaRMSNorm(32)
    a, b = nn.Linear(32, 16), nn.Linear(32, 24)
    ln = nn.LayerNorm(32)
    v, o = nn.Linear(20, 32), nn.Linear(32, 8)
    with torch.no_grad():
        for p in (norm.weight, ln.weight, ln.bias):
            p.copy_(torch.randn(32, generator=g))
    x = torch.randn(5, 32, generator=g)
    s = torch.rand(32, generator=g) * 10 + 0.05
    for prev, lins, inp in ((norm, [a, b], x), (ln, [a, b], x), (v, [o], torch.randn(5, 20, generator=g))):
        before = [lin(prev(inp)).detach() for lin in lins]
        fold_smoothing(prev, lins, s)
        after = [lin(prev(inp)).detach() for lin in lins]
        for y0, y1 in zip(before, after):
            assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-5)


def test_smoothquant_scales():
    act, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smoothquant_scales(act, w, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5])) and s[2] > 0  # a dead channel stays finite, > 0


def _act_absmax(model, ids) -> dict[str, torch.Tensor]:
    stats, hooks = {}, []
    for name, lin in find_linears(model):
        def hook(_m, args, name=name):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        hooks.append(lin.register_forward_pre_hook(hook))
    _logits(model, ids)
    for h in hooks:
        h.remove()
    return stats


def test_smoothing_groups_llama():
    gqa = smoothing_groups(_tiny_llama(kv_heads=2))
    assert ("model.layers.0.input_layernorm",
            ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]) in gqa
    assert ("model.layers.1.post_attention_layernorm", ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]) in gqa
    assert not any("lm_head" in names for _, names in gqa)  # logits are computed from a slice of model.norm's output
    assert ("model.layers.1.mlp.up_proj", ["model.layers.1.mlp.down_proj"]) in gqa  # gated MLP
    assert not any(p.endswith("v_proj") for p, _ in gqa)  # grouped-query attention: no v -> o folding
    assert len(gqa) == 2 * 3
    mha = smoothing_groups(_tiny_llama(kv_heads=4))
    assert ("model.layers.0.self_attn.v_proj", ["model.layers.0.self_attn.o_proj"]) in mha and len(mha) == 2 * 4


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_smooth_model_exact_in_float_and_helps_int8(kv_heads):
    model = _tiny_llama(kv_heads=kv_heads)
    with torch.no_grad():  # plant activation outlier channels, as real LLMs have
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 50
            layer.mlp.up_proj.weight[[5, 60]] *= 30
    ids = _ids()
    ref = _logits(model, ids)
    stats = _act_absmax(model, _ids(seed=2))
    emb = model.get_input_embeddings().weight.detach().clone()

    smoothed = copy.deepcopy(model)
    records = smooth_model(smoothed, stats, alpha=0.5)
    assert len(records) == 2 * (3 if kv_heads == 2 else 4)
    assert torch.equal(smoothed.get_input_embeddings().weight, emb)
    assert torch.allclose(_logits(smoothed, ids), ref, rtol=1e-4, atol=1e-4)

    plain = copy.deepcopy(model)
    quantize_model_w8a8(plain, "int8")
    quantize_model_w8a8(smoothed, "int8")
    err_plain, err_smooth = _rel(_logits(plain, ids), ref), _rel(_logits(smoothed, ids), ref)
    assert err_smooth < 0.6 * err_plain, (err_smooth, err_plain)
    fast = _logits(smoothed, ids)
    set_fast_path(smoothed, False)  # the reference integer path gives the same logits
    assert torch.equal(_logits(smoothed, ids), fast)


# --- calibrated W8A8: GPTQ rounding onto the int8 / FP8 grid, alpha search, the one-pass step ------------

def _correlated_layer(out=48, inp=80, tokens=400, seed=3):
    g = _gen(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    mix = torch.eye(inp, dtype=torch.float64) + torch.randn(inp, inp, generator=g, dtype=torch.float64) / inp**0.5
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.2, 3, inp, dtype=torch.float64)
    return W, X


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_gptq_round_onto_w8a8_grid(scheme):
    from core.quant.gptq import gptq_round
    from core.quant.w8a8 import channel_scale, quantize_with_scale

    W, X = _correlated_layer()
    H = 2 / X.shape[0] * X.T @ X
    scale = channel_scale(W, scheme)

    def grid(w):
        return quantize_with_scale(w, scale, scheme).float() * scale[:, None]

    w_hat, info = gptq_round(W, H, grid)
    rtn = grid(W)
    err = lambda q: float(torch.linalg.norm(X @ W.T - X @ q.double().T))  # noqa: E731
    assert err(w_hat) < 0.8 * err(rtn) and info["out_rel_error"] < info["rtn_out_rel_error"]
    assert torch.equal(grid(w_hat), w_hat)  # on the grid: the stored codes reproduce it exactly
    assert torch.equal(quantize_with_scale(w_hat, scale, scheme).float() * scale[:, None], w_hat)


def test_smoothed_hessian_is_the_hessian_of_smoothed_inputs():
    _, X = _correlated_layer()
    s = torch.rand(X.shape[1], generator=_gen(4), dtype=torch.float64) + 0.1
    H = X.T @ X
    assert torch.allclose(H / s[:, None] / s[None, :], (X / s).T @ (X / s))


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_search_alpha_never_worse_than_fixed_or_none(scheme):
    from core.quant.w8a8 import group_scales, search_alpha, w8a8_output_error

    g = _gen(5)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 30]] *= 40  # outlier channels
    weights = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)]
    absmax = x.abs().amax(0)
    alpha, errors = search_alpha(x, absmax, weights, scheme)
    assert errors[alpha] == min(errors.values()) and None in errors and 0.5 in errors
    assert errors[alpha] <= w8a8_output_error(x, weights, scheme, group_scales(absmax, weights, 0.5))
    if scheme == "int8":
        assert alpha is not None and errors[alpha] < 0.5 * errors[None]  # outliers: smoothing must help


def _outlier_llama():
    """A tiny Llama with activation outlier channels, as real LLMs have."""
    model = _tiny_llama(kv_heads=4)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 50
    return model


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_calibrated_w8a8_step_beats_plain(scheme):
    from core.quant.smoothquant import quantize_model_w8a8_step
    from core.recipe import W8A8Step

    model = _outlier_llama()
    ids, calib = _ids(), _ids(n=8, seed=2)
    ref = _logits(model, ids)
    plain = copy.deepcopy(model)
    quantize_model_w8a8(plain, scheme)
    step = W8A8Step(scheme=scheme, smoothquant_alpha="auto", weight_rounding="gptq", calibration={"windows": 8})
    records = quantize_model_w8a8_step(model, step, calib, "cpu")
    assert len(records) == 2 * 7 and records.stats["tokens"] == 8 * 24
    assert all(isinstance(model.get_submodule(r["name"]), FP8Linear if scheme == "fp8" else W8A8Linear) for r in records)
    assert all(r["out_rel_error"] <= r["rtn_out_rel_error"] * 1.05 for r in records)
    err, err_plain = _rel(_logits(model, ids), ref), _rel(_logits(plain, ids), ref)
    assert err < 0.7 * err_plain, (err, err_plain)
    # "auto" smooths int8 only (core.recipe.AUTO_SMOOTHING): FP8's error is relative
    assert (records.stats["smoothed_linears"] > 0) == (scheme == "int8")


@pytest.mark.parametrize("rounding", ["gptq", "rtn"])
def test_calibrated_fp8_uses_searched_scales_and_fixed_alpha_smooths(rounding):
    from core.quant.smoothquant import quantize_model_w8a8_step
    from core.recipe import W8A8Step

    model, calib, ids = _outlier_llama(), _ids(n=8, seed=2), _ids()
    ref = _logits(model, ids)
    plain = copy.deepcopy(model)
    quantize_model_w8a8(plain, "fp8")
    step = W8A8Step(scheme="fp8", smoothquant_alpha=0.5, weight_rounding=rounding, calibration={"windows": 8})
    records = quantize_model_w8a8_step(model, step, calib, "cpu")
    assert records.stats["smoothed_linears"] > 0  # a fixed alpha smooths FP8 too
    top = []
    for r in records:
        q = model.get_submodule(r["name"])
        # scale = absmax / 448 * f, f in [1, 2): each row's largest code lies in [224, 448], none clipped
        top.append(q.qweight.float().abs().amax(1))
        assert r["out_rel_error"] is not None and r["out_rel_error"] < 0.1
    top = torch.cat(top)
    assert float(top.min()) >= 224 and float(top.max()) <= 448
    assert float((top < 448).float().mean()) > 0.3  # most channels moved off absmax / 448
    assert _rel(_logits(model, ids), ref) < 0.6 * _rel(_logits(plain, ids), ref)  # vs plain round-to-nearest FP8


# --- FP8 per-channel scale search ---------------------------------------------------------------------

def _fp8_row_losses(w: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 reference: sum_j imp_j (w_ij - FP8(w_ij / scale_i) * scale_i)^2 per row."""
    w64, s64 = w.double(), scale.double()
    q = (w.float() / scale.float()[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s64[:, None]
    return ((w64 - q) ** 2 * imp.double()).sum(1)


def test_search_channel_scale_is_the_per_row_argmin_and_never_worse():
    from core.quant.w8a8 import channel_scale, search_channel_scale

    g = _gen(11)
    w = torch.randn(40, 96, generator=g) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different sizes
    w[5, 7] = 30.0  # a row with a large outlier weight
    imp = torch.rand(96, generator=g, dtype=torch.float64) ** 2 * 10 + 1e-3
    steps = 16
    scale = search_channel_scale(w, imp, "fp8", steps=steps)
    base = channel_scale(w, "fp8")
    cands = torch.stack([base * (1 + k / steps) for k in range(steps)])  # [steps, out]
    ref = torch.stack([_fp8_row_losses(w, imp, c) for c in cands])  # float64 [steps, out]
    best = ref.argmin(0)  # first minimum: the smallest factor on ties
    assert torch.equal(scale, cands[best, torch.arange(w.shape[0])])
    got = _fp8_row_losses(w, imp, scale)
    assert torch.all(got <= ref[0]) and float(got.sum()) < 0.9 * float(ref[0].sum())
    assert float((w / scale[:, None]).abs().max()) <= 448  # no clipping: absmax maps into (224, 448]
    assert float((w.abs().amax(1) / scale).min()) > 224


def test_search_channel_scale_int8_and_one_step_keep_absmax():
    from core.quant.w8a8 import channel_scale, search_channel_scale

    g = _gen(12)
    w, imp = torch.randn(24, 64, generator=g), torch.rand(64, generator=g) + 0.1
    assert torch.equal(search_channel_scale(w, imp, "int8"), channel_scale(w, "int8"))
    assert torch.equal(search_channel_scale(w, imp, "fp8", steps=1), channel_scale(w, "fp8"))


def test_fp8_scale_search_lowers_output_error_with_gptq():
    from core.quant.gptq import gptq_round
    from core.quant.w8a8 import channel_scale, quantize_with_scale, search_channel_scale

    W, X = _correlated_layer(out=96, inp=80, tokens=600, seed=13)
    H = 2 / X.shape[0] * X.T @ X

    def out_err(scale):
        q, _ = gptq_round(W, H, lambda w: quantize_with_scale(w, scale, "fp8").float() * scale[:, None])
        return float(torch.linalg.norm(X @ W.T - X @ q.double().T))

    searched = search_channel_scale(W, H.diagonal(), "fp8")
    assert out_err(searched) < 0.97 * out_err(channel_scale(W, "fp8"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_fp8_quantization_equals_the_float32_first_reference(dtype):
    """The fewer-pass per-token FP8 quantization gives exactly the codes and scales of converting to float32 first."""
    from core.quant.w8a8 import FP8, FP8_MAX, _absmax_scale, quantize_per_token_fp8

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 300, generator=g) * torch.logspace(-3, 3, 300)).to(dtype)
    x[5] = 0  # an all-zero row gets scale 1
    xf = x.float()
    s_ref = _absmax_scale(xf, FP8_MAX)
    q_ref = (xf / s_ref).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q, s = quantize_per_token_fp8(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("cls", [W8A8Linear, FP8Linear])
def test_w8a8_layers_trace_without_graph_breaks(cls):
    """The per-device kernel probes are read, not traced, under torch.compile (w8a8.probed_once): traced, the
    probe's generator and try/except broke the compiled decode step at every linear."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(64, 32))
    x = torch.randn(3, 64)
    layer(x)  # the probes run eagerly first, as in the decode loop's warm-up
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
