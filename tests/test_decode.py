"""The static-cache decode loop (core.measure.decode) against transformers' generate, the latency
measurement's static path on CPU, and the GPU decode benchmark's CPU smoke mode."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import models
from core.measure.decode import StaticDecoder, decode
from core.measure.latency import measure_latency

ROOT = Path(__file__).resolve().parent.parent


def _varied_llama(attn="sdpa"):
    """A tiny random Llama whose greedy output is not one repeated token (large init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, initializer_range=0.3,
                      tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _generate(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)  # no stop, no EOS suppression: plain greedy
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(models.resolve(str(tiny_model_dir)))


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_equals_generate_on_tiny_model(tiny, batch):
    ids = torch.randint(0, tiny.config.vocab_size, (batch, 10), generator=torch.Generator().manual_seed(batch))
    toks, t = decode(tiny, ids, 8)
    assert torch.equal(toks, _generate(tiny, ids, 8))
    assert len(t["step_ms"]) == 7 and t["prefill_ms"] > 0 and t["timer"] == "perf_counter" and t["mode"] == "eager"


@pytest.mark.parametrize("attn,batch", [("sdpa", 1), ("sdpa", 2), ("eager", 2)])
def test_decode_equals_generate_with_varied_tokens(attn, batch):
    model = _varied_llama(attn)
    ids = torch.randint(0, 300, (batch, 12), generator=torch.Generator().manual_seed(1))
    ref = _generate(model, ids, 16)
    assert len(set(ref[0].tolist())) > 4  # a telling case: the output is not one repeated token
    toks, _ = decode(model, ids, 16)
    assert torch.equal(toks, ref)


def test_decoder_reuse_and_shorter_prompt():
    """One decoder (one cache) serves several runs: stale slots from a longer run are masked out."""
    model = _varied_llama()
    g = torch.Generator().manual_seed(2)
    long_ids, short_ids = torch.randint(0, 300, (1, 20), generator=g), torch.randint(0, 300, (1, 6), generator=g)
    dec = StaticDecoder(model, 1, 40)
    a, _ = dec.run(long_ids, 12)
    b, _ = dec.run(short_ids, 12)
    assert torch.equal(a, _generate(model, long_ids, 12)) and torch.equal(b, _generate(model, short_ids, 12))
    with pytest.raises(ValueError):
        dec.run(long_ids, 60)  # does not fit the cache


def test_decode_with_quantized_linears():
    from types import SimpleNamespace

    from core.quant.linear import quantize_model_rtn

    model = _varied_llama()
    quantize_model_rtn(model, SimpleNamespace(bits=4, group_size=32, symmetric=True, skip=["lm_head"]))
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(3))
    toks, _ = decode(model, ids, 8)
    assert torch.equal(toks, _generate(model, ids, 8))


def test_latency_static_path_on_cpu_keeps_the_keys(tiny):
    prompt = torch.randint(0, tiny.config.vocab_size, (16,), generator=torch.Generator().manual_seed(1))
    lat = measure_latency(tiny, prompt, decode_tokens=4, batch_sizes=[1, 2], warmup=1, repeats=2, static_decode=True)
    dyn = measure_latency(tiny, prompt, decode_tokens=4, batch_sizes=[1, 2], warmup=1, repeats=2)
    assert set(dyn) <= set(lat)
    assert lat["decode_ms"]["n"] == 2 * 4 and lat["prefill_ms"]["n"] == 2
    assert 0 < lat["decode_ms"]["median"] <= lat["decode_ms"]["p90"]
    assert [t["batch"] for t in lat["throughput"]] == [1, 2] and all(t["tokens_per_s"] > 0 for t in lat["throughput"])
    assert lat["decode_loop"] == "static_cache+eager" and lat["timer"] == "perf_counter" and lat["card"] is None
    assert lat["gpu_kernels"] is None and dyn["gpu_kernels"] is None
    assert lat["static_vs_dynamic_token_agreement"] == 1.0 and lat["warnings"] == []
    assert dyn["decode_loop"] == "dynamic_cache_eager" and dyn["warnings"] == []


