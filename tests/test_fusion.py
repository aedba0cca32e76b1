"""Fused norm / SiLU forwards with FP8 quantization in them (core.fusion): what gets fused, that the model is
unchanged where the kernels do not run (CPU), and that an FP8Linear uses codes attached to its input. The kernels
themselves: tests/test_kernels.py (Triton interpreter) and benchmarks/gpu_fp8_prefill.py (GPU)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from core.fusion import FUSED, _is_llama_rmsnorm, fuse_producers, rmsnorm_reference, unfuse
from core.quant.w8a8 import FUSED_CODES, FP8Linear, quantize_model_w8a8, quantize_per_token_fp8


def _tiny_llama(layers=2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


IDS = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(1))
LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")


def test_fuses_norms_feeding_linears_and_gated_mlps_and_stays_the_same_model():
    model = _tiny_llama()
    ref = _logits(model, IDS)
    fused = fuse_producers(model)
    # not model.norm: the lm_head reads a slice of its output (logits_to_keep), another tensor
    expect = [f"model.layers.{i}.{n}" for i in range(2) for n in LAYER_PARTS]
    assert sorted(fused) == sorted(expect)
    assert sorted(n for n, m in model.named_modules() if getattr(m, FUSED, False)) == sorted(expect)
    assert not any(m._slimlm_fp8 for m in model.modules() if hasattr(m, "_slimlm_fp8"))  # no FP8 readers
    assert torch.equal(_logits(model, IDS), ref)  # on CPU the modules' own forwards run

    quantize_model_w8a8(model, "fp8")
    assert sorted(fuse_producers(model)) == sorted(expect)  # idempotent; now sees the FP8 readers
    assert all(m._slimlm_fp8 for m in model.modules() if hasattr(m, "_slimlm_fp8"))
    got = _logits(model, IDS)
    plain = copy.deepcopy(model)
    unfuse(plain)
    assert not any(getattr(m, FUSED, False) for m in plain.modules())
    assert torch.equal(got, _logits(plain, IDS))
    assert set(model.state_dict()) == set(plain.state_dict())
    # a deep copy's fused forwards are bound to the copy, not to the original
    twin = copy.deepcopy(model)
    norm = twin.model.layers[0].input_layernorm
    assert norm.forward.__self__ is norm
    with torch.no_grad():
        norm.weight.mul_(2)
    assert not torch.equal(_logits(twin, IDS), got)


def test_a_module_without_a_causal_lm_forward_is_left_alone():
    seq = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    assert fuse_producers(seq) == []


def test_only_llama_style_rmsnorm_qualifies():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        llama.weight.uniform_(0.5, 1.5)
    assert _is_llama_rmsnorm(llama)
    gemma = GemmaRMSNorm(48, eps=1e-6)  # x * (1 + w): a different formula
    with torch.no_grad():
        gemma.weight.uniform_(-0.5, 0.5)
    assert not _is_llama_rmsnorm(gemma)
    x = torch.randn(3, 48)
    assert torch.equal(rmsnorm_reference(x, llama.weight, 1e-6), llama(x))


def test_fp8_linear_uses_codes_attached_to_its_input():
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(64, 24))
    x = torch.randn(2, 5, 64)
    plain = layer(x)
    tagged = x.clone()
    setattr(tagged, FUSED_CODES, quantize_per_token_fp8(x.reshape(-1, 64)))
    assert torch.equal(layer(tagged), plain)  # the same codes: the same output
    other = x.clone()
    setattr(other, FUSED_CODES, quantize_per_token_fp8(2 * x.reshape(-1, 64)))
    assert torch.allclose(layer(other), 2 * plain - layer.bias, rtol=1e-3, atol=1e-3)  # they are what is used
    layer.fast = False  # the reference path quantizes its input itself
    assert torch.equal(layer(other), plain)
