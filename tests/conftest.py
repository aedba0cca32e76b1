"""Shared fixtures: a tiny random-weight causal LM with a real (freshly trained) tokenizer, a
small text corpus, and an isolated store. The real default model is used only by tests marked
`model`, which skip when the assets have not been fetched (scripts/setup.sh fetches them)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

TEXT = (
    "The jury said the election was conducted well. The city committee deserves praise and thanks. "
    "Ocean waves roll over the sand while gulls cry above the harbour. "
    "A small model learns to predict the next word from the words before it. "
) * 40


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained on TEXT."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(d)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d)
    return d


@pytest.fixture
def store(tmp_path, monkeypatch):
    from core.store import Store

    monkeypatch.setenv("SLIMLM_DATA", str(tmp_path / "data"))
    return Store()


def default_model_ready() -> bool:
    from core.assets import default_model_dir

    return (default_model_dir() / "config.json").exists()


def requires_default_model():
    return pytest.mark.skipif(not default_model_ready(), reason="default model not fetched; run scripts/setup.sh")


def pytest_sessionstart(session):
    """In CI (CI=true) .ci/run has installed everything: a missing asset must fail the run rather
    than silently skip the integration and browser tests."""
    if os.environ.get("CI"):
        from core.assets import brown_dir

        missing = [what for what, ok in (("default model", default_model_ready()),
                                         ("Brown corpus", (brown_dir() / "cats.txt").exists()),
                                         ("/usr/bin/chromium", Path("/usr/bin/chromium").exists())) if not ok]
        if missing:
            pytest.exit(f"CI: missing {', '.join(missing)} although .ci/run should have installed it", returncode=3)
