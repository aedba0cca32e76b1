import json

import pytest

from core import models
from core.errors import ModelLoadError


def _load(spec):
    return models.load_model(models.resolve(spec))


def test_loads_local_checkpoint(tiny_model_dir):
    src = models.resolve(str(tiny_model_dir))
    model = models.load_model(src)
    info = models.model_info(src, model)
    assert info["architecture"] == "LlamaForCausalLM" and info["params"] > 0
    assert models.load_tokenizer(src).pad_token is not None


def test_wrong_path():
    with pytest.raises(ModelLoadError, match="not found"):
        _load("/no/such/dir")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        _load("/no/such/model.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(str(tmp_path))


def test_non_causal_architecture_refused(tmp_path):
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        _load(str(tmp_path))
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=37).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelLoadError, match="not supported|not a causal"):
        _load(str(tmp_path / "t5"))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch-xyz"}))
    with pytest.raises(ModelLoadError, match="unsupported or unknown architecture"):
        _load(str(tmp_path))


def test_corrupt_and_fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(range(256)) * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        _load(str(bad))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    with pytest.raises(ModelLoadError, match="corrupt, truncated"):
        _load(str(corrupt))


def test_truncated_real_gguf(tmp_path, monkeypatch):
    from core.assets import default_gguf_path

    src = default_gguf_path()
    if not src.exists():
        pytest.skip("default .gguf not fetched; run scripts/setup.sh")
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match="corrupt, truncated"):
        _load(str(cut))
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").glob("*/config.json"))


def test_hub_id_offline_gives_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="hub"):
        _load("someorg/some-model-that-does-not-exist")
