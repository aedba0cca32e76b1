"""Pruning (issue 4): masks, SparseGPT math, OWL ratios, sparse storage, the Observers through the calibration
pass, and structured pruning of Llama-family models (reload with plain transformers)."""
from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core.errors import UnsupportedError
from core.prune.masks import (
    magnitude_scores,
    make_mask,
    nm_mask,
    outlier_ratio,
    owl_ratios,
    parse_pattern,
    unstructured_mask,
    wanda_scores,
)
from core.prune.sparse import (
    CSR_MAX_ROWS,
    SparseLinear,
    best_format,
    compress_sparse,
    csr_fast_available,
)
from core.prune.sparsegpt import sparsegpt_prune
from core.prune.structured import param_count, structured_prune
from core.prune.unstructured import prune_model
from core.quant.memory_accounting import module_bytes
from tests.test_gptq import _layer, _tiny


def _rel_out(X, W, Wp) -> float:
    return (torch.linalg.norm(X @ (W - Wp.double()).T) / torch.linalg.norm(X @ W.T)).item()


# ---- masks -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("shape", [(17, 43), (64, 96)])
def test_unstructured_ratio_exact(sparsity, shape):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    row = unstructured_mask(scores, sparsity, "row")
    assert (row.sum(1) == shape[1] - round(sparsity * shape[1])).all()  # exact count in every row
    layer = unstructured_mask(scores, sparsity, "layer")
    assert int(layer.sum()) == scores.numel() - round(sparsity * scores.numel())
    # the kept entries are the highest scores of their group
    if 0 < sparsity:
        assert scores[row].view(shape[0], -1).min(1).values.ge(
            torch.where(row, -torch.inf, scores).max(1).values).all()
        assert scores[layer].min() >= scores[~layer].max()


