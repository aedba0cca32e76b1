import math

import pytest
import torch

from core import models
from core.measure.accuracy import evaluate
from core.measure.latency import measure_latency, summarize
from core.measure.memory import peak_rss, reset_peak


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    src = models.resolve(str(tiny_model_dir))
    return models.load_model(src), models.load_tokenizer(src)


def _windows(vocab, n=3, length=24):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n, length), generator=g)


def test_perplexity_matches_transformers_loss(tiny):
    model, _ = tiny
    w = _windows(model.config.vocab_size)
    acc = evaluate(model, w)
    with torch.no_grad():
        losses = [model(x[None], labels=x[None]).loss.item() for x in w]
    assert acc["tokens"] == 3 * 23
    assert acc["perplexity"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)
    assert acc["kl_vs_baseline"] is None and acc["top1_agreement"] is None


def test_kl_zero_against_itself_and_positive_when_perturbed(tiny):
    import copy

    model, _ = tiny
    w = _windows(model.config.vocab_size)
    same = evaluate(model, w, reference=model)
    assert same["kl_vs_baseline"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diff = evaluate(noisy, w, reference=model)
    # KL(ref || noisy) computed by hand for one window
    with torch.no_grad():
        lp = torch.log_softmax(noisy(w[:1]).logits[0, :-1].float(), -1)
        lr = torch.log_softmax(model(w[:1]).logits[0, :-1].float(), -1)
    one = (lr.exp() * (lr - lp)).sum(-1).mean().item()
    assert diff["kl_vs_baseline"] > 0 and one > 0
    assert 0 <= diff["top1_agreement"] < 1


def test_latency_reports_prefill_decode_and_throughput(tiny):
    model, _ = tiny
    prompt = _windows(model.config.vocab_size, 1, 16)[0]
    lat = measure_latency(model, prompt, decode_tokens=4, batch_sizes=[1, 2], warmup=1, repeats=2)
    assert lat["prompt_len"] == 16
    assert lat["decode_ms"]["n"] == 2 * 4
    assert 0 < lat["decode_ms"]["median"] <= lat["decode_ms"]["p90"]
    assert [t["batch"] for t in lat["throughput"]] == [1, 2]
    assert all(t["tokens_per_s"] > 0 for t in lat["throughput"])


def test_summarize_median_p90():
    s = summarize([i / 1000 for i in range(1, 11)])
    assert s["median"] == pytest.approx(5.5) and s["p90"] == pytest.approx(9.0)


def test_peak_rss_reset_forgets_an_earlier_peak():
    from core.measure.memory import current_rss

    big = torch.ones(300 * 2**20 // 4)  # a large allocation is mmapped and returned to the OS on free
    high = peak_rss()
    assert high >= current_rss() - 2**20  # VmHWM is updated lazily, within a few pages
    del big
    assert peak_rss() >= high - 2**22  # the peak remembers it (RSS counters lag by a few pages) ...
    reset_peak()
    assert peak_rss() < high - 200 * 2**20  # ... until reset
