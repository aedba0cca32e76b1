"""AWQ: the scale and clipping searches on random matrices (float32 vs a float64 reference of the output error),
folding through the calibration pass (the float model unchanged), and AWQ through the whole engine."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from core.calibrate import run_calibrated
from core.quant.awq import (
    AWQObserver,
    _group_blocks,
    awq_scale,
    fake_quantize_rtn,
    group_errors,
    no_clip,
    quantize_clipped,
    quantize_model_awq,
    search_clip,
    search_scale,
)
from core.quant.linear import QuantLinear, quantize_model_rtn
from core.quant.rtn import quantize_rtn
from core.quant.w8a8 import smoothing_groups
from core.recipe import RecipeError, parse_experiment, parse_step
from tests.test_gptq import _tiny


def _data(out=48, inp=96, tokens=1024, outliers=(3, 50, 77), factor=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(tokens, inp, generator=g) * torch.linspace(0.5, 2, inp)
    X[:, list(outliers)] *= factor
    return W, X


def _gram(X):
    return X.T @ X / X.shape[0]


def _err(X, W, w_hat) -> float:
    """||X W^T - X W_hat^T||^2 in float64."""
    X, W, w_hat = X.double(), W.double(), w_hat.double()
    return ((X @ W.T - X @ w_hat.T) ** 2).sum().item()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 40, None])
def test_scale_search_beats_rtn_with_outlier_channels(sym, group):
    W, X = _data()
    s, info = search_scale([W[:20], W[20:]], _gram(X), X.abs().mean(0), 4, group, sym)
    rtn = quantize_rtn(W, 4, group, sym).dequantize()
    gs = 96 if group is None else group
    awq = fake_quantize_rtn(W * s, 4, gs, sym) / s  # (X / s) Q(W s)^T == X (Q(W s) / s)^T
    assert 0 < info["alpha"] < 1 and len(info["losses"]) == 20
    assert _err(X, W, awq) < 0.7 * _err(X, W, rtn)
    # the search's loss (per token, from the Gram matrix) is the float64 output error
    assert info["loss"] * X.shape[0] == pytest.approx(_err(X, W, awq), rel=1e-3)
    assert info["rtn_loss"] * X.shape[0] == pytest.approx(_err(X, W, rtn), rel=1e-3)
    assert info["loss"] == min(info["losses"])


def test_alpha_zero_is_rtn_and_scale_is_normalised():
    x_mean = torch.tensor([0.0, 0.1, 1.0, 50.0])
    assert torch.equal(awq_scale(x_mean, 0.0), torch.ones(4))
    s = awq_scale(x_mean, 0.5)
    assert torch.isfinite(s).all() and float(s.max() * s.min()) == pytest.approx(1.0)
    W, X = _data(outliers=())
    s, info = search_scale([W], _gram(X), X.abs().mean(0), 4, 32, True, n_grid=1)
    assert info["alpha"] == 0 and torch.equal(s, torch.ones(96))
    # without outliers the search may keep RTN, but never does worse
    s, info = search_scale([W], _gram(X), X.abs().mean(0), 4, 32, True)
    assert info["loss"] <= info["rtn_loss"]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 40, None])
def test_clipping_never_increases_a_groups_error(sym, group):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 96, generator=g) ** 3  # heavy tails: clipping pays off
    _, X = _data(inp=96)
    H = _gram(X)
    ratio, err = search_clip(W, H, 3, group, sym)
    qw, rtn = quantize_clipped(W, 3, group, sym, ratio), quantize_rtn(W, 3, group, sym)
    # same packed storage as RTN
    assert (qw.group_size, qw.scales.shape, qw.scales.dtype, qw.packed.shape) == \
           (rtn.group_size, rtn.scales.shape, rtn.scales.dtype, rtn.packed.shape)
    assert (qw.zeros is None) == sym and qw.n_groups == (1 if group is None else math.ceil(96 / group))
    gs = qw.group_size
    blocks = _group_blocks(H, gs)
    e_clip, e_rtn = group_errors(W - qw.dequantize(), blocks), group_errors(W - rtn.dequantize(), blocks)
    assert torch.allclose(e_clip, err, rtol=1e-4, atol=1e-6)
    assert (e_clip <= e_rtn * (1 + 1e-5) + 1e-7).all()
    assert e_clip.sum() < 0.95 * e_rtn.sum() and (ratio < 1).any() and ratio.min() >= 0.5
    # per-group error d^T H_gg d is that group's share of the output error, in float64
    o, k = 5, qw.n_groups - 1
    cols = slice(k * gs, min((k + 1) * gs, 96))
    d = (W - qw.dequantize()).double()[o, cols]
    assert e_clip[o, k].item() == pytest.approx(((X.double()[:, cols] @ d) ** 2).mean().item(), rel=1e-3)


def test_ratio_one_is_rtn_and_fake_quantization_matches_storage():
    W, _ = _data()
    W[0, :40] = 0  # an all-zero group
    for group, sym in ((32, True), (40, False), (None, True), (40, True)):
        G = 1 if group is None else math.ceil(96 / group)
        a, b = quantize_clipped(W, 4, group, sym, torch.ones(48, G)), quantize_rtn(W, 4, group, sym)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
        assert torch.equal(fake_quantize_rtn(W, 4, b.group_size, sym), b.dequantize())
    H = _gram(_data()[1])
    ratio, _ = search_clip(W, H, 3, 40, False)
    w_hat = quantize_clipped(W, 3, 40, False, ratio).dequantize()
    for r in ratio.unique().tolist():  # what the search measured for a ratio is what gets stored
        one = quantize_clipped(W, 3, 40, False, torch.full_like(ratio, r)).dequantize()
        mask = (ratio == r).repeat_interleave(40, 1)[:, :96]
        assert torch.equal(w_hat[mask], one[mask])


def test_no_clip_names():
    assert no_clip("model.layers.0.self_attn.q_proj") and no_clip("model.layers.0.self_attn.k_proj")
    assert no_clip("model.layers.0.self_attn.qkv_proj") and no_clip("transformer.h.0.attn.c_attn")
    assert not any(no_clip(f"model.layers.0.{n}") for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
                                                              "mlp.down_proj", "mlp.gate_proj", "fc1"))


# ---- through the calibration pass ----------------------------------------------------------------------------

STEP = SimpleNamespace(bits=3, group_size=16, symmetric=True, skip=["lm_head"], n_grid=20, clip=True)


def _llama_with_outliers(kv_heads=2):
    """The tiny llama with a few large norm-weight channels: activation outliers, as real LLMs have."""
    import transformers as tf

    if kv_heads == 2:
        model = _tiny("llama")
    else:
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=kv_heads, vocab_size=128)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[1, 7]] = 8.0
            layer.post_attention_layernorm.weight[[4, 20]] = 8.0
    return model


def _windows(n=4, length=32):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(1))


def _logits(model, windows):
    with torch.no_grad():
        return torch.stack([model(w[None]).logits[0] for w in windows])


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folding_keeps_the_float_model(kv_heads):
    """Scales searched and folded (norm -> q/k/v, gate/up; up -> down; v -> o without GQA), nothing quantized."""
    model = _llama_with_outliers(kv_heads)
    windows = _windows()
    ref = _logits(model, windows)
    groups = smoothing_groups(model)
    records, _ = run_calibrated(model, windows, AWQObserver(STEP, groups, quantize=False))
    scaled = {r["scale_group"] for r in records if r["alpha"]}
    assert any(g.endswith("input_layernorm") for g in scaled) and any(g.endswith("up_proj") for g in scaled)
    assert any(g.endswith("v_proj") for g in {r["scale_group"] for r in records}) == (kv_heads == 4)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    out = _logits(model, windows)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def _logit_err(model, windows, ref):
    return ((_logits(model, windows) - ref) ** 2).mean().item()


def test_awq_closer_to_float_than_rtn():
    base = _llama_with_outliers()
    windows = _windows()
    ref = _logits(base, windows)
    awq, rtn = copy.deepcopy(base), copy.deepcopy(base)
    records = quantize_model_awq(awq, STEP, windows)
    quantize_model_rtn(rtn, STEP)
    assert len(records) == 14 and all(r["method"] == "awq" and r["warning"] is None for r in records)
    assert all(isinstance(awq.get_submodule(r["name"]), QuantLinear) for r in records)
    assert records.stats["scaled_groups"] >= 4 and records.stats["tokens"] == 4 * 32
    for r in records:
        assert (r["clip_ratio_mean"] is None) == no_clip(r["name"])
    # clipping lowers each group's own error; whole outputs (cross-group terms) here too, on these seeds
    assert sum(r["out_rel_error"] for r in records) < sum(r["scaled_out_rel_error"] for r in records)
    assert sum(r["out_rel_error"] for r in records) < 0.8 * sum(r["rtn_out_rel_error"] for r in records)
    assert _logit_err(awq, windows, ref) < 0.7 * _logit_err(rtn, windows, ref)


@pytest.mark.parametrize("arch", ["gemma", "opt"])
def test_other_architectures(arch):
    """Gemma: norms x * (1 + w) cannot take the scales (only up -> down is scaled); OPT: LayerNorm with bias."""
    base = _tiny(arch)
    windows = _windows()
    ref = _logits(base, windows)
    model, rtn = copy.deepcopy(base), copy.deepcopy(base)
    records = quantize_model_awq(model, STEP, windows)
    quantize_model_rtn(rtn, STEP)
    assert all(r["method"] == "awq" and r["warning"] is None for r in records)
    groups = {r["scale_group"] for r in records if r["scale_group"]}
    if arch == "gemma":
        assert groups and all(g.endswith("up_proj") for g in groups)
    else:
        assert any(g.endswith("layer_norm") for g in groups)
    assert _logit_err(model, windows, ref) < _logit_err(rtn, windows, ref)


def test_linear_that_sees_no_tokens_and_outside_layers():
    model = _tiny("llama")
    model.model.layers[1].mlp.unused = torch.nn.Linear(32, 16)
    step = SimpleNamespace(**{**vars(STEP), "skip": []})  # lm_head too (outside the decoder layers: RTN)
    records = {r["name"]: r for r in quantize_model_awq(model, step, _windows(2, 16))}
    assert "RTN" in records["model.layers.1.mlp.unused"]["warning"]
    assert records["lm_head"]["method"] == "rtn" and "outside" in records["lm_head"]["warning"]
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.layers[1].mlp.unused, QuantLinear)


# ---- recipe, pipeline, CLI, page -----------------------------------------------------------------------------

def test_awq_step_recipe():
    exp = parse_experiment({"steps": [{"method": "awq"}]})
    (s,) = exp.steps
    assert (s.bits, s.group_size, s.symmetric, s.n_grid, s.clip, s.calibration.windows) == (4, 64, True, 20, True, 32)
    assert exp.label() == "AWQ int4 g64 sym"
    assert parse_experiment({"steps": [{"method": "awq", "bits": 3, "symmetric": False, "clip": False}]}).label() == \
        "AWQ int3 g64 asym no-clip"
    for bad in ({"bits": 1}, {"group_size": 0}, {"n_grid": 0}, {"calibration": {"windows": 0}}):
        with pytest.raises(RecipeError):
            parse_experiment({"steps": [{"method": "awq", **bad}]})
    assert parse_step("awq:bits=4,group_size=64,calibration.windows=8") == {
        "method": "awq", "bits": 4, "group_size": 64, "calibration": {"windows": 8}}


def test_awq_through_the_cli_and_pipeline(tiny_model_dir, corpus_file, tmp_path, monkeypatch, capsys):
    """`python -m core run --step awq:...` (in this process: core.__main__.main) -> pipeline -> store."""
    import json

    from core.__main__ import main

    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path))
    rc = main(["run", "--model", str(tiny_model_dir), "--corpus", str(corpus_file), "--eval-windows", "2",
               "--window-len", "32", "--no-latency", "--no-samples", "--json", "--step",
               f"awq:bits=4,group_size=32,calibration.windows=4,calibration.window_len=32,calibration.corpus={corpus_file}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "AWQ int4 g32 sym" in out.err
    m = json.loads(out.out)
    assert {r["method"] for r in m["layers"]} == {"awq"} and len(m["layers"]) == 14
    (cal,) = m["calibration"]
    assert cal["step"] == "AWQ int4 g32 sym" and cal["windows"] == 4 and cal["scaled_groups"] > 0
    assert 0 < m["accuracy"]["kl_vs_baseline"] and m["memory"]["weight_bytes"] < m["memory"]["baseline_weight_bytes"]


def test_new_experiment_page_offers_awq(tmp_path, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from core import jobs

    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path))
    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda exp, store: submitted.append(exp) or f"run{len(submitted)}")
    app = str(Path(__file__).resolve().parent.parent / "app.py")
    at = AppTest.from_file(app, default_timeout=60).run()
    at.switch_page("pages/new_experiment.py").run()
    for key in ("preset_baseline", "preset_rtn8", "preset_rtn4g64"):
        at.checkbox(key=key).uncheck()
    at.checkbox(key="preset_awq4g64").check()
    at.checkbox(key="custom_on").check().run()
    at.radio(key="custom_method").set_value("awq").run()
    at.number_input(key="custom_bits").set_value(3)
    at.number_input(key="custom_calib_windows").set_value(8)
    at.button(key="submit").click().run()
    assert not at.exception and not at.error
    assert [e.label() for e in submitted] == ["AWQ int4 g64 sym", "AWQ int3 g64 sym"]
    assert submitted[1].steps[0].calibration.windows == 8
