"""GPTQ math (float64 reference on a random layer) and the shared calibration pass (core/calibrate.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from core.calibrate import Observer, find_decoder_layers, run_calibrated
from core.quant.gptq import gptq_quantize, quantize_model_gptq
from core.quant.linear import QuantLinear, quantize_model_rtn
from core.quant.memory_accounting import module_bytes
from core.quant.rtn import quantize_rtn


def _layer(out=64, inp=96, tokens=512, seed=0):
    """Random weights and correlated inputs (non-diagonal covariance, uneven channel scales), float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    mix = torch.eye(inp, dtype=torch.float64) + torch.randn(inp, inp, generator=g, dtype=torch.float64) / inp**0.5
    scale = torch.linspace(0.2, 3, inp, dtype=torch.float64)
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix * scale
    return W, X, 2 / tokens * X.T @ X


def _out_err(X, W, qw) -> float:
    return torch.linalg.norm(X @ W.T - X @ qw.dequantize().double().T).item()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group", [32, None, 40])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_outputs(bits, group, sym):
    W, X, H = _layer()
    qw, info = gptq_quantize(W, H, bits, group, sym)
    rtn = quantize_rtn(W, bits, group, sym)
    assert _out_err(X, W, qw) < 0.9 * _out_err(X, W, rtn)
    assert info["warning"] is None and info["damp"] == 0.01
    assert info["out_rel_error"] < info["rtn_out_rel_error"]
    ref = _out_err(X, W, qw) / torch.linalg.norm(X @ W.T).item()
    assert info["out_rel_error"] == pytest.approx(ref, rel=1e-3)
    # same storage format as RTN (a non-dividing group: 96 = 40 + 40 + 16)
    assert (qw.group_size, qw.scales.shape, qw.scales.dtype, qw.packed.shape) == \
           (rtn.group_size, rtn.scales.shape, rtn.scales.dtype, rtn.packed.shape)
    assert (qw.zeros is None) == sym and qw.n_groups == (1 if group is None else math.ceil(96 / group))


def test_huge_damping_is_rtn():
    W, _, H = _layer()
    for group in (32, 40, None):
        qw, _ = gptq_quantize(W, H, 3, group, False, damp=1e8)
        assert (qw.codes() == quantize_rtn(W, 3, group, False).codes()).float().mean() > 0.99


@pytest.mark.parametrize("group", [32, 40, None])
def test_act_order(group):
    W, X, H = _layer()
    qw, info = gptq_quantize(W, H, 3, group, True, act_order=True)
    rtn = quantize_rtn(W, 3, group, True)
    assert _out_err(X, W, qw) < 0.9 * _out_err(X, W, rtn)
    # static groups: the grid is RTN's, computed up front on the un-permuted weight; only the codes differ
    assert qw.group_size == rtn.group_size and torch.equal(qw.scales, rtn.scales)
    assert qw.packed.shape == rtn.packed.shape and info["warning"] is None


def test_static_groups_without_act_order():
    W, X, H = _layer()
    qw, _ = gptq_quantize(W, H, 4, 40, False, static_groups=True)
    rtn = quantize_rtn(W, 4, 40, False)
    assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
    assert _out_err(X, W, qw) < _out_err(X, W, rtn)


def test_indefinite_hessian_raises_damping():
    W, _, H = _layer()
    vals, vecs = torch.linalg.eigh(H)
    vals[:3] = -0.05 * vals.mean()  # negative eigenvalues: damping 1% of mean(diag) is not enough
    qw, info = gptq_quantize(W, vecs @ torch.diag(vals) @ vecs.T, 4, 32, True)
    assert info["damp"] > 0.01 and "damping" in info["warning"]
    assert torch.isfinite(qw.dequantize()).all()


def test_singular_hessian_and_dead_columns():
    W, X, _ = _layer(tokens=16)  # rank 16 < 96 columns
    X[:, 5] = 0  # a dead input channel
    qw, info = gptq_quantize(W, 2 / 16 * X.T @ X, 4, None, True)
    assert info["warning"] is None and torch.isfinite(qw.dequantize()).all()
    assert _out_err(X, W, qw) < _out_err(X, W, quantize_rtn(W, 4, None, True))
    # a dead column is kept (rounded like RTN), not zeroed: inputs unseen in calibration still work
    assert torch.equal(qw.codes()[:, 5], quantize_rtn(W, 4, None, True).codes()[:, 5])


