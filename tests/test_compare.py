"""core/compare.py: flat run table, Pareto frontier, share query round trip, protocols."""
import math

import pandas as pd
import pytest

from core.compare import (VIEW_DEFAULTS, pareto_mask, parse_share_query, protocol_key, runs_frame,
                          samples_by_prompt, share_query)
from core.recipe import parse_experiment
from core.store import Run


def make_run(run_id, steps=(), ppl=None, weight=None, decode=None, status="done", measure=None,
             accuracy=None, samples=None):
    exp = parse_experiment({"steps": list(steps), "measure": measure or {}})
    metrics = {}
    if ppl is not None:
        metrics["accuracy"] = {"perplexity": ppl, "nll": math.log(ppl), "kl_vs_baseline": None,
                               "top1_agreement": None, "tokens": 4080, "corpus": "brown",
                               "window_len": 256, "windows": 16, **(accuracy or {})}
    if weight is not None:
        metrics["memory"] = {"weight_bytes": weight, "baseline_weight_bytes": 538e6,
                             "compression": 538e6 / weight, "param_count": 134e6,
                             "peak_rss_bytes": 900e6, "peak_gpu_bytes": None}
    if decode is not None:
        metrics["latency"] = {"device": "cpu", "dtype": "fp32", "prompt_len": 64,
                              "prefill_ms": {"median": 10 * decode, "p90": 11 * decode},
                              "decode_ms": {"median": decode, "p90": 1.2 * decode},
                              "throughput": [{"batch": 1, "tokens_per_s": 1000 / decode, "step_ms_median": decode},
                                             {"batch": 4, "tokens_per_s": 3000 / decode, "step_ms_median": decode * 1.3}],
                              "repeats": 3, "warmup": 1}
    if samples is not None:
        metrics["samples"] = samples
    return Run(id=run_id, created=1.7e9, updated=1.7e9, label=exp.label(), experiment=exp,
               status=status, metrics=metrics)


def test_pareto_known_answer():
    df = pd.DataFrame({
        "x": [1.0, 2.0, 3.0, 2.5, 1.0, 4.0, None],
        "y": [9.0, 5.0, 4.0, 6.0, 9.5, 4.0, 1.0],
    }, index=list("abcdefg"))
    # a, b, c form the frontier; d is beaten by b, e by a, f by c (same y, larger x);
    # g has no x so it is never on the frontier.
    assert pareto_mask(df, "x", "y").to_dict() == dict(zip("abcdefg", [True, True, True, False, False, False, False]))


def test_pareto_duplicates_and_empty():
    df = pd.DataFrame({"x": [1.0, 1.0, 2.0], "y": [2.0, 2.0, 3.0]})
    assert pareto_mask(df, "x", "y").tolist() == [True, True, False]
    empty = pd.DataFrame({"x": [], "y": []})
    assert pareto_mask(empty, "x", "y").tolist() == []
    assert pareto_mask(df, "x", "missing").tolist() == [False, False, False]


def test_share_round_trip():
    ids = ["abc123", "def456", "0a1b2c"]
    view = {"y": "kl_vs_baseline", "mem": "peak_rss_mib", "lat": "prefill_ms", "log": True}
    q = share_query(ids, **view)
    assert q["runs"] == "abc123,def456,0a1b2c" and q["log"] == "1"
    assert all(isinstance(v, str) for v in q.values())
    assert parse_share_query(q) == (ids, view)


def test_parse_share_query_defaults_and_bad_values():
    assert parse_share_query({}) == ([], VIEW_DEFAULTS)
    ids, view = parse_share_query({"runs": ["a, b,,a", "c"], "y": "bogus", "log": "true"})
    assert ids == ["a", "b", "c"]
    assert view == {**VIEW_DEFAULTS, "log": True}


def test_runs_frame_flattens_and_names_duplicates():
    runs = [
        make_run("aaaaaa111111", ppl=15.0, weight=538e6, decode=20.0),
        make_run("bbbbbb222222", [{"method": "rtn", "bits": 4, "group_size": 64}], ppl=16.0, weight=160e6, decode=25.0,
                 accuracy={"kl_vs_baseline": 0.05, "top1_agreement": 0.9}),
        make_run("cccccc333333", [{"method": "rtn", "bits": 4, "group_size": 64}], status="failed"),
    ]
    df = runs_frame(runs)
    assert list(df["id"]) == [r.id for r in runs]
    assert df.loc[0, "display"] == "baseline fp32"
    assert df.loc[1, "display"] == "RTN int4 g64 sym · bbbbbb" and df.loc[2, "display"] == "RTN int4 g64 sym · cccccc"
    assert df.loc[1, "weight_mib"] == pytest.approx(160e6 / 2**20)
    assert df.loc[1, "kl_vs_baseline"] == pytest.approx(0.05)
    assert df.loc[0, "decode_ms"] == 20.0 and df.loc[0, "tokens_per_s_b4"] == pytest.approx(150.0)
    assert math.isnan(df.loc[2, "perplexity"]) and math.isnan(df.loc[0, "kl_vs_baseline"])
    assert runs_frame([]).empty


def test_protocol_key():
    a = make_run("a", ppl=15.0)
    b = make_run("b", [{"method": "rtn", "bits": 8}], ppl=15.1)
    c = make_run("c", ppl=14.0, accuracy={"window_len": 512})
    queued = make_run("d", measure={"eval_windows": 16, "window_len": 256})
    assert protocol_key(a) == protocol_key(b) == ("smollm2-135m", "brown", 256, 16)
    assert protocol_key(c) != protocol_key(a)
    assert protocol_key(queued) == protocol_key(a)  # falls back to the requested settings


def test_samples_by_prompt():
    runs = [make_run("a", samples=[{"prompt": "P1", "output": "x"}, {"prompt": "P2", "output": "y"}]),
            make_run("b", samples=[{"prompt": "P1", "output": "z"}])]
    assert samples_by_prompt(runs, {"a": "A", "b": "B"}) == {"P1": {"A": "x", "B": "z"}, "P2": {"A": "y"}}


def test_output_error_frame():
    from core.compare import output_error_frame

    layers = [{"name": "a", "method": "gptq", "out_rel_error": 0.1, "rtn_out_rel_error": 0.2},
              {"name": "b", "method": "w8a8", "out_rel_error": 0.01, "rtn_out_rel_error": 0.03},
              {"name": "c", "rel_error": 0.05}]  # RTN: no calibration data, no output error
    df = output_error_frame(layers)
    assert list(df["layer"]) == ["a", "a", "b", "b"]
    assert list(df["error"]) == [0.2, 0.1, 0.03, 0.01]
    assert df["stage"].iloc[1] == "after: GPTQ" and "no smoothing" in df["stage"].iloc[2]
    assert output_error_frame([{"name": "c", "rel_error": 0.05}]).empty
