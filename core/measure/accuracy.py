"""Accuracy on fixed token windows (see core/data.py for how windows are chosen).

perplexity = exp(mean next-token NLL over every predicted position of every window);
kl_vs_baseline = mean over positions of KL(p_baseline || p_model) in nats;
top1_agreement = fraction of positions where the argmax tokens agree.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _logprobs(model, window: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(window.unsqueeze(0).to(device), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, reference=None, progress=None) -> dict:
    nll = kl = agree = 0.0
    count = 0
    for i, window in enumerate(windows):
        logp = _logprobs(model, window)
        targets = window[1:]
        nll += -logp.gather(1, targets[:, None]).sum().item()
        if reference is not None:
            ref = _logprobs(reference, window)
            kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        count += targets.numel()
        if progress:
            progress("accuracy", i + 1, len(windows))
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "kl_vs_baseline": kl / count if reference is not None else None,
        "top1_agreement": agree / count if reference is not None else None,
        "tokens": count,
        "windows": len(windows),
        "window_len": int(windows.shape[1]),
    }
