"""Saving a compressed model and loading it back without recompressing (core/checkpoint.py)."""
from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest
import torch

from core import checkpoint, models
from core.checkpoint import CheckpointError, load_compressed, save_compressed
from core.errors import ModelLoadError, RecipeError, UnsupportedError
from core.quant.linear import QuantLinear, quantize_model_rtn
from core.quant.memory_accounting import module_bytes
from core.quant.w8a8 import FP8Linear, W8A8Linear, quantize_model_w8a8

QUICK = {"eval_windows": 2, "window_len": 32, "latency": False, "samples": False}


def small_llama(bias=False, tie=True, hidden=64, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if bias:  # non-zero biases, so a lost bias shows
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_()
    return model


def rtn(model, bits=4, group_size=None, symmetric=True, skip=("lm_head",)):
    return quantize_model_rtn(model, SimpleNamespace(bits=bits, group_size=group_size, symmetric=symmetric, skip=list(skip)))


def assert_same(a, b, vocab):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def roundtrip(model, tmp_path, tokenizer=None, info=None):
    out = save_compressed(model, tokenizer, tmp_path / "ckpt", info or {"steps": ["test"]})
    return load_compressed(out), out


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16, 48])  # 48 does not divide 64 (nor 80)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantlinear_roundtrip(tmp_path, bits, group_size, symmetric):
    bias = (bits + (group_size or 0)) % 2 == 1 or not symmetric  # both with and without bias across the grid
    model = small_llama(bias=bias)
    rtn(model, bits, group_size, symmetric)
    loaded, out = roundtrip(model, tmp_path)
    q = loaded.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.bits == bits and q.symmetric == symmetric
    assert q.group_size == (group_size or 80) and (q.bias is not None) == bias and (q.zeros is None) == symmetric
    assert_same(model, loaded, 96)
    meta = json.loads((out / "slimlm_quant.json").read_text())
    entry = meta["modules"]["model.layers.0.mlp.down_proj"]
    assert entry == {"format": "packed-int", "in_features": 80, "out_features": 64, "bias": bias, "bits": bits,
                     "group_size": group_size or 80, "symmetric": symmetric}


@pytest.mark.parametrize("scheme,cls", [("int8", W8A8Linear), ("fp8", FP8Linear)])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_roundtrip(tmp_path, scheme, cls, bias):
    model = small_llama(bias=bias)
    quantize_model_w8a8(model, scheme)
    loaded, out = roundtrip(model, tmp_path)
    q = loaded.model.layers[0].self_attn.q_proj
    assert type(q) is cls and q.qweight.dtype == cls.codes_dtype and q.weight_scale.dtype == torch.float32
    assert_same(model, loaded, 96)
    assert json.loads((out / "slimlm_quant.json").read_text())["modules"]["model.layers.0.self_attn.q_proj"]["format"] == f"w8a8-{scheme}"


def test_registry_takes_a_new_format(tmp_path, monkeypatch):
    """A later format plugs in with one register_format call."""
    from torch import nn

    class Halved(nn.Module):  # stand-in for a future compressed linear
        def __init__(self, in_features, out_features, device=None):
            super().__init__()
            self.register_buffer("w", torch.zeros(out_features, in_features, dtype=torch.float16, device=device))

        def forward(self, x):
            return x @ self.w.to(x.dtype).t()

    monkeypatch.setattr(checkpoint, "FORMATS", dict(checkpoint.FORMATS))
    checkpoint.register_format(Halved, "halved", lambda m: {"shape": list(m.w.shape)},
                               lambda c: Halved(c["shape"][1], c["shape"][0], device="meta"))
    model = small_llama()
    lin = model.model.layers[0].mlp.up_proj
    h = Halved(lin.in_features, lin.out_features)
    h.w = lin.weight.detach().half()
    model.model.layers[0].mlp.up_proj = h
    loaded, _ = roundtrip(model, tmp_path)
    assert type(loaded.model.layers[0].mlp.up_proj) is Halved
    assert_same(model, loaded, 96)