def test_zero_hessian_falls_back_to_rtn():
    W, _, _ = _layer()
    qw, info = gptq_quantize(W, torch.zeros(96, 96), 4, 32, True)
    assert "RTN" in info["warning"] and info["damp"] is None
    assert torch.equal(qw.packed, quantize_rtn(W, 4, 32, True).packed)


# ---- calibration pass ------------------------------------------------------------------------------------------

def _tiny(arch: str, layers: int = 2, hidden: int = 32):
    import transformers as tf

    v = 128
    cfgs = {
        "llama": lambda: tf.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=v),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                                        use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "mistral": lambda: tf.MistralConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=v,
                                            sliding_window=4),
        "gemma": lambda: tf.GemmaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=8, vocab_size=v),
        "gemma3": lambda: tf.Gemma3TextConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, vocab_size=v,
                                              sliding_window=4,
                                              layer_types=["sliding_attention", "full_attention"] * (layers // 2)),
        "phi": lambda: tf.PhiConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=4, vocab_size=v),
        "gpt2": lambda: tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=v, n_positions=64),
        "opt": lambda: tf.OPTConfig(hidden_size=hidden, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                                    word_embed_proj_dim=hidden, vocab_size=v, max_position_embeddings=64),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfgs[arch]()).eval()


PREFIX = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gemma": "model.layers",
          "gemma3": "model.layers", "phi": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers"}


class _Recorder(Observer):
    """Keeps each linear's inputs, to compare with a normal forward."""
    name = "record"

    def __init__(self):
        self.seen = {}

    def observe(self, name, module, x):
        self.seen.setdefault(name, []).append(x.clone())

    def apply(self, ctx):
        return []


@pytest.mark.parametrize("arch", list(PREFIX))
def test_pass_replays_each_layer_like_the_model(arch):
    """The pass feeds every linear exactly the inputs it gets in a normal forward (per-layer masks / rotary
    embeddings included), and GPTQ through it runs on every architecture."""
    model = _tiny(arch)
    prefix, layers = find_decoder_layers(model)
    assert prefix == PREFIX[arch] and len(layers) == 2
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    expected, hooks = {}, []
    for name, m in model.named_modules():
        if name.startswith(prefix + ".") and type(m).__name__ in ("Linear", "Conv1D"):
            hook = lambda mod, inp, n=name: expected.setdefault(n, []).append(inp[0])
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        ref_logits = [model(w[None]).logits for w in windows]
    for h in hooks:
        h.remove()
    rec = _Recorder()
    run_calibrated(model, windows, rec, "cpu")
    assert rec.seen.keys() == expected.keys()
    for n, inputs in expected.items():
        for a, b in zip(rec.seen[n], inputs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    step = SimpleNamespace(bits=8, group_size=None, symmetric=True, skip=["lm_head"])
    records = quantize_model_gptq(model, step, windows, "cpu")
    assert len(records) == len(expected) and all(r["method"] == "gptq" for r in records)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in expected)
    with torch.no_grad():
        for w, ref in zip(windows, ref_logits):
            assert (model(w[None]).logits - ref).abs().max() < 0.05 * ref.std() + 1e-4


def test_linear_that_sees_no_tokens_falls_back_to_rtn():
    """E.g. an MoE expert no calibration token was routed to; here a linear the forward never calls."""
    model = _tiny("llama")
    model.model.layers[1].mlp.unused = torch.nn.Linear(32, 16)
    step = SimpleNamespace(bits=4, group_size=None, symmetric=True, skip=["lm_head"])
    records = quantize_model_gptq(model, step, torch.randint(0, 128, (2, 16)), "cpu")
    rec = {r["name"]: r for r in records}
    assert "RTN" in rec["model.layers.1.mlp.unused"]["warning"]
    assert isinstance(model.model.layers[1].mlp.unused, QuantLinear)
    assert sum(r["warning"] is not None for r in records) == 1