def test_gpu_decode_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_decode.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_decode.py"), "--device", "cpu", "--tiny",
                        "--compile-configs", "bf16", "--out", str(out)], check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["runs"]
    assert {row["config"] for row in rows} == {"bf16", "w4a16", "fp8"}
    assert all("error" not in row for row in rows), [row.get("error") for row in rows]
    for row in rows:
        assert row["decode_tokens_per_s"] > 0 and row["cost_model"]["preset"]["decode_ms"] > 0
        assert row["tokens_equal_generate"] is True
    assert res["summary"]["bf16_b1_roofline_fraction"] > 0
    for row in res["compiled"]:  # torch.compile'd step (falls back, with a warning, where compile is unavailable)
        assert "error" in row or row["tokens_equal_uncompiled"] is True


def test_grouped_decode_attention_equals_repeated_kv():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from core.measure.decode import grouped_decode_sdpa

    g = torch.Generator().manual_seed(0)
    b, kvh, rep, length, d = 2, 2, 3, 20, 16
    q = torch.randn(b, kvh * rep, 1, d, generator=g)
    k, v = torch.randn(b, kvh, length, d, generator=g), torch.randn(b, kvh, length, d, generator=g)
    mask = torch.zeros(1, 1, 1, length)
    mask[..., 13:] = torch.finfo(torch.float32).min
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = rep, True
    called = []

    def orig(*a, **kw):
        called.append(1)
        return sdpa_attention_forward(*a, **kw)

    got, _ = grouped_decode_sdpa(orig, module, q, k, v, mask, scaling=d ** -0.5)
    plain = torch.nn.Module()
    plain.num_key_value_groups, plain.is_causal = 1, True
    ref, _ = sdpa_attention_forward(plain, q, torch.repeat_interleave(k, rep, 1), torch.repeat_interleave(v, rep, 1),
                                    mask, scaling=d ** -0.5)
    assert not called and got.shape == ref.shape == (b, 1, kvh * rep, d)
    torch.testing.assert_close(got, ref)
    grouped_decode_sdpa(orig, module, torch.randn(b, kvh * rep, 4, d), k, v, None)  # a prefill: not ours
    assert called


def test_decode_attention_kernel_failure_falls_back_to_sdpa_once(monkeypatch, caplog):
    """The CUDA decode attention kernel raising (e.g. it does not compile on some GPU) is logged once; SDPA answers
    that call and every later one on the device (mocked kernel: the kernel itself is tested in test_kernels)."""
    pytest.importorskip("triton")
    from core.kernels import decode_attention
    from core.measure import decode as dm

    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(decode_attention, "decode_attention", broken)
    monkeypatch.setattr(dm, "_attention_failed", set())
    q, kv, mask = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 20, 16), torch.zeros(1, 1, 1, 20)
    assert dm._decode_kernel(q, kv, kv, mask[..., :10], None) is None and calls == []  # unsupported: not tried
    with caplog.at_level("WARNING"):
        assert dm._decode_kernel(q, kv, kv, mask, None) is None
        assert dm._decode_kernel(q, kv, kv, mask, None) is None
    assert calls == [1] and "decode attention kernel failed" in caplog.text


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_decode_equals_generate_with_w8a8_layers(scheme):
    """Per-token activation quantization sees the same tokens in the static loop as in generate (reference path)."""
    from core.quant.w8a8 import quantize_model_w8a8

    model = _varied_llama()
    quantize_model_w8a8(model, scheme)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    toks, _ = decode(model, ids, 16)
    assert torch.equal(toks, _generate(model, ids, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [5000, 128256, 4096 * 3 + 17])
def test_greedy_token_is_the_first_maximum(dtype, vocab):
    """The two-stage argmax gives Tensor.argmax's index, ties included: within a chunk, across chunks, and in
    the padded last chunk."""
    from core.measure.decode import ARGMAX_CHUNK, greedy_token

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g).to(dtype)
    logits[1, [7, 8]] = 50.0  # tie inside one chunk
    logits[2, [ARGMAX_CHUNK + 3, vocab - 1, 2 * ARGMAX_CHUNK]] = 50.0  # ties across chunks, one in the last
    logits[3, vocab - 1] = 60.0  # the maximum in the (padded) last chunk
    got = greedy_token(logits)
    assert got.shape == (4, 1)
    assert torch.equal(got, logits.argmax(-1, keepdim=True))
