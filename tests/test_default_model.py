"""Integration on the real default model (SmolLM2-135M from its GGUF), kept short."""
import pytest

from core.pipeline import run_experiment
from core.recipe import parse_experiment
from tests.conftest import requires_default_model

pytestmark = [pytest.mark.model, requires_default_model()]

MEASURE = {"eval_windows": 4, "window_len": 256, "latency": False, "samples": False}


def _run(*steps):
    return run_experiment(parse_experiment({"model": "smollm2-135m", "steps": list(steps), "measure": MEASURE}))


def test_rtn_int8_close_to_baseline_and_int4_really_smaller():
    base = _run()
    int8 = _run({"method": "rtn", "bits": 8})
    int4 = _run({"method": "rtn", "bits": 4, "group_size": 128})  # 128 does not divide 576
    ppl = base["accuracy"]["perplexity"]
    assert 5 < ppl < 200
    assert abs(int8["accuracy"]["perplexity"] / ppl - 1) < 0.005
    assert int8["accuracy"]["top1_agreement"] > 0.95
    assert int4["accuracy"]["perplexity"] > int8["accuracy"]["perplexity"]
    # 4-bit codes + fp16 scales for the 210 decoder linears; tied embedding / lm_head stay float32
    layers = int4["layers"]
    assert len(layers) == 30 * 7 and {tuple(layer["shape"]) for layer in layers} >= {(576, 1536), (1536, 576)}
    expected = sum(o * -(-i // 2) + o * -(-i // 128) * 2 for o, i in (layer["shape"] for layer in layers))
    assert sum(layer["bytes"] for layer in layers) == expected
    mem = int4["memory"]
    assert mem["baseline_weight_bytes"] - mem["weight_bytes"] == sum(layer["orig_bytes"] - layer["bytes"] for layer in layers)
    assert mem["compression"] > 2.5
