"""Roofline cost model (core/measure/costmodel.py) and its page. Expected values are worked out by
hand from the formulas (the arithmetic is written out), not by calling the same code twice."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.measure import costmodel as cm
from core.recipe import parse_experiment

APP = str(Path(__file__).resolve().parent.parent / "app.py")
L8 = cm.PRESET_MODELS["Llama-3-8B"]
H100 = cm.PRESET_HARDWARE["H100 SXM"]
BF16 = cm.PRESET_SETTINGS["bf16"]

# Llama-3-8B by hand: per layer q,o 4096x4096, k,v 1024x4096, gate/up/down 14336x4096
L8_LINEAR = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)  # 6,979,321,856
L8_EMB = 128256 * 4096                                                   # 525,336,576 (and as much lm_head)
L8_NORMS = (2 * 32 + 1) * 4096


# -- shapes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params", [
    ("SmolLM2-135M", 134_515_008), ("Llama-3-8B", 8_030_261_248), ("Llama-3-70B", 70_553_706_496),
    ("Qwen2.5-7B", 7_615_616_512),
])
def test_preset_param_counts_match_published(name, params):
    assert cm.param_counts(cm.PRESET_MODELS[name])["total"] == params


def test_shape_from_transformers_configs():
    import transformers as T

    llama = T.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    assert cm.shape_from_config(llama, name="Llama-3-8B") == L8
    # published parameter counts of the real checkpoints
    assert cm.param_counts(cm.shape_from_config(T.GPT2Config()))["total"] == 124_439_808  # gpt2
    opt = T.OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=50272,
                      max_position_embeddings=2048, word_embed_proj_dim=768)
    assert cm.param_counts(cm.shape_from_config(opt))["total"] == 125_239_296  # facebook/opt-125m
    assert cm.param_counts(cm.shape_from_config(T.MistralConfig()))["total"] == 7_241_732_096  # Mistral-7B
    gemma = T.GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                          num_key_value_heads=1, head_dim=256, vocab_size=256000)
    g = cm.shape_from_config(gemma)
    assert (g.head_dim, g.kv_heads, g.tied) == (256, 1, True)
    assert cm.param_counts(g)["total"] == 2_506_172_416  # gemma-2b
    phi = T.PhiConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=51200, tie_word_embeddings=False)
    assert cm.param_counts(cm.shape_from_config(phi))["total"] == 2_779_683_840  # phi-2


def test_shape_from_plain_dict_and_checkpoint_dir(tmp_path):
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 32}
    s = cm.shape_from_config(gpt2)
    assert (s.hidden, s.intermediate, s.layers, s.kv_heads, s.head_dim, s.gated_mlp) == (64, 256, 2, 4, 16, False)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True}))
    s = cm.shape_for_model(str(tmp_path))
    assert (s.hidden, s.kv_heads, s.head_dim, s.tied) == (64, 2, 16, True)
    # 2 layers x (q, o 64x64; k, v 32x64; gate, up, down 96x64) + tied 300x64 embedding + 5 norms of 64
    assert cm.param_counts(s)["total"] == 2 * (2 * 4096 + 2 * 2048 + 3 * 6144) + 19200 + 5 * 64
    with pytest.raises(ValueError, match="hidden_size"):
        cm.shape_from_config({"model_type": "llama", "num_hidden_layers": 2})
    assert cm.shape_for_model("smollm2-135m") == cm.PRESET_MODELS["SmolLM2-135M"]


# -- bytes ----------------------------------------------------------------------------------------
def test_bytes_per_weight_by_format():
    s = cm.PRESET_SETTINGS
    assert cm.bytes_per_weight(s["int4 g128 (W4A16)"]) == 0.5 + 2 / 128
    assert cm.bytes_per_weight(s["int4 g128 asym (W4A16)"]) == 0.5 + 3 / 128  # + uint8 zero point
    assert cm.bytes_per_weight(s["int3 g128 (W3A16)"]) == 3 / 8 + 2 / 128
    assert cm.bytes_per_weight(s["int2 g64 (W2A16)"]) == 2 / 8 + 2 / 64
    assert cm.bytes_per_weight(s["int8 per-channel (W8A16)"], 4096) == 1 + 2 / 4096
    assert cm.bytes_per_weight(s["W8A8 int8"], 4096) == cm.bytes_per_weight(s["FP8 W8A8"], 4096) == 1 + 2 / 4096
    assert cm.bytes_per_weight(s["fp32"]) == 4 and cm.bytes_per_weight(BF16) == 2
    assert cm.bytes_per_weight(s["NF4 (bnb, block 64)"]) == 0.5 + 4 / 64
    assert cm.bytes_per_weight(s["NF4 (bnb, block 64, double quant)"]) == pytest.approx(0.5 + (1 + 4 / 256) / 64)
    assert cm.bytes_per_weight(s["2:4 sparse bf16"]) == 0.5 * 2 + 1 / 8
    assert cm.bytes_per_weight(s["50% unstructured bf16 (bitmask)"]) == 0.5 * 2 + 1 / 8
    # a group size that does not divide the width: ceil(100 / 64) = 2 groups per row
    assert cm.linear_bytes(cm.weight_only(4, 64), 10, 100) == 10 * 100 / 2 + 10 * 2 * 2


def test_llama3_8b_weight_bytes():
    assert cm.weight_bytes(L8, BF16)["total"] == 2 * 8_030_261_248  # 16.06 GB
    assert cm.weight_bytes(L8, BF16)["total"] / 1e9 == pytest.approx(16.06, abs=0.005)
    # int4 g128: linears at 0.5 + 2/128 bytes, embedding + lm_head + norms stay bf16
    int4 = cm.weight_bytes(L8, cm.PRESET_SETTINGS["int4 g128 (W4A16)"])["total"]
    assert int4 == L8_LINEAR * (0.5 + 2 / 128) + 2 * (2 * L8_EMB + L8_NORMS)
    # a decode step reads everything but the (untied) embedding table
    assert cm.weight_bytes(L8, BF16)["read_per_step"] == 2 * (L8_LINEAR + L8_EMB + L8_NORMS)


def test_tied_lm_head_is_read_as_the_embedding():
    smol = cm.PRESET_MODELS["SmolLM2-135M"]
    w = cm.weight_bytes(smol, cm.float_setting("fp32"))
    assert w["total"] == w["read_per_step"] == 4 * 134_515_008
    q = cm.weight_bytes(smol, cm.weight_only(8, None))
    q_head = cm.weight_bytes(smol, cm.Setting(**{**vars(cm.weight_only(8, None)), "quantize_lm_head": True}))
    # quantizing a tied head unties it: float embedding + int8 head (49152 x 576 + one fp16 scale per row)
    assert q_head["total"] - q["total"] == 49152 * 576 + 49152 * 2


def test_kv_cache_bytes():
    assert cm.kv_bytes_per_token(L8, 2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert cm.kv_cache_bytes(L8, BF16, 4, 1000) == 131072 * 4 * 1000
    assert cm.kv_bytes_per_token(cm.PRESET_MODELS["SmolLM2-135M"], 4) == 2 * 30 * 3 * 64 * 4


# -- latency ----------------------------------------------------------------------------------------
BW = 3350e9 * 0.8      # H100 achievable bytes/s
BF16_F = 989.5e12 * 0.6  # H100 achievable bf16 FLOP/s


def test_decode_batch1_memory_bound_and_value():
    e = cm.estimate(L8, BF16, H100, batch=1, prompt_len=1, gen_tokens=1)
    assert e.decode_bound == "memory"
    read = 2 * (L8_LINEAR + L8_EMB + L8_NORMS) + 131072 * 1.5  # weights + KV at context 1 + 1/2
    assert e.decode_ms == pytest.approx(read / BW * 1e3, rel=1e-9)  # ~5.60 ms
    assert e.decode_ms == pytest.approx(5.60, abs=0.01)


def test_decode_becomes_compute_bound_and_crossover():
    # FLOP/s / BW x bytes per param / 2 = 593.7e12 / 2.68e12 x 2 / 2 ~= 221.5
    hand = BF16_F / BW * 2 / 2
    assert cm.crossover_batch(L8, BF16, H100) == pytest.approx(hand, rel=1e-3)
    assert cm.estimate(L8, BF16, H100, 160, 1, 1).decode_bound == "memory"
    big = cm.estimate(L8, BF16, H100, 320, 1, 1)
    assert big.decode_bound == "compute"
    flops = 2 * (L8_LINEAR + L8_EMB) * 320 + 4 * 32 * 320 * 1.5 * 4096
    assert big.decode_ms == pytest.approx(flops / BF16_F * 1e3, rel=1e-9)
    # FP8 W8A8 halves the bytes AND doubles the rate: same crossover; W4A16 quarters the linears' bytes at
    # the bf16 rate, so it turns compute-bound ~3x sooner (bf16 embedding/lm_head keep it above 1/4)
    assert cm.crossover_batch(L8, cm.PRESET_SETTINGS["FP8 W8A8"], H100) == pytest.approx(hand, rel=0.02)
    assert hand / 4 < cm.crossover_batch(L8, cm.PRESET_SETTINGS["int4 g128 (W4A16)"], H100) < hand / 3
    # at a long context the KV reads (151 MB per sequence) outgrow the FLOPs: never compute-bound
    assert cm.crossover_batch(L8, BF16, H100, context=1152) == math.inf


CAL = cm.PRESET_HARDWARE["H100 SXM (slimlm kernels, measured)"]


def test_kernel_format_keys():
    assert cm.kernel_format(BF16) == "dense"
    assert cm.kernel_format(cm.weight_only(4, 128)) == "int4"
    assert cm.kernel_format(cm.weight_only(4, 64, symmetric=False)) == "int4-asym"
    assert cm.kernel_format(cm.weight_only(8, None)) == "int8"
    assert cm.kernel_format(cm.w8a8("fp8")) == "w8a8-fp8"
    assert cm.kernel_format(cm.w8a8("int8")) == "w8a8-int8"
    for unmeasured in (cm.nf4(), cm.sparse_24(), cm.unstructured_50(), cm.weight_only(3, 128)):
        assert cm.kernel_format(unmeasured) == ""


def test_measured_bandwidth_interpolates_in_log_batch():
    hw = replace(H100, kernel_bw=(("int4", 1, 0.4), ("int4", 16, 0.2), ("dense", 4, 0.7)))
    assert cm.measured_bw_fraction(hw, "int4", 1) == 0.4
    assert cm.measured_bw_fraction(hw, "int4", 4) == pytest.approx(0.3)  # halfway in log2 between 1 and 16
    assert cm.measured_bw_fraction(hw, "int4", 256) == 0.2  # the nearest measured batch outside the range
    assert cm.measured_bw_fraction(hw, "dense", 1) == 0.7
    assert cm.measured_bw_fraction(hw, "fp8", 1) is None
    assert cm.measured_bw_fraction(H100, "dense", 1) is None  # the plain preset is a pure roofline


def test_overhead_saving_applies_to_its_format_and_batch_only():
    hw = replace(H100, layer_overhead_us=20.0, overhead_saving_us=(("int4", 1, 12.5), ("int8", 1, 30.0)))
    assert cm.layer_overhead_us(hw, "int4", 1) == 7.5
    assert cm.layer_overhead_us(hw, "int4", 2) == 20.0  # the epilogues run at batch 1 only
    assert cm.layer_overhead_us(hw, "dense", 1) == 20.0
    assert cm.layer_overhead_us(hw, "int8", 1) == 0.0  # never below zero
    w4, ms = cm.weight_only(4, 128), lambda h, b: cm.estimate(L8, cm.weight_only(4, 128), h, b, 128, 64).decode_ms
    plain = replace(hw, overhead_saving_us=())
    assert ms(plain, 1) - ms(hw, 1) == pytest.approx(32 * 12.5e-3, rel=1e-9)
    assert ms(plain, 4) == ms(hw, 4)
    assert cm.estimate(L8, BF16, plain, 1, 128, 64).decode_ms == cm.estimate(L8, BF16, hw, 1, 128, 64).decode_ms
    assert cm.kernel_format(w4) == "int4"


def test_calibrated_decode_by_hand():
    w4 = cm.weight_only(4, 128)
    wb = cm.weight_bytes(L8, w4)
    kv = 131072 * 1.5
    peak = 3350e9
    lin = wb["linear"] / (peak * 0.620)
    rest = (wb["read_per_step"] - wb["linear"]) / (peak * 0.789)
    e = cm.estimate(L8, w4, CAL, batch=1, prompt_len=1, gen_tokens=1)
    overhead = CAL.layer_overhead_us - 12.7  # the 4-bit GEMV's epilogues at batch 1 (overhead_saving_us)
    assert e.decode_ms == pytest.approx((lin + rest + kv / BW + 32 * overhead * 1e-6) * 1e3, rel=1e-9)
    assert e.notes == []
    # the plain H100 profile is the roofline alone; the calibrated one is slower for every measured format
    for s in (BF16, w4, cm.w8a8("fp8")):
        assert cm.estimate(L8, s, CAL, 1, 128, 64).decode_ms > cm.estimate(L8, s, H100, 1, 128, 64).decode_ms
    # an unmeasured format keeps the roofline's bandwidth efficiency, plus the overhead, and says so
    nf4 = cm.nf4()
    e = cm.estimate(L8, nf4, CAL, 1, 1, 1)
    assert e.decode_ms == pytest.approx(cm.estimate(L8, nf4, H100, 1, 1, 1).decode_ms + 32 * CAL.layer_overhead_us * 1e-3, rel=1e-9)
    assert any("no measurement" in n for n in e.notes)


def test_prefill():
    e = cm.estimate(L8, BF16, H100, batch=1, prompt_len=2048, gen_tokens=1)
    flops = 2 * L8_LINEAR * 2048 + 2 * L8_EMB + 2 * 32 * 2048**2 * 4096  # linears, last logits, causal attention
    assert e.prefill_bound == "compute"
    assert e.prefill_ms == pytest.approx(flops / BF16_F * 1e3, rel=1e-9)  # ~50 ms
    assert cm.estimate(L8, BF16, H100, 1, 1, 1).prefill_bound == "memory"


def test_hardware_without_fp8_falls_back_with_a_note():
    a100 = cm.PRESET_HARDWARE["A100 80GB"]
    e = cm.estimate(L8, cm.PRESET_SETTINGS["FP8 W8A8"], a100, 64, 2048, 1)
    assert any("no fp8" in n for n in e.notes)
    assert a100.flops("fp8") == a100.flops("bf16") == 312e12 * 0.6


def test_max_batch_and_fit():
    usable = 80e9 * 0.9 - 2 * 8_030_261_248
    act1 = (2 * 4096 + 4096 + 2 * 1024 + 2 * 14336) * 2 + 128256 * 4  # prefill activations of a 1-token prompt
    assert cm.max_batch(L8, BF16, H100, 1, 4095) == math.floor(usable / (131072 * 4096 + act1)) == 104
    assert cm.max_batch(L8, BF16, H100, 1, 8191) == 52
    sizes = [cm.max_batch(L8, BF16, H100, p, 256) for p in (256, 1024, 4096, 16384)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    e = cm.estimate(L8, BF16, H100, 105, 1, 4095)
    assert e.max_batch == 104 and not e.fits
    big = cm.estimate(cm.PRESET_MODELS["Llama-3-70B"], BF16, cm.PRESET_HARDWARE["L4"], 1, 128, 128)
    assert big.max_batch == 0 and not big.fits


def test_cost():
    assert cm.cost_per_million_tokens(3.6, 1000) == pytest.approx(1.0)  # 3.6 $/h / 3.6e6 tokens/h
    assert cm.cost_per_million_tokens(2.0, 0) == math.inf
    e = cm.estimate(L8, BF16, H100, 8, 512, 128)
    assert e.tokens_per_s == pytest.approx(8 * 128 / (e.prefill_ms / 1e3 + 128 * e.decode_ms / 1e3))
    assert e.cost_per_million == pytest.approx(3.0 / (3600 * e.tokens_per_s) * 1e6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch size"):
        cm.estimate(L8, BF16, H100, 0, 128, 128)
    with pytest.raises(ValueError, match="bandwidth"):
        cm.estimate(L8, BF16, cm.Hardware("x", "gpu", 0, 1, 1, 1, 1), 1, 1, 1)


# -- measured points ----------------------------------------------------------------------------------
def _metrics(decode_ms=21.0, device="cpu", gpu=None):
    return {
        "latency": {"device": device, "prompt_len": 64, "decode_tokens": 16,
                    "prefill_ms": {"median": 189.0, "p90": 200.0}, "decode_ms": {"median": decode_ms, "p90": 25.0},
                    "throughput": [{"batch": 1, "tokens_per_s": 1000 / decode_ms, "step_ms_median": decode_ms},
                                   {"batch": 4, "tokens_per_s": 4000 / 30.0, "step_ms_median": 30.0}]},
        "env": {"device": device, "gpu": gpu, "cpu": "Test CPU"},
    }


def _add(store, steps=(), metrics=None, status="done", dtype="fp32"):
    rid = store.create_run(parse_experiment({"dtype": dtype, "steps": list(steps),
                                             "measure": {"prompt_len": 64, "decode_tokens": 16}}))
    store.update(rid, status=status, metrics=metrics)
    return rid


def test_setting_for_experiment():
    exp = parse_experiment({"steps": [{"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False}]})
    s = cm.setting_for_experiment(exp)
    assert (s.act, s.compute, s.name) == ("fp32", "fp32", "RTN int4 g128 asym")
    assert cm.bytes_per_weight(s) == 0.5 + 3 / 128 and not s.quantize_lm_head
    s = cm.setting_for_experiment(parse_experiment({"dtype": "bf16", "steps": [{"method": "w8a8", "scheme": "fp8"}]}))
    assert (s.compute, s.act, s.bits) == ("fp8", "bf16", 8)
    s = cm.setting_for_experiment(parse_experiment({"steps": [{"method": "bnb", "mode": "nf4", "compute_dtype": "bf16"}]}))
    assert (s.act, s.group_size, s.scale_bytes) == ("bf16", 64, 4.0)
    s = cm.setting_for_experiment(parse_experiment({"steps": [{"method": "rtn", "bits": 8, "skip": []}]}))
    assert s.quantize_lm_head


def test_measured_points_and_ratio(store):
    base = _add(store, metrics=_metrics())
    _add(store, [{"method": "rtn", "bits": 4, "group_size": 64}], status="failed")  # no metrics: skipped
    gpu = _add(store, metrics=_metrics(5.0, device="cuda:0", gpu="NVIDIA H100 80GB HBM3"))
    points = cm.measured_points(store.list())
    assert sorted((p["run_id"], p["batch"]) for p in points) == sorted([(base, 1), (base, 4), (gpu, 1), (gpu, 4)])
    p1 = next(p for p in points if p["run_id"] == base and p["batch"] == 1)
    assert (p1["decode_ms"], p1["prefill_ms"], p1["device"], p1["prompt_len"]) == (21.0, 189.0, "cpu", 64)
    assert p1["setting"].act == "fp32"
    assert next(p for p in points if p["run_id"] == base and p["batch"] == 4)["prefill_ms"] is None

    # a CPU with round numbers: 100 GB/s, practically infinite FLOP/s, efficiency 1
    hw = cm.Hardware("test cpu", "cpu", 100, 1e9, 1e9, 64, 1.0, bw_efficiency=1.0, flop_efficiency=1.0)
    rows = cm.compare_measured(points, hw, cm.shape_for_model)
    assert {r["run_id"] for r in rows} == {base}  # only the CPU run matches a CPU profile
    r1 = next(r for r in rows if r["batch"] == 1)
    kv_tok = 2 * 30 * 3 * 64 * 4  # SmolLM2 fp32 KV per token
    est = (4 * 134_515_008 + kv_tok * (64 + 16 / 2)) / 100e9 * 1e3  # weights + KV at the mean context
    assert r1["est_decode_ms"] == pytest.approx(est, rel=1e-9)  # 5.414 ms
    assert r1["decode_ratio"] == pytest.approx(21.0 / est, rel=1e-9)
    assert r1["prefill_ratio"] == pytest.approx(189.0 / ((4 * 134_515_008 + kv_tok * 64) / 100e9 * 1e3), rel=1e-9)
    r4 = next(r for r in rows if r["batch"] == 4)
    assert r4["est_decode_ms"] == pytest.approx((4 * 134_515_008 + 4 * kv_tok * 72) / 100e9 * 1e3, rel=1e-9)

    assert {r["run_id"] for r in cm.compare_measured(points, H100, cm.shape_for_model)} == {gpu}
    assert cm.compare_measured(points, cm.PRESET_HARDWARE["A100 80GB"], cm.shape_for_model) == []


# -- page ---------------------------------------------------------------------------------------------
def _page():
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.switch_page("pages/cost_model.py").run()
    assert not at.exception, at.exception
    return at


def _table(at):
    return at.dataframe[0].value.set_index("Setting")


def test_page_renders_and_hardware_changes_numbers(store):
    at = _page()
    t = _table(at)
    assert list(t.index) == ["bf16", "int4 g128 (W4A16)", "FP8 W8A8"]
    assert len(at.get("plotly_chart")) == 1
    assert "No stored run has latency measurements" in " ".join(c.value for c in at.caption)
    h100 = t.loc["bf16", "Decode (ms/token)"]
    at.selectbox(key="cm_hw").set_value("A100 80GB").run()
    assert not at.exception
    a100 = _table(at).loc["bf16", "Decode (ms/token)"]
    assert a100 / h100 == pytest.approx(3350 / 2039, rel=0.02)  # memory-bound: ratio of bandwidths
    at.number_input(key="cm_hw_bandwidth_gbs_A100 80GB").set_value(4078.0).run()  # double it
    assert _table(at).loc["bf16", "Decode (ms/token)"] == pytest.approx(a100 / 2, rel=0.02)
    assert any("no fp8" in i.value for i in at.info)
    # the profile calibrated to slimlm's kernels: slower than the H100 roofline, says what it was measured on,
    # and its per-layer overhead is editable (0 removes it)
    name = "H100 SXM (slimlm kernels, measured)"
    at.selectbox(key="cm_hw").set_value(name).run()
    assert not at.exception
    cal = _table(at).loc["bf16", "Decode (ms/token)"]
    assert cal > h100 * 1.2
    assert any("Calibrated to slimlm's" in c.value for c in at.caption)
    assert any("int4 at batch 1: 12.7 µs less" in c.value for c in at.caption)
    at.number_input(key=f"cm_hw_layer_overhead_us_{name}").set_value(0.0).run()
    overhead_ms = cm.PRESET_HARDWARE[name].layer_overhead_us * 1e-3
    assert _table(at).loc["bf16", "Decode (ms/token)"] == pytest.approx(cal - 30 * overhead_ms, rel=1e-3)  # 30 layers


def test_page_error_when_context_does_not_fit(store):
    at = _page()
    at.selectbox(key="cm_model").set_value("Llama-3-70B")
    at.selectbox(key="cm_hw").set_value("L4").run()
    assert not at.exception
    assert "does not fit on L4 even at batch 1" in " ".join(e.value for e in at.error)
    assert set(_table(at)["Fits"]) == {"no"}


def test_page_custom_setting_and_measured_points(store):
    _add(store, metrics=_metrics())
    at = _page()
    at.checkbox(key="cm_custom_on").check().run()
    at.number_input(key="cm_custom_bits").set_value(3)
    at.number_input(key="cm_custom_group").set_value(32).run()
    assert "int3 g32 (W3A16)" in _table(at).index
    assert "No stored run was measured on a device matching **H100 SXM**" in " ".join(c.value for c in at.caption)
    at.radio(key="cm_model_src").set_value("Stored run")
    at.selectbox(key="cm_hw").set_value("CPU server (32 cores, 8x DDR5-4800)").run()
    assert not at.exception
    assert "baseline fp32 (this run)" in _table(at).index  # the run's own setting is compared too
    m = at.dataframe[1].value
    assert list(m["Batch"]) == [1, 4] and (m["Decode measured / estimate"] > 1).all()
    assert "SmolLM2-135M" in " ".join(c.value for c in at.caption)
    at.button(key="cm_probe").click().run()  # times this machine and selects the measured profile
    assert not at.exception
    assert at.selectbox(key="cm_hw").value.startswith("This machine")
    assert at.number_input(key=f"cm_hw_bw_efficiency_{at.selectbox(key='cm_hw').value}").value == 1.0
    assert list(at.dataframe[1].value["Batch"]) == [1, 4]


# -- headless: python -m core cost --------------------------------------------------------------------
def test_cli_cost_table_json_and_measured(store, capsys):
    from core.__main__ import main

    assert main(["cost", "--model", "Llama-3-8B", "--setting", "bf16", "--batch", "1", "--prompt", "1",
                 "--tokens", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"] == "H100 SXM" and out["model"] == "Llama-3-8B"
    assert out["estimates"][0]["decode_ms"] == pytest.approx(
        cm.estimate(L8, BF16, H100, 1, 1, 1).decode_ms, rel=1e-12)  # the same function the page calls
    # the calibrated profile, a table, and its note for an unmeasured format
    assert main(["cost", "--model", "Llama-3-8B", "--hardware", "H100 SXM (slimlm kernels, measured)",
                 "--setting", "int4 g128 (W4A16)", "--setting", "NF4 (bnb, block 64)"]) == 0
    text = capsys.readouterr().out
    assert "calibrated: slimlm's" in text and "int4 g128 (W4A16)" in text and "no measurement for NF4" in text
    # batch sweep: one row per power of two for each setting
    assert main(["cost", "--setting", "bf16", "--sweep", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["estimates"]
    assert [r["batch"] for r in rows[:4]] == [1, 2, 4, 8] and len(rows) >= 11
    # a run measured on this CPU shows up beside its estimate on a CPU profile
    rid = _add(store, metrics=_metrics(decode_ms=21.0))
    assert main(["--store", str(store.path), "cost", "--hardware", "CPU server (32 cores, 8x DDR5-4800)",
                 "--measured"]) == 0
    text = capsys.readouterr().out
    assert f"measured run {rid}" in text and "decode 21.000 ms" in text


def test_cli_cost_errors_are_clear(store, capsys):
    from core.__main__ import main

    assert main(["cost", "--hardware", "H900"]) == 2
    assert "Unknown hardware profile 'H900'" in capsys.readouterr().err
    assert main(["cost", "--setting", "int5"]) == 2
    assert "Unknown setting 'int5'" in capsys.readouterr().err
    assert main(["cost", "--model", "/nonexistent/checkpoint"]) == 2
    assert "Cannot read the shape of model" in capsys.readouterr().err
    assert main(["cost", "--batch", "0"]) == 2
    assert "batch size must be an integer >= 1" in capsys.readouterr().err
    assert main(["cost", "--list"]) == 0
    assert "H100 SXM (slimlm kernels, measured)" in capsys.readouterr().out


def test_compiled_step_profile_differs_only_in_the_layer_overhead():
    comp = cm.PRESET_HARDWARE["H100 SXM (slimlm kernels, compiled step)"]
    assert comp.kernel_bw == CAL.kernel_bw and comp.layer_overhead_us < CAL.layer_overhead_us
    assert comp.overhead_saving_us == ()  # the compiled step's residual adds are Inductor's, and it has no PDL
    for s in (BF16, cm.weight_only(4, 128), cm.w8a8("fp8")):
        gap = cm.estimate(L8, s, CAL, 1, 128, 64).decode_ms - cm.estimate(L8, s, comp, 1, 128, 64).decode_ms
        graph = cm.layer_overhead_us(CAL, cm.kernel_format(s), 1)
        assert gap == pytest.approx(32 * (graph - comp.layer_overhead_us) * 1e-3, rel=1e-9)