def test_gptq_model_closer_than_rtn(tiny_model_dir, corpus_file):
    import copy

    from core import data, models

    src = models.resolve(str(tiny_model_dir))
    tok, base = models.load_tokenizer(src), models.load_model(src)
    windows = data.calibration_windows(tok, str(corpus_file), 32, 8)
    step = SimpleNamespace(bits=3, group_size=32, symmetric=True, act_order=False, damp=0.01, block_size=128,
                           skip=["lm_head"])
    gptq, rtn = copy.deepcopy(base), copy.deepcopy(base)
    records = quantize_model_gptq(gptq, step, windows, "cpu")
    quantize_model_rtn(rtn, step)
    assert len(records) == 14 and all(r["warning"] is None for r in records)
    assert records.stats["seconds"] > 0 and records.stats["peak_bytes"] > 0 and records.stats["tokens"] == 8 * 32

    def err(m):
        with torch.no_grad():
            return sum(((m(w[None]).logits - base(w[None]).logits) ** 2).mean().item() for w in windows)

    assert err(gptq) < 0.8 * err(rtn)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_peak_memory_is_one_layer(device):
    """Model on CPU, layers moved to `device` one at a time: the peak does not grow with depth."""
    if device == "cuda":
        torch.ones(8, 8, device=device).matmul(torch.ones(8, 8, device=device))  # allocate cuBLAS's workspace now
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    step = SimpleNamespace(bits=4, group_size=None, symmetric=True, skip=["lm_head"])
    peaks, sizes = {}, {}
    for n in (2, 8, 32):
        model = _tiny("llama", layers=n)
        sizes[n] = module_bytes(model.model.layers)
        stats = quantize_model_gptq(model, step, windows, device).stats
        peaks[n] = stats["peak_bytes"] - (stats["device_start_bytes"] or 0)
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert all(b.device.type == "cpu" for b in model.buffers())
    assert sizes[32] > 14 * sizes[2]
    assert peaks[32] < 1.5 * peaks[2], peaks


@pytest.mark.parametrize("sym", [True, False])
def test_keep_zeros_keeps_a_pruned_layer_pruned(sym):
    W, X, H = _layer()
    W = W * (torch.rand(W.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) > 0.5)
    qw, info = gptq_quantize(W, H, 4, 32, sym, keep_zeros=True, act_order=True)
    w_hat = qw.dequantize().double()
    assert torch.equal(w_hat[W == 0], torch.zeros_like(w_hat[W == 0]))
    assert info["out_rel_error"] < info["rtn_out_rel_error"]
    free, _ = gptq_quantize(W, H, 4, 32, sym, act_order=True)
    assert (free.dequantize()[W == 0] != 0).any()  # without it, error feedback fills the pruned weights in


# ---- speed-ups that must not change the result ---------------------------------------------------------------

@pytest.mark.parametrize("d", [40, 300, 1100])
def test_gram_upper_blocks_mirrored_equal_full_product(d):
    from core.quant.gptq import _add_gram_upper, _mirror_upper

    g = torch.Generator().manual_seed(d)
    acc = torch.zeros(d, d)
    full = torch.zeros(d, d)
    for _ in range(3):
        f = torch.randn(64, d, generator=g)
        _add_gram_upper(acc, f)
        full += f.t() @ f
    _mirror_upper(acc)
    assert torch.equal(acc, acc.t())
    torch.testing.assert_close(acc, full, rtol=1e-5, atol=1e-4)