def test_ties_never_change_the_count():
    scores = torch.zeros(8, 12)  # all tied (e.g. a weight already full of zeros)
    assert (unstructured_mask(scores, 0.5, "row").sum(1) == 6).all()
    assert (nm_mask(scores, 2, 4).view(8, 3, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_pattern_exact(n, m):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(33, 8 * m, generator=g)
    keep = make_mask(magnitude_scores(W), 0.123, f"{n}:{m}")  # the sparsity argument is ignored for N:M
    groups = keep.view(33, -1, m)
    assert (groups.sum(-1) == n).all()
    kept_min = torch.where(groups, W.abs().view(33, -1, m), torch.inf).min(-1).values
    dropped_max = torch.where(groups, -torch.inf, W.abs().view(33, -1, m)).max(-1).values
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ValueError):
        nm_mask(torch.rand(4, 10), n, m)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None and parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "0:4", "2-4", "dense"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_wanda_differs_from_magnitude_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    X[:, :4] *= 50  # outlier input features (as in LLM activations)
    mag = make_mask(magnitude_scores(W), 0.5, group="row")
    wanda = make_mask(wanda_scores(W, X.norm(dim=0)), 0.5, group="row")
    assert (mag != wanda).float().mean() > 0.05
    # Wanda keeps (nearly) every weight on the outlier channels, magnitude about half of them
    assert wanda[:, :4].float().mean() > 0.95 and mag[:, :4].float().mean() < 0.7
    assert _rel_out(X.double(), W.double(), W * wanda) < 0.5 * _rel_out(X.double(), W.double(), W * mag)


# ---- SparseGPT ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_beats_wanda_and_magnitude(pattern):
    W, X, H = _layer()
    Wsp, keep, info = sparsegpt_prune(W, H, 0.5, pattern)
    mag = W * make_mask(magnitude_scores(W), 0.5, pattern, "layer")
    wanda = W * make_mask(wanda_scores(W, X.norm(dim=0)), 0.5, pattern, "row")
    e = _rel_out(X, W, Wsp)
    assert e < 0.95 * _rel_out(X, W, wanda) and e < 0.95 * _rel_out(X, W, mag)
    assert info["out_rel_error"] == pytest.approx(e, rel=1e-3) and info["warning"] is None
    assert torch.equal(Wsp != 0, keep)  # zeros exactly where pruned (kept weights are never exactly 0 here)
    if pattern == "unstructured":
        assert int((~keep).sum()) == W.numel() // 2
    else:
        n, m = parse_pattern(pattern)
        assert (keep.view(W.shape[0], -1, m).sum(-1) == n).all()


def test_sparsegpt_ratio_exact_ragged_blocks():
    W, _, H = _layer(out=10, inp=96)
    for s in (0.3, 0.55, 0.9):
        Wsp, keep, _ = sparsegpt_prune(W, H, s, block_size=40)  # 96 = 40 + 40 + 16
        assert int((~keep).sum()) == round(s * W.numel()) and torch.equal(Wsp == 0, ~keep)


def test_sparsegpt_damping_and_fallback():
    W, _, H = _layer()
    vals, vecs = torch.linalg.eigh(H)
    vals[:3] = -0.05 * vals.mean()
    Wsp, keep, info = sparsegpt_prune(W, vecs @ torch.diag(vals) @ vecs.T, 0.5)
    assert info["damp"] > 0.01 and "damping" in info["warning"] and torch.isfinite(Wsp).all()
    Wsp, keep, info = sparsegpt_prune(W, torch.zeros(96, 96), 0.5, "2:4")
    assert "magnitude" in info["warning"] and torch.equal(keep, nm_mask(W.abs(), 2, 4))


# ---- OWL ---------------------------------------------------------------------------------------------------------

def test_owl_ratios_average_to_target():
    out = [0.001, 0.004, 0.02, 0.003, 0.01, 0.0005]
    r = owl_ratios(out, 0.6, lam=0.08)
    assert sum(r) / len(r) == pytest.approx(0.6, abs=1e-12)
    assert max(r) - min(r) == pytest.approx(0.16)
    assert r[2] == min(r) and r[5] == max(r)  # more outliers -> lower sparsity
    w = [1, 2, 3, 1, 1, 5]
    rw = owl_ratios(out, 0.5, lam=0.1, weights=w)
    assert sum(a * b for a, b in zip(rw, w)) / sum(w) == pytest.approx(0.5, abs=1e-12)
    rc = owl_ratios(out, 0.95, lam=0.2)  # clipping at 1 keeps the mean exact
    assert max(rc) <= 1 and sum(rc) / len(rc) == pytest.approx(0.95, abs=1e-12)
    assert owl_ratios([0.01] * 4, 0.5) == [0.5] * 4
    s = torch.ones(100)
    s[:3] = 100
    assert outlier_ratio([s], m=5) == pytest.approx(0.03)


# ---- sparse storage ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_bitmask_exact(dtype, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(99, 37, bias=bias).to(dtype)  # in_features not a multiple of 8
    with torch.no_grad():
        lin.weight.mul_(unstructured_mask(magnitude_scores(lin.weight), 0.5))
    s = SparseLinear.from_linear(lin, "bitmask")
    x = torch.randn(3, 5, 99, dtype=dtype)
    assert torch.equal(s(x), F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():  # decoded into shared scratch buffers
        assert torch.equal(s(x), F.linear(x, lin.weight, lin.bias))
    assert s.mask.shape == (37, 13) and s.mask.dtype == torch.uint8 and s.values.dtype == dtype
    assert s.values.numel() == int((lin.weight != 0).sum()) and s.sparsity == pytest.approx(0.5, abs=0.01)
    assert module_bytes(s) < 0.6 * module_bytes(lin) + (0 if not bias else 37 * 4)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparse_linear_nm_exact(n, m):
    torch.manual_seed(0)
    lin = torch.nn.Linear(104, 24)  # 104 = 13 * 8: multiple of M, not of the 4-per-byte index packing
    with torch.no_grad():
        lin.weight.mul_(nm_mask(magnitude_scores(lin.weight), n, m))
    s = SparseLinear.from_linear(lin, "nm", n, m)
    x = torch.randn(7, 104)
    assert torch.equal(s(x), F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        assert torch.equal(s(x), F.linear(x, lin.weight, lin.bias))
    assert s.values.shape == (24, 104 * n // m)
    assert torch.equal(s.dense_weight(), lin.weight.detach())
    with pytest.raises(ValueError):
        SparseLinear.from_linear(torch.nn.Linear(104, 24), "nm", n, m)  # dense weight is not N:M


def test_compress_sparse_saves_bytes_and_keeps_outputs():
    model = _tiny("llama")
    step = SimpleNamespace(method="magnitude", sparsity=0.5, pattern="unstructured", skip=["lm_head"])
    prune_model(model, step, None)
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
    before = module_bytes(model.model.layers)
    smallest = copy.deepcopy(model)
    recs = compress_sparse(smallest, skip=["lm_head"], layout="smallest")
    assert len(recs) == 14 and all(r["format"] == "bitmask" and r["bytes"] < r["dense_bytes"] for r in recs)
    assert all(isinstance(smallest.get_submodule(r["name"]), SparseLinear) for r in recs)
    assert module_bytes(smallest.model.layers) < 0.6 * before
    with torch.no_grad():
        torch.testing.assert_close(smallest(x).logits, ref, atol=1e-5, rtol=1e-5)
    # default layout on a CPU float32 model: the blocked CSR, whose fast path runs here (one byte more per non-zero)
    recs = compress_sparse(model, skip=["lm_head"])
    assert len(recs) == 14 and {r["format"] for r in recs} == {"csr" if csr_fast_available(ref) else "bitmask"}
    assert module_bytes(model.model.layers) < 0.7 * before
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-5)
    # 2:4 goes to the compact N:M layout (smallest); a 5 %-sparse layer is left dense
    model = _tiny("llama")
    prune_model(model, SimpleNamespace(method="magnitude", sparsity=0.5, pattern="2:4", skip=["lm_head"]), None)
    assert {r["format"] for r in compress_sparse(model, skip=["lm_head"], layout="smallest")} == {"nm"}
    model = _tiny("llama")
    prune_model(model, SimpleNamespace(method="magnitude", sparsity=0.05, pattern="unstructured", skip=[]), None)
    assert compress_sparse(model, min_sparsity=0.1) == []
    with pytest.raises(ValueError, match="layout"):
        compress_sparse(model, layout="fastest")


def test_best_format_layouts():
    torch.manual_seed(0)
    W = torch.randn(40, 600)
    W[torch.rand_like(W) < 0.5] = 0
    dense = W.numel() * 4
    assert best_format(W, layout="smallest")[0] == "bitmask"
    fmt, _, _, nbytes = best_format(W, layout="csr")
    assert fmt == "csr" and nbytes == int((W != 0).sum()) * 5 + 3 * 41 * 4  # 600 columns: 3 blocks of 200
    assert best_format(W)[0] == ("csr" if csr_fast_available(W) else "bitmask")
    assert best_format(W.bfloat16())[0] == "bitmask"  # no CPU sparse kernel for bf16: the smallest layout
    W[torch.rand_like(W) < 0.8] = 0  # very sparse: every layout far below dense
    assert best_format(W, layout="smallest")[3] < 0.25 * dense
    W2 = torch.randn(40, 600)
    W2[:, ::10] = 0  # 10 % sparse: CSR (5 bytes per non-zero) would exceed the dense 4, so auto keeps the bitmask
    assert best_format(W2)[0] == "bitmask"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_semi_structured_fast_path():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(nm_mask(magnitude_scores(lin.weight), 2, 4))
    s = SparseLinear.from_linear(lin, "semi_structured")
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    torch.testing.assert_close(s(x), lin(x), atol=2e-2, rtol=2e-2)
    assert module_bytes(s) < 0.7 * module_bytes(lin)


# ---- through the calibration pass ----------------------------------------------------------------------------------

ARCHS = ["llama", "qwen2", "gemma3", "phi", "gpt2", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_model_through_the_pass(arch, method):
    model = _tiny(arch)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings().weight.detach().clone()
    pattern = "2:4" if method == "wanda" else "unstructured"
    step = SimpleNamespace(method=method, sparsity=0.5, pattern=pattern, skip=["lm_head"])
    recs = prune_model(model, step, windows, "cpu")
    assert recs and all(r["method"] == method and r["warning"] is None for r in recs)
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.02) for r in recs)
    assert recs.stats["seconds"] > 0 and recs.summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    if method != "magnitude":
        assert all(0 < r["out_rel_error"] < 1 for r in recs)
    assert torch.equal(model.get_input_embeddings().weight, emb)  # tied lm_head skipped: embedding untouched
    with torch.no_grad():
        assert torch.isfinite(model(windows[:1]).logits).all()


def test_magnitude_needs_no_windows_and_owl_needs_them():
    model = _tiny("llama")
    recs = prune_model(model, SimpleNamespace(method="magnitude", sparsity=0.4, pattern="unstructured",
                                              skip=["lm_head"]), None)
    assert recs.stats == {} and recs.summary["achieved_sparsity"] == pytest.approx(0.4, abs=1e-3)
    assert all(r["out_rel_error"] is None for r in recs)
    with pytest.raises(UnsupportedError):
        prune_model(model, SimpleNamespace(method="wanda", sparsity=0.4, pattern="unstructured", skip=[]), None)
    with pytest.raises(UnsupportedError):
        prune_model(model, SimpleNamespace(method="wanda", sparsity=0.5, pattern="2:4", owl=True, skip=[]),
                    torch.randint(0, 128, (2, 16)))


def test_owl_through_the_pass_keeps_the_overall_ratio():
    model = _tiny("llama", layers=4)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    step = SimpleNamespace(method="wanda", sparsity=0.5, pattern="unstructured", owl=True, owl_m=3,
                           owl_lambda=0.1, skip=["lm_head"])
    recs = prune_model(model, step, windows)
    ls = recs.summary["layer_sparsity"]
    assert len(ls) == 4 and sum(ls) / 4 == pytest.approx(0.5) and max(ls) > min(ls)
    assert recs.summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_pruning_lm_head_unties_it_from_the_embedding():
    model = _tiny("gpt2")  # lm_head tied to wte
    emb = model.get_input_embeddings().weight.detach().clone()
    step = SimpleNamespace(method="wanda", sparsity=0.5, pattern="unstructured", skip=[])
    recs = prune_model(model, step, torch.randint(0, 128, (2, 16)))
    head = {r["name"]: r for r in recs}["lm_head"]
    assert head["method"] == "magnitude" and "outside" in head["warning"]
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert (model.lm_head.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_sparsegpt_model_closer_than_magnitude():
    """On a tiny llama, SparseGPT's logits stay closer to the dense model's than Wanda's and magnitude's."""
    import copy

    base = _tiny("llama", layers=2, hidden=64)
    windows = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = base(windows).logits
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(base)
        prune_model(m, SimpleNamespace(method=method, sparsity=0.5, pattern="unstructured", skip=["lm_head"]),
                    windows)
        with torch.no_grad():
            err[method] = ((m(windows).logits - ref) ** 2).mean().item()
    assert err["sparsegpt"] < err["magnitude"] and err["sparsegpt"] < err["wanda"], err


# ---- structured ----------------------------------------------------------------------------------------------------

def _reload(model, tmp_path):
    import transformers as tf

    model.save_pretrained(tmp_path)
    return tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", ["query", "kv_group"])
def test_structured_reloads_with_plain_transformers(arch, mode, tmp_path):
    model = _tiny(arch, layers=4)  # hidden 32, intermediate 64, 4 heads of dim 8 in 2 KV groups
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before, before_layers = param_count(model), param_count(model.model.layers)
    step = SimpleNamespace(mlp_sparsity=0.25, head_sparsity=0.5, head_mode=mode, remove_layers=1)
    recs = structured_prune(model, step, windows)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim) == (48, 3, 8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == ((2, 2) if mode == "query" else (2, 1))
    bias = 1 if arch == "qwen2" else 0  # qwen2's q/k/v have biases
    kv_rows = 16 if mode == "query" else 8
    per_layer = (3 * 32 * 48 + 32 * 16 * 2 + 32 * kv_rows * 2 + bias * (16 + 2 * kv_rows) + 2 * 32)
    assert param_count(model.model.layers) == 3 * per_layer
    assert recs.stats["params_after"] == param_count(model) == before - (before_layers - 3 * per_layer)
    assert sum(r["removed"] for r in recs) == 1 and len(recs) == 4
    reloaded = _reload(model, tmp_path)
    assert param_count(reloaded) == param_count(model)
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
        assert torch.equal(reloaded.generate(x[:1], max_new_tokens=4, do_sample=False),
                           model.generate(x[:1], max_new_tokens=4, do_sample=False))


def test_structured_removes_the_least_influential_layers():
    model = _tiny("llama", layers=4)
    with torch.no_grad():  # make layer 2 (nearly) the identity: its block influence is ~0
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-4)
    layers = list(model.model.layers)
    recs = structured_prune(model, SimpleNamespace(remove_layers=1), torch.randint(0, 128, (2, 16)))
    assert recs.stats["removed_layers"] == [2] and min(r["block_influence"] for r in recs) < 1e-4
    assert list(model.model.layers) == [layers[0], layers[1], layers[3]]
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]


def test_structured_mlp_keeps_the_important_channels():
    model = _tiny("llama", layers=2)
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight[:, :8] *= 100  # channels 0..7 dominate the MLP output
    structured_prune(model, SimpleNamespace(mlp_sparsity=0.5), torch.randint(0, 128, (2, 16)))
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.shape == (32, 32) and (w.abs().max(0).values > 1).sum() == 8


def test_structured_refuses_other_architectures():
    with pytest.raises(UnsupportedError, match="Llama-family"):
        structured_prune(_tiny("gpt2"), SimpleNamespace(mlp_sparsity=0.25), torch.randint(0, 128, (2, 16)))
    with pytest.raises(UnsupportedError):
        structured_prune(_tiny("llama"), SimpleNamespace(remove_layers=2), torch.randint(0, 128, (2, 16)))


def test_sparse_linear_under_inference_mode_then_no_grad():
    """The decode scratch buffers made under inference_mode (evaluation) must not leak into no_grad calls."""
    from core.prune.sparse import SparseLinear

    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    for fmt in ("bitmask", "nm"):
        s = SparseLinear.from_linear(lin, fmt, 2, 4)
        with torch.inference_mode():
            a = s(x)
        with torch.no_grad():
            b = s(x)
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(b, lin(x))


# ---- "csr": the CPU fast path, always against the plain reference (dense weight, F.linear) --------------------------

def _sparse_weight(out_f, in_f, density, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    return W * (torch.rand(out_f, in_f, generator=g) < density)


# odd sizes: a single column, widths just over one / two blocks (257, 513), widths that are not a multiple of 8
CSR_SHAPES = [(37, 99), (1, 1), (5, 600), (7, 257), (3, 513), (64, 256), (130, 77), (9, 1000)]


@pytest.mark.parametrize("shape", CSR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csr_fast_path_matches_reference(shape, dtype):
    out_f, in_f = shape
    W = _sparse_weight(out_f, in_f, 0.45, dtype)
    bias = torch.randn(out_f, generator=torch.Generator().manual_seed(5), dtype=dtype)
    s = SparseLinear.from_weight(W, bias, "csr")
    assert torch.equal(s.dense_weight(), W) and s.check() is None
    assert s.crow.shape == (-(-in_f // s.block), out_f + 1) and s.block <= 256 and s.cols.dtype == torch.uint8
    assert s.values.numel() == int((W != 0).sum()) and s.sparsity == pytest.approx(float((W == 0).double().mean()))
    g = torch.Generator().manual_seed(1)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for lead in [(1,), (1, 1), (2, 1), (3,), (1, 7), (CSR_MAX_ROWS,), (2, CSR_MAX_ROWS // 2), (CSR_MAX_ROWS + 1,)]:
        x = torch.randn(*lead, in_f, generator=g, dtype=dtype)
        ref = F.linear(x, W, bias)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                assert s.uses_fast_path(x) == (x.numel() <= CSR_MAX_ROWS * in_f)
                y = s(x)
            assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
            torch.testing.assert_close(y, ref, **tol)
        torch.testing.assert_close(s(x), ref, **tol)  # grad enabled, x without grad: still the fast path


def test_csr_reference_path_cases():
    W = _sparse_weight(24, 300, 0.5)
    s = SparseLinear.from_weight(W, None, "csr")
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(2))
    # autograd through x: the reference path, gradient as the dense layer's
    xg = x.clone().requires_grad_()
    assert not s.uses_fast_path(xg)
    s(xg).sum().backward()
    torch.testing.assert_close(xg.grad, W.sum(0).expand(3, -1))
    # another dtype than the values (bf16 input; or the module cast to bf16): reference path, decoded in that dtype
    with torch.no_grad():
        assert not s.uses_fast_path(x.bfloat16())
        torch.testing.assert_close(s(x.bfloat16()), F.linear(x.bfloat16(), W.bfloat16()))
        sb = copy.deepcopy(s).bfloat16()
        assert sb.cols.dtype == torch.uint8 and sb.crow.dtype == torch.int32
        torch.testing.assert_close(sb(x.bfloat16()), F.linear(x.bfloat16(), W.bfloat16()))
    # all-zero weight, and a weight whose whole first block is zero
    for Wz in (torch.zeros(6, 300), torch.cat([torch.zeros(6, 150), torch.randn(6, 150)], 1)):
        z = SparseLinear.from_weight(Wz, torch.ones(6), "csr")
        with torch.no_grad():
            for xx in (x[:1], x):
                torch.testing.assert_close(z(xx), F.linear(xx, Wz, torch.ones(6)))
        assert torch.equal(z.dense_weight(), Wz)


def test_csr_views_cache_stays_right():
    """The fast path keeps torch sparse views of a per-thread scratch buffer between calls: modules of different
    sizes interleaved, a module cast (new buffers), deepcopy / pickle (no views carried) must all stay exact."""
    Ws = [_sparse_weight(33, 700, 0.3, seed=1), _sparse_weight(50, 130, 0.6, seed=2),
          _sparse_weight(9, 1500, 0.5, seed=3)]
    mods = [SparseLinear.from_weight(W, None, "csr") for W in Ws]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            for W, s in zip(Ws, mods):
                for rows in (1, 4):
                    x = torch.randn(rows, W.shape[1], generator=g)
                    torch.testing.assert_close(s(x), F.linear(x, W), rtol=1e-5, atol=1e-5)
        s = mods[0]
        assert s._csr_cache is not None
        c = copy.deepcopy(s)
        assert c._csr_cache is None and pickle.loads(pickle.dumps(s))._csr_cache is None
        x = torch.randn(1, 700, generator=g, dtype=torch.float64)
        torch.testing.assert_close(c.double()(x), F.linear(x, Ws[0].double()))
        with torch.inference_mode():  # a second scratch pool: other views
            torch.testing.assert_close(s(x.float()), F.linear(x.float(), Ws[0]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s(x.float()), F.linear(x.float(), Ws[0]), rtol=1e-5, atol=1e-5)


def test_check_finds_inconsistent_storage():
    W = _sparse_weight(12, 44, 0.5)  # 44 columns: a multiple of 4, not of 8 (the mask has 4 padding bits a row)
    Wn = W * nm_mask(magnitude_scores(W), 2, 4)
    for fmt, w in (("bitmask", W), ("csr", W), ("nm", Wn)):
        assert SparseLinear.from_weight(w, None, fmt).check() is None
    s = SparseLinear.from_weight(W, None, "bitmask")
    s.values = s.values[:-1]
    assert "marks" in s.check()
    s = SparseLinear.from_weight(W, None, "bitmask")
    s.mask[0, -1] |= 0x80  # column 47 of a 44-column weight
    assert "beyond the last column" in s.check()
    s = SparseLinear.from_weight(Wn, None, "nm")
    s.indices.zero_()  # both kept positions of every group at 0
    assert "increasing" in s.check()
    s = SparseLinear.from_weight(W, None, "csr")
    s.crow[0, 3] = s.crow[0, 2] - 1
    assert "row pointers" in s.check()
    s = SparseLinear.from_weight(W, None, "csr")
    s.cols[0] = 45
    assert "beyond the block" in s.check()
    s = SparseLinear.from_weight(W, None, "csr")
    first_row = int(s.crow[0, 1])
    assert first_row >= 2
    s.cols[1] = s.cols[0]
    assert "repeat or decrease" in s.check()