def _pruned(pattern="unstructured", layout="auto", bias=False, dtype=torch.float32, hidden=320):
    """small_llama pruned by magnitude (50 % or N:M) and stored sparse; hidden 320: two CSR column blocks."""
    from core.prune.sparse import compress_sparse
    from core.prune.unstructured import prune_model

    model = small_llama(bias=bias, hidden=hidden).to(dtype)
    prune_model(model, SimpleNamespace(method="magnitude", sparsity=0.5, pattern=pattern, skip=["lm_head"]), None)
    recs = compress_sparse(model, skip=["lm_head"], layout=layout)
    assert len(recs) == 7
    return model, {r["format"] for r in recs}


def assert_same_decode(a, b, vocab):
    """One more check than assert_same: a single-token forward (the batch-1 decode shape) is bit-identical too."""
    ids = torch.randint(0, vocab, (1, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("pattern,layout,storage", [
    ("unstructured", "smallest", "bitmask"), ("unstructured", "csr", "csr"),
    ("2:4", "smallest", "nm"), ("2:4", "csr", "csr")])
def test_sparse_roundtrip(tmp_path, pattern, layout, storage):
    from core.prune.sparse import SparseLinear

    bias = storage != "nm"
    model, formats = _pruned(pattern, layout, bias)
    assert formats == {storage}
    loaded, out = roundtrip(model, tmp_path)
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            lm = loaded.get_submodule(name)
            assert type(lm) is SparseLinear and lm.format == storage and (lm.n, lm.m, lm.block) == (m.n, m.m, m.block)
            assert torch.equal(lm.dense_weight(), m.dense_weight()) and lm.check() is None
    assert_same(model, loaded, 96)  # same tensors, same logits bit for bit
    assert_same_decode(model, loaded, 96)
    assert module_bytes(loaded) == module_bytes(model)  # the same memory figure
    size, counted = (out / "model.safetensors").stat().st_size, module_bytes(model)
    assert counted <= size < counted + 150 * len(model.state_dict()) + 1024  # the file holds what is counted
    meta = json.loads((out / "slimlm_quant.json").read_text())
    entry = meta["modules"]["model.layers.0.self_attn.q_proj"]
    q = model.model.layers[0].self_attn.q_proj
    want = {"format": "sparse", "in_features": 320, "out_features": 320, "bias": bias, "storage": storage,
            "dtype": "float32"}
    want.update({"n": q.n, "m": q.m} if storage == "nm" else {"nnz": q.values.numel()})
    assert entry == want
    # nnz varies per layer
    if storage != "nm":
        assert len({e["nnz"] for e in meta["modules"].values()}) > 1


def test_sparse_nm_4_8_roundtrip(tmp_path):
    """N:M other than 2:4 (3-bit positions; compress_sparse prefers the bitmask there, so made directly)."""
    from core.prune.masks import magnitude_scores, nm_mask
    from core.prune.sparse import SparseLinear

    model = small_llama(bias=True)
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.self_attn.k_proj"):
        lin = model.get_submodule(name)
        with torch.no_grad():
            lin.weight.mul_(nm_mask(magnitude_scores(lin.weight), 4, 8))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SparseLinear.from_linear(lin, "nm", 4, 8))
    loaded, _ = roundtrip(model, tmp_path)
    up = loaded.model.layers[0].mlp.up_proj
    assert (up.format, up.n, up.m) == ("nm", 4, 8) and up.check() is None
    assert_same(model, loaded, 96)
    assert module_bytes(loaded) == module_bytes(model)


def test_sparse_bf16_roundtrip_and_cast(tmp_path):
    model, formats = _pruned("unstructured", "auto", bias=True, dtype=torch.bfloat16)
    assert formats == {"bitmask"}  # no CPU sparse kernel for bf16: the smallest layout
    loaded, out = roundtrip(model, tmp_path)
    assert json.loads((out / "slimlm_quant.json").read_text())["dtype"] == "bfloat16"
    assert loaded.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    assert_same(model, loaded, 96)
    f32 = load_compressed(out, dtype=torch.float32)  # values are float weights: cast like one, indices kept
    up = f32.model.layers[0].mlp.up_proj
    assert up.values.dtype == torch.float32 and up.mask.dtype == torch.uint8
    assert torch.equal(up.dense_weight(), model.model.layers[0].mlp.up_proj.dense_weight().float())


def test_semi_structured_saved_as_nm(tmp_path):
    """The CUDA-only 2:4 semi-structured module is written as its N:M equivalent (faked here on the CPU: only its
    to_dense() is used when saving)."""
    from core.prune.sparse import SparseLinear

    model, _ = _pruned("2:4", "smallest", bias=True)
    ref = {n: (m.dense_weight(), m.bias.detach().clone()) for n, m in model.named_modules()
           if isinstance(m, SparseLinear)}
    name = "model.layers.0.mlp.gate_proj"
    W, b = ref[name]
    fake = SparseLinear(W.shape[1], W.shape[0], "semi_structured", 2, 4)
    fake._ss = SimpleNamespace(to_dense=lambda: W.clone(), dtype=W.dtype)
    fake.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    before = model.get_submodule(name)
    model.model.layers[0].mlp.gate_proj = fake
    out = save_compressed(model, None, tmp_path / "ckpt", {})
    assert json.loads((out / "slimlm_quant.json").read_text())["modules"][name]["storage"] == "nm"
    assert model.get_submodule(name) is fake  # the model itself is untouched
    model.model.layers[0].mlp.gate_proj = before
    loaded = load_compressed(out)
    assert loaded.get_submodule(name).format == "nm"
    assert_same(model, loaded, 96)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_semi_structured_saved_as_nm_cuda(tmp_path):
    from core.prune.sparse import SparseLinear

    model, _ = _pruned("2:4", "smallest", bias=True, dtype=torch.float16, hidden=128)
    lin = torch.nn.Linear(128, 128).half()
    with torch.no_grad():
        lin.weight.copy_(model.model.layers[0].self_attn.q_proj.dense_weight())
        lin.bias.copy_(model.model.layers[0].self_attn.q_proj.bias)
    ss = SparseLinear.from_linear(lin.cuda(), "semi_structured")
    model.model.layers[0].self_attn.q_proj = ss
    out = save_compressed(model, None, tmp_path / "ckpt", {})
    loaded = load_compressed(out)
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.format == "nm" and torch.equal(q.dense_weight(), ss.dense_weight().cpu())


# ---------------------------------------------------------------- whole models

@pytest.mark.parametrize("how", ["rtn", "w8a8"])
def test_tiny_model_through_resolve(tiny_model_dir, tmp_path, how):
    src = models.resolve(str(tiny_model_dir))
    tok, model = models.load_tokenizer(src), models.load_model(src)
    if how == "rtn":
        rtn(model, 4, 48, False)
    else:
        quantize_model_w8a8(model, "int8")
    out = save_compressed(model, tok, tmp_path / "m", {"step_labels": [how], "base_model": str(tiny_model_dir)})
    csrc = models.resolve(str(out))
    assert csrc.kind == "compressed" and how in csrc.note
    loaded = models.load_model(csrc)
    assert not loaded.training
    assert_same(model, loaded, model.config.vocab_size)
    assert models.load_tokenizer(csrc)("the jury").input_ids == tok("the jury").input_ids
    info = models.model_info(csrc, loaded)
    assert info["compressed_checkpoint"]["steps"] == [how] and info["compressed_checkpoint"]["compressed_modules"] == 14
    # the file holds what memory accounting counts (tied embedding once), plus the safetensors header
    size, counted = (out / "model.safetensors").stat().st_size, module_bytes(model)
    assert counted <= size < counted + 150 * len(model.state_dict()) + 1024
    assert module_bytes(loaded) == counted


def test_tied_embedding_roundtrip(tmp_path):
    model = small_llama(tie=True)
    rtn(model, 4, 16)  # lm_head skipped: stays tied to the embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded, out = roundtrip(model, tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    meta = json.loads((out / "slimlm_quant.json").read_text())
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert_same(model, loaded, 96)
    assert module_bytes(loaded) == module_bytes(model)


def test_quantized_lm_head_of_a_tied_model(tmp_path):
    model = small_llama(tie=True)
    rtn(model, 8, None, skip=())  # lm_head quantized: the embedding keeps its float weight, the tie is dropped
    loaded, out = roundtrip(model, tmp_path)
    assert isinstance(loaded.lm_head, QuantLinear) and not loaded.config.tie_word_embeddings
    assert json.loads((out / "slimlm_quant.json").read_text())["tied"] == {}
    assert_same(model, loaded, 96)


def test_bf16_model_keeps_its_dtype(tmp_path):
    model = small_llama().to(torch.bfloat16)
    rtn(model, 4, 16)
    loaded, out = roundtrip(model, tmp_path)
    assert json.loads((out / "slimlm_quant.json").read_text())["dtype"] == "bfloat16"
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    assert_same(model, loaded, 96)


# ---------------------------------------------------------------- errors

@pytest.fixture
def saved(tmp_path):
    model = small_llama()
    rtn(model, 4, 16)
    return save_compressed(model, None, tmp_path / "ckpt", {})


def _edit_meta(path, fn):
    f = path / "slimlm_quant.json"
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


def test_truncated_weights(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_compressed(saved)
    _edit_meta(saved, lambda m: (m.pop("weights_bytes"), m.pop("weights_sha256")))  # caught by safetensors too
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        load_compressed(saved)


def test_corrupt_weights(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_compressed(saved)


def test_missing_and_unexpected_tensors(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "model.safetensors"
    tensors = load_file(str(f))
    tensors.pop("model.layers.0.mlp.up_proj.scales")
    tensors["model.extra"] = torch.zeros(3)
    save_file(tensors, str(f))
    _edit_meta(saved, lambda m: m.update(weights_bytes=f.stat().st_size, weights_sha256=checkpoint.sha256_file(f)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match.*missing 1 tensor\(s\): "
                                              r"model\.layers\.0\.mlp\.up_proj\.scales.*unexpected 1 tensor\(s\): model\.extra"):
        load_compressed(saved)


def test_wrong_dtype_is_refused(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.up_proj.scales"] = tensors["model.layers.0.mlp.up_proj.scales"].float()
    save_file(tensors, str(f))
    _edit_meta(saved, lambda m: m.update(weights_bytes=f.stat().st_size, weights_sha256=checkpoint.sha256_file(f)))
    with pytest.raises(CheckpointError, match="wrong shape or dtype.*up_proj.scales: file torch.float32"):
        load_compressed(saved)


def test_unknown_format(saved):
    _edit_meta(saved, lambda m: m["modules"]["model.layers.0.mlp.up_proj"].update(format="sparse-2:4"))
    with pytest.raises(CheckpointError, match="format 'sparse-2:4', unknown to this slimlm"):
        load_compressed(saved)
    with pytest.raises(ModelLoadError, match="unknown"):
        models.resolve(str(saved))


def test_future_format_version(saved):
    _edit_meta(saved, lambda m: m.update(format_version=checkpoint.FORMAT_VERSION + 1, slimlm_version="9.0"))
    with pytest.raises(CheckpointError, match=r"format_version 2 \(written by slimlm 9\.0\).*upgrade"):
        load_compressed(saved)


@pytest.fixture(params=["bitmask", "csr", "nm"])
def saved_sparse(request, tmp_path):
    model, _ = _pruned("2:4" if request.param == "nm" else "unstructured",
                       "csr" if request.param == "csr" else "smallest", bias=True)
    return save_compressed(model, None, tmp_path / "sparse", {}), request.param


def _rewrite(path, fn, meta_fn=None):
    """Change the tensors of a saved checkpoint (and its description), recording the new size and checksum, as a
    file corrupted before it was checksummed would be."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt", "slimlm_format_version": "1"})
    _edit_meta(path, lambda m: (m.update(weights_bytes=f.stat().st_size, weights_sha256=checkpoint.sha256_file(f)),
                                meta_fn and meta_fn(m)))


def test_sparse_truncated_and_corrupt_files(saved_sparse):
    path, _ = saved_sparse
    f = path / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[:-64])  # the end of the last tensor's data is gone
    with pytest.raises(CheckpointError, match="truncated"):
        load_compressed(path)
    data = bytearray(good)
    data[-64] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its sha256 does not match"):
        load_compressed(path)


def test_sparse_truncated_values_tensor(saved_sparse):
    path, storage = saved_sparse
    key = "model.layers.0.mlp.up_proj.values"
    _rewrite(path, lambda t: t.update({key: t[key][:-3]}))
    with pytest.raises(CheckpointError, match=r"wrong shape or dtype: model\.layers\.0\.mlp\.up_proj\.values"):
        load_compressed(path)
    if storage != "nm":  # the recorded nnz edited to match (csr: its column indices cut too): the mask / row
        # pointers still tell
        cols = "model.layers.0.mlp.up_proj.cols"
        _rewrite(path, lambda t: storage == "csr" and t.update({cols: t[cols][:-3]}),
                 lambda m: m["modules"]["model.layers.0.mlp.up_proj"].update(
                     nnz=m["modules"]["model.layers.0.mlp.up_proj"]["nnz"] - 3))
        with pytest.raises(CheckpointError, match=r"is corrupt: module 'model\.layers\.0\.mlp\.up_proj' \(sparse "
                                                  + storage + r"\): its (mask marks|row pointers count) \d+ non-zeros "
                                                  r"but it holds \d+ values"):
            load_compressed(path)


def test_sparse_corrupt_index_data(saved_sparse):
    path, storage = saved_sparse
    pre = "model.layers.0.self_attn.o_proj."

    def corrupt(t):
        if storage == "bitmask":
            t[pre + "mask"][0, 0] ^= 0x01  # one more or one fewer non-zero than values
        elif storage == "csr":
            t[pre + "cols"][:2] = 255  # beyond the 160-column block
        else:
            t[pre + "indices"].zero_()  # every kept pair at position 0
    _rewrite(path, corrupt)
    why = {"bitmask": "its mask marks", "csr": "a column index of block 0 is beyond the block",
           "nm": "its positions are not increasing"}[storage]
    with pytest.raises(CheckpointError, match=rf"is corrupt: module '{pre[:-1]}' \(sparse {storage}\): {why}"):
        load_compressed(path)


def test_sparse_bad_arguments(saved_sparse):
    path, storage = saved_sparse
    name = "model.layers.0.mlp.up_proj"
    original = json.loads((path / "slimlm_quant.json").read_text())["modules"][name]
    for change in ({"storage": "semi_structured"}, {"dtype": "int8"}, {"dtype": "no_such_dtype"},
                   {"nnz": -1} if storage != "nm" else {"m": 3}):
        _edit_meta(path, lambda m, change=change: m["modules"][name].update(change))
        with pytest.raises(CheckpointError, match=rf"bad arguments for module '{name}' \(format sparse\)"):
            load_compressed(path)
        _edit_meta(path, lambda m: m["modules"].update({name: dict(original)}))
    assert load_compressed(path) is not None


def test_missing_quant_config(saved):
    (saved / "slimlm_quant.json").unlink()
    with pytest.raises(CheckpointError, match="slimlm_quant.json is missing"):
        load_compressed(saved)
    with pytest.raises(ModelLoadError, match="slimlm_quant.json is missing"):
        models.resolve(str(saved))  # not mistaken for a plain checkpoint with random linears


def test_bad_module_arguments(saved):
    _edit_meta(saved, lambda m: m["modules"]["model.layers.0.mlp.up_proj"].pop("bits"))
    with pytest.raises(CheckpointError, match="bad arguments for module 'model.layers.0.mlp.up_proj'"):
        load_compressed(saved)


def test_existing_target_and_unsavable_models(saved, tmp_path):
    with pytest.raises(UnsupportedError, match="already exists"):
        save_compressed(small_llama(), None, saved, {})
    assert load_compressed(saved) is not None  # untouched
    model = small_llama()
    model.model.layers[0].mlp.act_fn = type("Custom", (torch.nn.Module,), {"forward": lambda self, x: x})()
    with pytest.raises(UnsupportedError, match="no checkpoint format"):
        save_compressed(model, None, tmp_path / "x", {})
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x-*"))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    model = small_llama()
    with pytest.raises(OSError):
        save_compressed(model, None, tmp_path / "ckpt", {})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- pipeline, CLI, pages

def _exp(model, corpus, steps=(), **kw):
    from core.recipe import parse_experiment

    return parse_experiment({"model": str(model), "steps": list(steps), "measure": {**QUICK, "corpus": str(corpus)}, **kw})


def test_pipeline_save_and_measure_again(tiny_model_dir, corpus_file, tmp_path):
    from core.pipeline import run_experiment

    step = {"method": "rtn", "bits": 4, "group_size": 48, "symmetric": False}
    first = run_experiment(_exp(tiny_model_dir, corpus_file, [step], save_model=True), artifact_dir=tmp_path)
    saved = first["saved_model"]
    assert saved["path"] == str((tmp_path / "model").resolve()) and saved["bytes"] > saved["weights_bytes"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["saved_model"] == saved
    again = run_experiment(_exp(saved["path"], corpus_file))
    assert again["accuracy"]["perplexity"] == first["accuracy"]["perplexity"]
    assert again["accuracy"]["kl_vs_baseline"] is None and again["layers"] == []
    assert again["memory"]["weight_bytes"] == first["memory"]["weight_bytes"]
    assert again["memory"]["baseline_weight_bytes"] == first["memory"]["baseline_weight_bytes"]
    assert again["memory"]["param_count"] == first["memory"]["param_count"]
    ck = again["model"]["compressed_checkpoint"]
    assert ck["steps"] == ["RTN int4 g48 asym"] and ck["base_model"] == str(tiny_model_dir)
    assert any("compressed checkpoint" in n for n in again["notes"])
    with pytest.raises(RecipeError, match="compressed checkpoint .*RTN int4 g48 asym.*without steps"):
        run_experiment(_exp(saved["path"], corpus_file, [step]))
    no_store = run_experiment(_exp(tiny_model_dir, corpus_file, [step], save_model=True))
    assert no_store["saved_model"] is None and any("not saved" in n for n in no_store["notes"])


def test_bnb_step_cannot_be_saved():
    from core.recipe import parse_experiment

    with pytest.raises(RecipeError, match="save_model: a bitsandbytes model cannot be saved"):
        parse_experiment({"steps": [{"method": "bnb"}], "save_model": True})


def test_cli_save_model_then_model_dir(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    from core.__main__ import main

    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path / "data"))
    common = ["--corpus", str(corpus_file), "--eval-windows", "2", "--window-len", "32", "--no-latency", "--no-samples"]
    assert main(["run", "--model", str(tiny_model_dir), "--step", "rtn:bits=8", "--save-model", *common, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    path = first["saved_model"]["path"]
    assert path.startswith(str(tmp_path / "data" / "artifacts")) and path.endswith("/model")
    assert main(["run", "--model", path, *common]) == 0
    out = capsys.readouterr().out
    assert f"perplexity {first['accuracy']['perplexity']:.3f}" in out
    assert main(["run", "--model", path, "--step", "rtn:bits=4", *common]) == 2
    assert "run it without steps" in capsys.readouterr().err


def test_pages_save_checkbox_and_run_detail(tmp_path, monkeypatch):
    from core import jobs
    from core.store import Store
    from tests.test_pages import add_run, app, make_metrics, texts

    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path))
    calls = []
    monkeypatch.setattr(jobs, "submit", lambda exp, store: calls.append(exp) or f"fake{len(calls):08d}")
    at = app()
    at.checkbox(key="save_model").check()
    at.checkbox(key="preset_bnb_nf4").check()  # may be disabled here; then it is simply not submitted
    at.button(key="submit").click().run()
    assert not at.exception and not at.error
    assert {e.label(): e.save_model for e in calls if not e.steps or e.steps[0].method != "bnb"} == {
        "baseline fp32": False, "RTN int8 per-channel sym": True, "RTN int4 g64 sym": True}
    assert all(not e.save_model for e in calls if e.steps and e.steps[0].method == "bnb")

    store = Store()
    metrics = make_metrics(16.9, 110_000_000, 26.0, bits=4, group_size=64, kl=0.09, top1=0.86)
    path = str(tmp_path / "artifacts" / "some run" / "model")
    metrics["saved_model"] = {"path": path, "bytes": 120_000_000, "weights_bytes": 110_000_000}
    run_id = add_run(store, [{"method": "rtn", "bits": 4, "group_size": 64}], metrics=metrics)
    at = app("pages/run_detail.py", run=run_id)
    assert f"python -m core run --model {shlex.quote(path)}" in texts(at, "code")
    assert "114.4 MiB" in texts(at, "markdown")