def test_observer_hessian_is_2_over_n_xtx_and_shared():
    from core.quant.gptq import GPTQObserver

    obs = GPTQObserver(SimpleNamespace(skip=[]))
    xs = [torch.randn(1, 16, 300) for _ in range(2)]
    for x in xs:
        obs.observe("q", None, x)
        obs.observe("k", None, x)
    X = torch.cat(xs).reshape(-1, 300)
    H = obs.H
    assert H["q"] is H["k"]
    torch.testing.assert_close(H["q"], 2 / 32 * X.t() @ X, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act_order,sym,group", [(False, True, 32), (True, False, 40), (False, False, None)])
def test_group_quantization_equals_each_alone(act_order, sym, group):
    """gptq_quantize_group (q/k/v stacked in one column loop) gives each weight what gptq_quantize gives it alone,
    keep_zeros applying to its own weight only."""
    from core.quant.gptq import gptq_quantize_group

    W, _, H = _layer(out=64, inp=96)
    parts = [W[:40], W[40:48] * (torch.rand(8, 96, generator=torch.Generator().manual_seed(5), dtype=torch.float64) > 0.5),
             W[48:]]
    keep = [False, True, False]
    group_res = gptq_quantize_group(parts, H, 4, group, sym, act_order=act_order, keep_zeros=keep)
    for w, k, (qw, info, w_hat) in zip(parts, keep, group_res):
        alone, alone_info = gptq_quantize(w, H, 4, group, sym, act_order=act_order, keep_zeros=k)
        assert torch.equal(qw.packed, alone.packed) and torch.equal(qw.scales, alone.scales)
        assert (qw.zeros is None and alone.zeros is None) or torch.equal(qw.zeros, alone.zeros)
        assert qw.shape == alone.shape and torch.equal(w_hat, qw.dequantize())
        assert info["out_rel_error"] == pytest.approx(alone_info["out_rel_error"], rel=1e-5)
        assert info["rtn_out_rel_error"] == pytest.approx(alone_info["rtn_out_rel_error"], rel=1e-5)


@pytest.mark.parametrize("n", [7, 96, 300, 700])
def test_inverse_cholesky_matches_cholesky_of_the_inverse(n):
    """One Cholesky of the reversed matrix + a triangular inverse = the upper Cholesky factor of (H + dI)^-1
    (the reference: invert, then factor), in float64 and float32, on random SPD matrices."""
    from core.quant.gptq import _inverse_cholesky, _lower_triangular_inverse

    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    H = X.T @ X / (2 * n)
    U, used = _inverse_cholesky(H, 0.01)
    ref = torch.linalg.cholesky(torch.linalg.inv(H + 0.01 * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)),
                                upper=True)
    assert used == 0.01 and torch.equal(U, U.triu())
    torch.testing.assert_close(U, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    U32, _ = _inverse_cholesky(H.float(), 0.01)
    assert ((U32.double() - ref).norm() / ref.norm()).item() < 1e-4
    L = torch.linalg.cholesky(H + torch.eye(n, dtype=H.dtype))
    torch.testing.assert_close(_lower_triangular_inverse(L, base=16) @ L, torch.eye(n, dtype=H.dtype))


def test_output_errors_match_direct_products():
    """The GPTQ output error read off the column loop's errors equals ||X D^T|| / ||X W^T|| computed directly,
    also with act_order, dead input channels, a pruned weight and raised damping."""
    W, X, _ = _layer(out=48, inp=96, tokens=80)
    X[:, 5] = 0  # a dead input channel
    H = 2 / len(X) * X.T @ X
    for kw in ({}, {"act_order": True}, {"keep_zeros": True}, {"damp": 3.0}):
        w = W * (torch.arange(96, dtype=W.dtype) % 3 > 0) if kw.get("keep_zeros") else W
        qw, info = gptq_quantize(w, H, 3, 32, True, **kw)
        direct = torch.linalg.norm(X @ (w - qw.dequantize().double()).T) / torch.linalg.norm(X @ w.T)
        assert info["out_rel_error"] == pytest.approx(direct.item(), rel=1e-4), kw
        rtn = quantize_rtn(w, 3, 32, True)
        direct_rtn = torch.linalg.norm(X @ (w - rtn.dequantize().double()).T) / torch.linalg.norm(X @ w.T)
        assert info["rtn_out_rel_error"] == pytest.approx(direct_rtn.item(), rel=1e-4), kw


def test_observe_pass_stops_after_the_last_linear():
    """Windows after the first stop the layer's forward once every linear has been observed: the last linear
    (down_proj) computes only for window 0 in the observing forward, yet it is observed for every window."""
    model = _tiny("llama")
    last = model.model.layers[1].mlp.down_proj  # the last layer: no propagation forward after its pass
    ran = []
    hook = last.register_forward_hook(lambda *a: ran.append(1))
    rec = _Recorder()
    run_calibrated(model, torch.randint(0, 128, (3, 16)), rec, "cpu")
    hook.remove()
    assert len(ran) == 1 and len(rec.seen["model.layers.1.mlp.down_proj"]) == 3


def test_all_finite_matches_isfinite_all():
    from core.quant.gptq import _all_finite

    for t in ([1.0, 2.0], [3e38, 3e38], [1.0, float("nan")], [1.0, float("inf")], [float("inf"), -float("inf")], []):
        x = torch.tensor(t)
        assert _all_finite(x) == bool(torch.isfinite(x).all())


# ---- one-forward mode (true-sequential): one batched forward per layer ------------------------------------------

class _SequentialRecorder(_Recorder):
    """Records each linear's inputs in the one-forward mode (compresses nothing)."""
    sequential = True


def _expected_inputs(model, prefix, windows):
    expected, hooks = {}, []
    for name, m in model.named_modules():
        if name.startswith(prefix + ".") and type(m).__name__ in ("Linear", "Conv1D"):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: expected.setdefault(n, []).append(inp[0])))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return expected


