"""Merged projections (core.merge): stacking equals the separate layers for every stackable type, the stacked
tensors are shared (no second copy) and given back on unmerge, blocks whose forward would change are left alone,
and a merged model decodes the same tokens (generate, static-cache decoder, a traced step with no graph break)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.fusion import FUSED, fuse_producers, unfuse
from core.merge import MERGED, merge_projections, stack_linears, unmerge
from core.quant.linear import QuantLinear, quantize_model_rtn
from core.quant.rtn import quantize_rtn
from core.quant.w8a8 import FP8Linear, W8A8Linear

G = torch.Generator().manual_seed(0)


def _linear(n, k=72, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=G) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=G))
    return lin


def _quant(n, k=72, bits=4, group=32, symmetric=True, bias=False):
    lin = _linear(n, k, bias)
    return QuantLinear.from_linear(lin, quantize_rtn(lin.weight, bits, group, symmetric))


MAKERS = {
    "float": lambda n: _linear(n),
    "float-no-bias": lambda n: _linear(n, bias=False),
    "w4-g32-short-last-group": lambda n: _quant(n),  # 72 = 2 x 32 + 8
    "w4-asym-bias": lambda n: _quant(n, symmetric=False, bias=True),
    "w8-per-channel": lambda n: _quant(n, bits=8, group=None),
    "int8-w8a8": lambda n: W8A8Linear.from_linear(_linear(n)),
    "fp8-w8a8": lambda n: FP8Linear.from_linear(_linear(n, bias=False)),
}


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", list(MAKERS))
def test_stacked_layer_equals_the_separate_layers_and_shares_their_tensors(kind):
    mods = [MAKERS[kind](n) for n in (48, 16, 16)]
    x = torch.randn(5, 72, generator=G)
    with torch.no_grad():
        ref = torch.cat([m(x) for m in mods], dim=-1)
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
        stacked = stack_linears(mods)
        assert type(stacked) is type(mods[0]) and stacked.out_features == 80
        torch.testing.assert_close(stacked(x), ref, rtol=1e-5, atol=1e-5)
        for m, sd in zip(mods, before):  # same state, now slices of the stacked tensors
            assert m.state_dict().keys() == sd.keys()
            for k, v in m.state_dict().items():
                assert torch.equal(v, sd[k]) and _storage(v) == _storage(getattr(stacked, k))
        torch.testing.assert_close(torch.cat([m(x) for m in mods], dim=-1), ref, rtol=0, atol=0)


def test_layers_that_cannot_be_stacked_are_refused():
    assert stack_linears([_linear(8), _quant(8)]) is None  # mixed types
    assert stack_linears([_quant(8, group=32), _quant(8, group=24)]) is None
    assert stack_linears([_linear(8), _linear(8, k=64)]) is None  # other input width
    assert stack_linears([_linear(8), _linear(8, bias=False)]) is None
    hooked = _linear(8)
    hooked.register_forward_hook(lambda *a: None)
    assert stack_linears([_linear(8), hooked]) is None


def _tiny(kind="llama", layers=2):
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    dims = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128, "tie_word_embeddings": False}
    cfg = {"llama": lambda: LlamaConfig(**dims),
           "qwen3": lambda: Qwen3Config(**dims, head_dim=16),  # q_norm / k_norm on each head
           "qwen2": lambda: Qwen2Config(**dims, use_sliding_window=True, sliding_window=4, max_window_layers=1),
           "gemma2": lambda: Gemma2Config(**dims, head_dim=16)}[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norms too, so a wrong weight would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=G))
    return model


IDS = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def _generate(model, n=6):
    with torch.no_grad():
        return model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("quantized", [False, True])
def test_merged_llama_computes_the_same_and_keeps_its_state_dict(quantized):
    model = _tiny()
    if quantized:
        quantize_model_rtn(model, SimpleNamespace(bits=4, group_size=32, symmetric=True, skip=["lm_head"]))
    ref, ref_tokens = _logits(model), _generate(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_projections(model)
    assert merged == [f"model.layers.{i}.{b}" for i in range(2) for b in ("self_attn", "mlp")]
    assert merge_projections(model) == []  # idempotent
    from core.merge import merged_decoder_layers

    assert merged_decoder_layers(model) == 2  # the residual adds handed to o_proj / down_proj (adds after, on a CPU)
    attn = model.model.layers[0].self_attn
    assert type(getattr(attn, MERGED)) is type(attn.q_proj) and getattr(attn, MERGED).out_features == 64 + 2 * 32
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert len(list(model.modules())) == len(list(_tiny().modules()))  # nothing registered
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model), ref_tokens)

    unmerge(model)
    assert not any(MERGED in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    tensors = [t for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()] if t is not None]
    assert len({_storage(t) for t in tensors}) == len(tensors)  # each its own storage again
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)


def test_decoder_classes_share_the_llama_forward_that_merge_copies():
    """merge._decoder_forward is transformers' LlamaDecoderLayer.forward with the residual adds handed on: every
    class in DECODER_CLASSES must still have that same forward in the installed transformers."""
    import importlib
    import inspect

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from core.merge import DECODER_CLASSES

    for name in DECODER_CLASSES:
        arch = name.removesuffix("DecoderLayer").lower()
        cls = getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), name)
        assert inspect.getsource(cls.forward) == inspect.getsource(LlamaDecoderLayer.forward), name


def test_static_decoder_on_a_merged_model_gives_generate_tokens():
    from core.measure.decode import decode

    model = _tiny()
    merge_projections(model)
    tokens, _ = decode(model, IDS[:1], new_tokens=6, use_graph=False)
    assert torch.equal(tokens, _generate(model)[:, IDS.shape[1]:])


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_qwen_attention_merges_with_its_head_norms_and_sliding_window(kind):
    model = _tiny(kind)
    ref, ref_tokens = _logits(model), _generate(model)
    assert merge_projections(model) == [f"model.layers.{i}.{b}" for i in range(2) for b in ("self_attn", "mlp")]
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model), ref_tokens)


def test_other_attention_classes_and_a_failed_probe_stay_unmerged(monkeypatch):
    from core import merge

    model = _tiny("gemma2")  # logit soft-capping: a class not in merge.ATTENTION_CLASSES
    ref = _logits(model)
    assert merge_projections(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    attn = model.model.layers[0].self_attn
    assert MERGED not in attn.__dict__ and "forward" not in attn.__dict__
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)

    model = _tiny()  # a listed class whose merged forward would differ: the probe refuses it, and undoes the stacking
    monkeypatch.setattr(merge, "_attention_forward", lambda self, *a, **k: (torch.zeros(1), None))
    assert merge_projections(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    attn = model.model.layers[0].self_attn
    assert MERGED not in attn.__dict__ and "forward" not in attn.__dict__
    assert len({_storage(attn.q_proj.weight), _storage(attn.k_proj.weight)}) == 2  # own storage again


def test_merging_and_fusion_compose_in_either_order():
    model = _tiny()
    ref = _logits(model)
    fuse_producers(model)
    merge_projections(model)
    mlp = model.model.layers[0].mlp
    assert getattr(mlp, FUSED) and MERGED in mlp.__dict__
    unfuse(model)
    assert "forward" in mlp.__dict__  # still merged
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    fuse_producers(model)
    unmerge(model)
    assert "forward" in mlp.__dict__ and MERGED not in mlp.__dict__  # still fused
    unfuse(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)


def test_merged_step_traces_as_one_graph():
    model = _tiny()
    quantize_model_rtn(model, SimpleNamespace(bits=4, group_size=32, symmetric=True, skip=["lm_head"]))
    merge_projections(model)
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda ids: model(ids, use_cache=False).logits)(IDS)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_only_llamas_rotary_form_counts_as_standard():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from core.merge import _standard_rope

    def interleaved(q, k, cos, sin):  # GPT-J style: rotates pairs (2i, 2i + 1), not halves
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None]

    assert _standard_rope(apply_rotary_pos_emb)
    assert not _standard_rope(interleaved)


def test_a_merge_that_fails_midway_is_undone_and_reported(monkeypatch):
    from core import merge
    from core.measure import latency

    model = _tiny()
    ref = _logits(model)
    calls = []
    real = merge.stack_linears

    def third_fails(mods):
        calls.append(len(mods))
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(mods)

    monkeypatch.setattr(merge, "stack_linears", third_fails)
    gpu_kernels, merged, warnings = latency.install_gpu_forwards(model)
    assert merged == [] and gpu_kernels["merged_blocks"] == 0 and gpu_kernels["fused_modules"] > 0
    assert len(warnings) == 1 and "not merged" in warnings[0] and "out of memory" in warnings[0]
    assert not any(MERGED in m.__dict__ for m in model.modules())  # the two blocks merged before are undone
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
