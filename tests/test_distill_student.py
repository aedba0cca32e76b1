"""Distillation losses (against float64 hand computations) and the trainable student: fake quantization on the
fixed grid of QuantLinear / W8A8Linear, masks that keep pruned weights pruned, prepare -> finalize on a tiny Llama,
smaller students."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.distill.losses import (
    HiddenProjector,
    LossConfig,
    distill_loss,
    forward_kl,
    hidden_mse,
    js_divergence,
    layer_map,
    make_projector,
    next_token_ce,
    reverse_kl,
)
from core.distill.student import (
    FakeQuantLinear,
    FakeW8A8Linear,
    prepare_student,
    smaller_student,
)
from core.errors import UnsupportedError
from core.prune.sparse import SparseLinear, compress_sparse
from core.quant.linear import QuantLinear, quantize_model_rtn
from core.quant.rtn import quantize_rtn
from core.quant.w8a8 import FP8Linear, W8A8Linear, quantize_model_w8a8, quantize_with_scale
from core.recipe import RTNStep


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(seed, shape=(2, 5, 11), scale=3.0):
    return torch.randn(*shape, generator=_gen(seed)) * scale


# --- losses ------------------------------------------------------------------------------------------------

def _p64(logits, T):
    z = logits.double() / T
    p = (z - z.max(-1, keepdim=True).values).exp()
    return p / p.sum(-1, keepdim=True)


def _kl64(p, q):
    return float((p * (p.log() - q.log())).sum(-1).mean())


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_divergences_match_float64(T):
    s, t = _logits(0), _logits(1)
    ps, pt = _p64(s, T), _p64(t, T)
    m = (ps + pt) / 2
    assert float(forward_kl(s, t, T)) == pytest.approx(T**2 * _kl64(pt, ps), rel=1e-5)
    assert float(reverse_kl(s, t, T)) == pytest.approx(T**2 * _kl64(ps, pt), rel=1e-5)
    assert float(js_divergence(s, t, T)) == pytest.approx(T**2 * (_kl64(pt, m) + _kl64(ps, m)) / 2, rel=1e-5)


def test_next_token_ce_matches_float64():
    s = _logits(2)
    ids = torch.randint(0, 11, (2, 5), generator=_gen(3))
    logp = _p64(s, 1.0).log()
    ref = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert float(next_token_ce(s, ids)) == pytest.approx(float(ref), rel=1e-6)


def test_divergences_zero_for_equal_logits():
    s = _logits(4)
    for loss in (forward_kl, reverse_kl, js_divergence):
        assert abs(float(loss(s, s.clone(), 2.0))) < 1e-6


def test_js_symmetric_and_at_most_ln2():
    s, t = _logits(5, scale=50.0), _logits(6, scale=50.0)  # near one-hot, disjoint: close to the bound
    assert float(js_divergence(s, t)) == pytest.approx(float(js_divergence(t, s)), rel=1e-6)
    assert float(js_divergence(s, t)) <= math.log(2) + 1e-6
    assert float(js_divergence(s, t)) > 0.5


def test_temperature_scaling():
    s, t, T = _logits(7), _logits(8), 3.0
    for loss in (forward_kl, reverse_kl, js_divergence):
        assert float(loss(s, t, T)) == pytest.approx(T**2 * float(loss(s / T, t / T, 1.0)), rel=1e-5)


def test_divergences_reject_different_vocabularies():
    with pytest.raises(ValueError, match="same vocabulary"):
        forward_kl(_logits(0, (2, 3, 11)), _logits(1, (2, 3, 12)))


def test_layer_map():
    assert layer_map(2, 2) == [(1, 1), (2, 2)]
    assert layer_map(3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert layer_map(1, 5) == [(1, 5)]
    pairs = layer_map(4, 30)
    teacher = [t for _, t in pairs]
    assert [s for s, _ in pairs] == [1, 2, 3, 4] and teacher[-1] == 30 and teacher[0] >= 1
    assert teacher == sorted(set(teacher))
    with pytest.raises(ValueError):
        layer_map(0, 3)


def test_projector():
    same, wide = SimpleNamespace(hidden_size=64), SimpleNamespace(hidden_size=96)
    pairs = layer_map(2, 4)
    assert make_projector(same, same, pairs) is None
    proj = make_projector(same, wide, pairs)
    assert len(proj.proj) == 2 and proj(1, torch.randn(3, 64)).shape == (3, 96)
    h = torch.randn(2, 3, 8, generator=_gen(0))
    assert torch.equal(HiddenProjector(8, 8, 1)(0, h), h)  # identity at initialisation for equal widths


def test_hidden_mse_is_scale_free_and_float64_exact():
    hs = [torch.randn(2, 4, 8, generator=_gen(i)) for i in range(3)]
    ht = [torch.randn(2, 4, 8, generator=_gen(10 + i)) for i in range(3)]
    pairs = [(1, 1), (2, 2)]
    ref = sum(float(((hs[i].double() - ht[j].double()) ** 2).mean() / (ht[j].double() ** 2).mean())
              for i, j in pairs) / 2
    assert float(hidden_mse(hs, ht, pairs)) == pytest.approx(ref, rel=1e-5)
    assert float(hidden_mse([h * 10 for h in hs], [h * 10 for h in ht], pairs)) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="projector"):
        hidden_mse([torch.randn(1, 2, 4)] * 2, ht, [(1, 1)])


def test_loss_config_validate():
    LossConfig().validate()
    for bad in (LossConfig(kl=-1), LossConfig(kl=0), LossConfig(temperature=0)):
        with pytest.raises(ValueError):
            bad.validate()
    assert LossConfig(hidden=0.5).needs_hidden and not LossConfig().needs_hidden


# --- tiny models ---------------------------------------------------------------------------------------------

def _load(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _ids(model, seed=0, shape=(2, 12)):
    return torch.randint(0, model.config.vocab_size, shape, generator=_gen(seed))


def test_distill_loss_gradients_reach_student_and_projector(tiny_model_dir):
    teacher = _load(tiny_model_dir)
    torch.manual_seed(0)
    student, info = smaller_student(teacher, num_layers=1, hidden_size=32)
    assert info["init"] == "random"
    ids = _ids(teacher)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    s_out = student(ids, output_hidden_states=True)
    pairs = layer_map(1, 2)
    projector = make_projector(student.config, teacher.config, pairs)
    cfg = LossConfig(kl=1.0, reverse_kl=0.5, js=0.5, ce=0.2, hidden=1.0, temperature=2.0)
    total, parts = distill_loss(s_out, t_out, ids, cfg, projector, pairs)
    assert set(parts) == {"kl", "reverse_kl", "js", "ce", "hidden"}
    weights = {"kl": 1.0, "reverse_kl": 0.5, "js": 0.5, "ce": 0.2, "hidden": 1.0}
    assert float(total.detach()) == pytest.approx(sum(weights[k] * v for k, v in parts.items()), rel=1e-5)
    total.backward()
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert projector.proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

    # zero weights are not computed: no hidden states needed, only the positive terms reported
    _, parts = distill_loss(SimpleNamespace(logits=s_out.logits), t_out, ids, LossConfig(kl=0, ce=1.0))
    assert set(parts) == {"ce"}
    with pytest.raises(ValueError, match="output_hidden_states"):
        distill_loss(SimpleNamespace(logits=s_out.logits, hidden_states=None), t_out, ids, LossConfig(hidden=1))


# --- fake quantization ---------------------------------------------------------------------------------------

def _quant_linear(bits, group_size, symmetric, in_f=200, out_f=24, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    return QuantLinear.from_linear(lin, quantize_rtn(lin.weight, bits, group_size, symmetric))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 40, 64])  # 64 does not divide 200: a short last group
def test_fake_quant_linear_matches_quant_linear(bits, group_size, symmetric):
    ql = _quant_linear(bits, group_size, symmetric)
    fake = FakeQuantLinear.from_quant_linear(ql)
    x = torch.randn(3, 5, 200, generator=_gen(1))
    assert torch.equal(fake(x), ql.reference_forward(x))
    with torch.no_grad():
        fake.weight.add_(torch.randn(fake.weight.shape, generator=_gen(2)) * 0.02)  # several grid steps
        fake.bias.add_(0.1)
    packed = fake.to_quant_linear()
    assert isinstance(packed, QuantLinear) and packed.group_size == ql.group_size
    assert torch.equal(packed.scales, ql.scales) and (packed.zeros is None) == symmetric
    assert not torch.equal(packed.packed, ql.packed)
    assert torch.equal(fake(x), packed.reference_forward(x))


def test_fake_quant_straight_through_gradient():
    fake = FakeQuantLinear.from_quant_linear(_quant_linear(4, 64, True))
    x = torch.randn(6, 200, generator=_gen(3), requires_grad=True)
    g = torch.randn(6, 24, generator=_gen(4))
    (fake(x) * g).sum().backward()
    assert fake.weight.grad.abs().sum() > 0
    torch.testing.assert_close(fake.weight.grad, g.t() @ x.detach())  # identity through the rounding
    torch.testing.assert_close(x.grad, g @ fake.quantized_weight())


def test_fake_quant_keeps_grid_on_dtype_casts():
    fake = FakeQuantLinear.from_quant_linear(_quant_linear(4, 64, False))
    scales = fake.scales.clone()
    fake.to(torch.bfloat16)
    assert fake.scales.dtype == torch.float32 and torch.equal(fake.scales, scales)
    assert fake.zeros.dtype == torch.uint8 and fake.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [W8A8Linear, FP8Linear])
def test_fake_w8a8_round_trip(cls):
    torch.manual_seed(0)
    q = cls.from_linear(nn.Linear(64, 24))
    q.fast = False
    fake = FakeW8A8Linear.from_w8a8(q)
    x = torch.randn(3, 5, 64, generator=_gen(5), requires_grad=True)
    torch.testing.assert_close(fake(x), q(x), rtol=1e-5, atol=1e-5)
    again = fake.to_w8a8()
    assert type(again) is cls and torch.equal(again.qweight.float(), q.qweight.float())
    assert torch.equal(again.weight_scale, q.weight_scale)

    fake(x).square().sum().backward()  # straight through both the weight and the activation rounding
    assert fake.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    with torch.no_grad():
        fake.weight.add_(torch.randn(fake.weight.shape, generator=_gen(6)) * 0.02)
    packed = fake.to_w8a8()
    packed.fast = False
    assert torch.equal(packed.qweight.float(),
                       quantize_with_scale(fake.weight.detach(), q.weight_scale, cls.scheme).float())
    assert not torch.equal(packed.qweight.float(), q.qweight.float())
    torch.testing.assert_close(fake(x), packed(x), rtol=1e-5, atol=1e-5)


# --- masks ---------------------------------------------------------------------------------------------------

def _pruned_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        w = model[0].weight
        w[w.abs() <= w.abs().median()] = 0  # 50 % pruned
    return model


def _loss(model, seed=0):
    return model(torch.randn(8, 16, generator=_gen(seed))).square().mean()


def _steps(prepared, opt, n, after_step):
    for i in range(n):
        opt.zero_grad()
        _loss(prepared.model, i).backward()
        opt.step()
        if after_step:
            prepared.after_step()


def test_masks_survive_adamw_with_weight_decay():
    model = _pruned_mlp()
    w0 = model[0].weight.detach().clone()
    prepared = prepare_student(model)
    assert set(prepared.masks) == {"0"} and prepared.info()["masked_fraction"] == pytest.approx(0.5)
    opt = torch.optim.AdamW(prepared.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    _steps(prepared, opt, 5, after_step=True)
    w = model[0].weight.detach()
    assert (w[w0 == 0] == 0).all() and (w[w0 != 0] != w0[w0 != 0]).all()

    # control: without masks the same training moves the pruned weights (the check above can fail)
    model = _pruned_mlp()
    prepared = prepare_student(model, keep_masks=False)
    assert prepared.masks == {}
    _steps(prepared, torch.optim.AdamW(prepared.trainable_parameters(), lr=1e-2, weight_decay=0.1), 5, False)
    assert (model[0].weight.detach()[w0 == 0] != 0).any()


def test_after_step_restores_what_the_gradient_hook_cannot():
    # optimizer state from before the masks (momentum on now-pruned weights) moves them despite zero gradients
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _loss(model).backward()
    opt.step()  # a dense step: every weight has momentum
    w = model[0].weight
    mask = w.detach().abs() > w.detach().abs().median()
    with torch.no_grad():
        w.mul_(mask)  # pruned after that step
    prepared = prepare_student(model)
    _steps(prepared, opt, 1, after_step=False)
    assert (model[0].weight.detach()[~mask] != 0).any()
    prepared.after_step()
    assert (model[0].weight.detach()[~mask] == 0).all()


def test_bitsandbytes_student_is_refused():
    class Linear8bitLt(nn.Linear):  # stands in for bitsandbytes' class (detected by name)
        pass

    with pytest.raises(UnsupportedError, match="bitsandbytes student cannot be trained"):
        prepare_student(nn.Sequential(Linear8bitLt(4, 4)))


# --- prepare -> finalize on a tiny Llama ---------------------------------------------------------------------

def _prune(linear: nn.Linear, fraction=0.5):
    with torch.no_grad():
        w = linear.weight
        w[w.abs() <= w.abs().flatten().kthvalue(int(fraction * w.numel())).values] = 0


def test_prepare_finalize_rtn_prune_then_quantize(tiny_model_dir):
    model = _load(tiny_model_dir)
    _prune(model.model.layers[0].mlp.up_proj)  # prune -> quantize chain
    quantize_model_rtn(model, RTNStep(bits=4, group_size=32))
    ids = _ids(model)
    with torch.no_grad():
        before = model(ids).logits
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())

    prepared = prepare_student(model)
    assert len(prepared.fake_quant) == n_quant == 14
    assert all(isinstance(model.get_submodule(n), FakeQuantLinear) for n in prepared.fake_quant)
    assert set(prepared.masks) == {"model.layers.0.mlp.up_proj"}
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.requires_grad
    assert model.training and all(p.requires_grad for p in prepared.trainable_parameters())
    info = prepared.info()
    assert info["fake_quant_linears"] == 14 and info["masked_linears"] == 1
    assert info["trainable_params"] == info["params"] and info["masked_fraction"] >= 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-6)

    final = prepared.finalize()
    assert all(isinstance(final.get_submodule(n), QuantLinear) for n in prepared.fake_quant)
    assert not final.training and not any(p.requires_grad for p in final.parameters())
    with torch.no_grad():
        assert torch.equal(final(ids).logits, before)


def test_training_keeps_pruned_quantized_weights_at_zero(tiny_model_dir):
    model = _load(tiny_model_dir)
    _prune(model.model.layers[0].mlp.up_proj)
    quantize_model_rtn(model, RTNStep(bits=4, group_size=32))
    ids = _ids(model)
    prepared = prepare_student(model)
    name = "model.layers.0.mlp.up_proj"
    mask = prepared.masks[name]
    opt = torch.optim.AdamW(prepared.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(ids).logits.float().square().mean().backward()
        opt.step()
        prepared.after_step()
    final = prepared.finalize()
    w = final.get_submodule(name).qweight.dequantize()
    assert (w[~mask] == 0).all() and (w[mask] != 0).float().mean() > 0.5


def test_prepare_finalize_sparse(tiny_model_dir):
    model = _load(tiny_model_dir)
    for lin in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
        _prune(lin)
    compress_sparse(model)
    names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert len(names) == 2
    ids = _ids(model)
    with torch.no_grad():
        before = model(ids).logits
    prepared = prepare_student(model)
    assert set(prepared.masks) == set(names) and prepared.fake_quant == []
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    final = prepared.finalize()
    assert not any(hasattr(final.get_submodule(n), "mask") for n in names)
    with torch.no_grad():
        torch.testing.assert_close(final(ids).logits, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_prepare_finalize_w8a8(tiny_model_dir, scheme):
    model = _load(tiny_model_dir)
    quantize_model_w8a8(model, scheme)
    cls = W8A8Linear if scheme == "int8" else FP8Linear
    ids = _ids(model)
    with torch.no_grad():
        before = model(ids).logits
    prepared = prepare_student(model)
    assert all(isinstance(model.get_submodule(n), FakeW8A8Linear) for n in prepared.fake_quant)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    final = prepared.finalize()
    assert all(type(final.get_submodule(n)) is cls for n in prepared.fake_quant)
    with torch.no_grad():
        assert torch.equal(final(ids).logits, before)


# --- smaller students ----------------------------------------------------------------------------------------

def test_smaller_student_copies_teacher_layers(tiny_model_dir):
    teacher = _load(tiny_model_dir)
    student, info = smaller_student(teacher, num_layers=1)
    assert info["init"] == "teacher layers [1]" and info["num_layers"] == 1
    assert student.config.num_hidden_layers == 1 and teacher.config.num_hidden_layers == 2
    assert student.model.layers[0].self_attn.layer_idx == 0
    for a, b in zip(student.model.layers[0].parameters(), teacher.model.layers[1].parameters()):
        assert torch.equal(a, b) and a is not b
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert info["params"] == sum(p.numel() for p in student.parameters()) < n_teacher
    with torch.no_grad():
        assert torch.isfinite(student(_ids(teacher)).logits).all()


def test_smaller_student_widths_and_per_layer_config():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, use_sliding_window=True, sliding_window=8,
                      max_window_layers=3,
                      layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(cfg).eval()
    student, info = smaller_student(teacher, num_layers=2)
    assert student.config.layer_types == ["sliding_attention", "sliding_attention"]  # teacher layers 1 and 3
    assert student.config.max_window_layers == 1 and info["init"] == "teacher layers [1, 3]"
    with torch.no_grad():
        assert torch.isfinite(student(torch.arange(10)[None]).logits).all()

    student, info = smaller_student(teacher, hidden_size=16, intermediate_size=24)
    assert info["init"] == "random" and student.config.head_dim == 4 and student.config.num_hidden_layers == 4
    assert student.model.layers[0].mlp.up_proj.weight.shape == (24, 16)
    with torch.no_grad():
        assert student(torch.arange(10)[None]).logits.shape == (1, 10, 64)
    assert teacher.config.hidden_size == 32  # the teacher's config is untouched

    for kwargs in ({"num_layers": 0}, {"num_layers": 5}, {"hidden_size": 64}, {"hidden_size": 12},
                   {"intermediate_size": 0}):
        with pytest.raises(ValueError):
            smaller_student(teacher, **kwargs)