@pytest.mark.parametrize("arch", list(PREFIX))
def test_one_forward_mode_feeds_inputs_like_the_model(arch):
    """All windows batched through each layer in one forward: every linear gets, per window, the input of a
    normal forward (per-layer masks / rotary embeddings broadcast over the batch), once, for all windows."""
    model = _tiny(arch)
    prefix, _ = find_decoder_layers(model)
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    expected = _expected_inputs(model, prefix, windows)
    rec = _SequentialRecorder()
    _, stats = run_calibrated(model, windows, rec, "cpu")
    assert stats["one_forward_layers"] == 2
    assert rec.seen.keys() == expected.keys()
    for n, inputs in expected.items():
        (batched,) = rec.seen[n]  # [windows, tokens, in] (OPT's MLP: [windows * tokens, in])
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        torch.testing.assert_close(batched.reshape(-1, batched.shape[-1]), flat, atol=1e-5, rtol=1e-4)
    assert all(type(m).__name__ != "_StandIn" for m in model.modules())


def _gptq_step(**kw):
    return SimpleNamespace(**{"bits": 4, "group_size": 16, "symmetric": True, "act_order": False, "damp": 0.01,
                              "block_size": 128, "skip": ["lm_head"], **kw})


def test_one_forward_gptq_is_true_sequential():
    """The one-forward pass equals GPTQ applied group by group (q/k/v, o, gate/up, down), each group's Hessian
    taken from a full forward of the model as quantized so far (o_proj sees the quantized q/k/v)."""
    import copy

    from core.quant.gptq import gptq_quantize_group
    from core.quant.linear import replace_with_quantized

    model = _tiny("llama", hidden=64)
    ref = copy.deepcopy(model)
    windows = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(3))
    step = _gptq_step()
    records = quantize_model_gptq(model, step, windows, "cpu")
    assert records.stats["one_forward_layers"] == 2

    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for i, layer in enumerate(ref.model.layers):
        for g in groups:
            xs = []
            hook = layer.get_submodule(g[0]).register_forward_pre_hook(lambda m, inp, xs=xs: xs.append(inp[0].double()))
            with torch.no_grad():
                for w in windows:
                    ref(w[None])
            hook.remove()
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
            linears = [layer.get_submodule(n) for n in g]
            results = gptq_quantize_group([m.weight for m in linears], 2 / len(X) * X.T @ X, 4, 16, True)
            for n, m, (qw, _, _) in zip(g, linears, results):
                replace_with_quantized(ref, f"model.layers.{i}.{n}", m, qw)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            r = ref.get_submodule(name)
            assert (m.qweight.codes() == r.qweight.codes()).float().mean() > 0.995, name
            torch.testing.assert_close(m.qweight.dequantize(), r.qweight.dequantize(), atol=0.02, rtol=0)
    rec = {r["name"]: r for r in records}
    assert list(rec) == [f"model.layers.{i}.{n}" for i in range(2) for g in groups for n in g]


def test_one_forward_budget_and_fallback():
    """Over the activation budget (or with a linear the forward does not call once per window) the pass keeps
    the two-forward mode; in the one-forward mode the estimate of the batched activations counts in the peak."""
    from core.calibrate import _probe
    from core.quant.gptq import GPTQObserver

    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    step = _gptq_step()
    stats = {}
    for budget in (None, 1):
        model = _tiny("llama")
        _, stats[budget] = run_calibrated(model, windows, GPTQObserver(step), "cpu", batch_bytes=budget)
        assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert stats[None]["one_forward_layers"] == 2 and stats[1]["one_forward_layers"] == 0
    # in both modes the packed codes come out row-contiguous (the CUDA kernels read rows as contiguous bytes)
    for budget in (None, 1):
        model = _tiny("llama")
        run_calibrated(model, windows, GPTQObserver(step), "cpu", batch_bytes=budget)
        assert all(m.packed.is_contiguous() for m in model.modules() if isinstance(m, QuantLinear))
    assert stats[None]["tracked_peak_bytes"] > stats[1]["tracked_peak_bytes"]

    class Twice(torch.nn.Module):  # a linear called twice per forward
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    block = Twice()
    linears = {"a": block.a, "b": block.b}
    assert _probe(block, linears, torch.randn(1, 4, 8), ((None,), {})) is None
    block.forward = lambda x: block.b(x) + block.a(x)
    groups, nbytes = _probe(block, linears, torch.randn(1, 4, 8), ((None,), {}))
    assert groups == [["b", "a"]] and nbytes == 4 * 8 * 4 * 3
