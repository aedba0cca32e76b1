import pytest

from core.errors import RecipeError
from core.recipe import Experiment, parse_experiment, parse_step


def test_defaults_roundtrip_json():
    exp = parse_experiment({"steps": [{"method": "rtn", "bits": 4, "group_size": 128}]})
    again = parse_experiment(exp.model_dump_json())
    assert again == exp
    assert exp.label() == "RTN int4 g128 sym"
    assert Experiment().label() == "baseline fp32"


@pytest.mark.parametrize("bits", [0, 1, 9, -3])
def test_bits_out_of_range(bits):
    with pytest.raises(RecipeError, match=rf"steps\.0\.bits: bits must be between 2 and 8, got {bits}"):
        parse_experiment({"steps": [{"method": "rtn", "bits": bits}]})


@pytest.mark.parametrize("group", [0, -64])
def test_group_size_must_be_positive(group):
    with pytest.raises(RecipeError, match="group_size must be a positive"):
        parse_experiment({"steps": [{"method": "rtn", "group_size": group}]})


def test_unknown_fields_and_methods_are_rejected():
    with pytest.raises(RecipeError, match="bitz"):
        parse_experiment({"steps": [{"method": "rtn", "bitz": 4}]})
    with pytest.raises(RecipeError):
        parse_experiment({"steps": [{"method": "magic"}]})
    with pytest.raises(RecipeError, match="eval_windows"):
        parse_experiment({"measure": {"eval_windows": 0}})
    with pytest.raises(RecipeError, match="batch_sizes"):
        parse_experiment({"measure": {"batch_sizes": []}})


def test_gptq_shares_the_weight_quant_checks():
    with pytest.raises(RecipeError, match="bits must be between 2 and 8, got 1"):
        parse_experiment({"steps": [{"method": "gptq", "bits": 1}]})
    with pytest.raises(RecipeError, match="calibration.windows"):
        parse_experiment({"steps": [{"method": "gptq", "calibration": {"windows": 0}}]})
    exp = parse_experiment({"steps": [{"method": "gptq", "bits": 3, "group_size": 64, "act_order": True}]})
    assert exp.label() == "GPTQ int3 g64 sym act-order"


def test_bnb_must_come_first():
    with pytest.raises(RecipeError, match="must be the first step"):
        parse_experiment({"steps": [{"method": "rtn"}, {"method": "bnb", "mode": "nf4"}]})
    exp = parse_experiment({"steps": [{"method": "bnb", "mode": "int8"}]})
    assert exp.label() == "bnb LLM.int8"


def test_cli_step_syntax():
    assert parse_step("rtn:bits=3,group_size=64,symmetric=false") == {"method": "rtn", "bits": 3, "group_size": 64, "symmetric": False}
    assert parse_step("bnb:mode=nf4") == {"method": "bnb", "mode": "nf4"}
    assert parse_step("gptq:bits=3,calibration.windows=8,calibration.corpus=/tmp/x.txt") == {
        "method": "gptq", "bits": 3, "calibration": {"windows": 8, "corpus": "/tmp/x.txt"}}
    with pytest.raises(RecipeError, match="Unknown step"):
        parse_step("gptqq:bits=4")
    with pytest.raises(RecipeError, match="key=value"):
        parse_step("rtn:bits")
