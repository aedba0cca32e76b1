"""Distillation losses (pure functions on tensors).

Logits are [..., V]; every loss is computed in float32 and averaged over token positions (all leading dims).
The teacher is a fixed target: its logits and hidden states are detached. Divergences between the
temperature-softened distributions are multiplied by temperature**2 (Hinton et al. 2015), which keeps their
gradients on the same scale as at temperature 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("kl", "reverse_kl", "js", "ce", "hidden")


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape: distillation needs the same vocabulary "
                         "and the same token windows")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return log_s, log_t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities (summed over the vocabulary)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student): mean-seeking, the student covers every token the teacher considers."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_t, log_s).mean() * temperature**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_student || p_teacher): mode-seeking, the student concentrates on the teacher's likeliest tokens."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_s, log_t).mean() * temperature**2


def js_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """0.5 KL(p_t || m) + 0.5 KL(p_s || m), m = (p_t + p_s) / 2; symmetric and at most ln 2 (times temperature**2)."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2)  # no underflow of tiny probabilities
    return (0.5 * (_kl(log_t, log_m) + _kl(log_s, log_m))).mean() * temperature**2


def next_token_ce(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting input_ids[..., t + 1] from position t (labels of -100 are ignored)."""
    if student_logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    logits = student_logits[..., :-1, :].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[..., 1:].reshape(-1))


def layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student, teacher) pairs of 1-based indices into transformers' hidden_states (0, the embeddings, is left
    out): student layer i <-> teacher layer ceil(i * n_teacher / n_student), so the teacher's layers are evenly
    spaced, the last student layer meets the last teacher layer, and equal depths map one to one."""
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be at least 1, got student {n_student} and teacher {n_teacher}")
    return [(i, -(-i * n_teacher // n_student)) for i in range(1, n_student + 1)]


def hidden_size_of(config) -> int:
    """The hidden width of a transformers config (its text model's, for multimodal configs)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if size is None:
        raise ValueError(f"the {type(config).__name__} has no hidden_size: cannot match hidden states")
    return int(size)


class HiddenProjector(nn.Module):
    """One learned linear map per layer pair from the student's hidden width to the teacher's (identity at
    initialisation when the widths are equal)."""

    def __init__(self, student_hidden: int, teacher_hidden: int, n_pairs: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden, bias=False) for _ in range(n_pairs))
        if student_hidden == teacher_hidden:
            for p in self.proj:
                nn.init.eye_(p.weight)

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        proj = self.proj[i]
        return proj(h.to(proj.weight.dtype))


def make_projector(student_config, teacher_config, pairs) -> HiddenProjector | None:
    """A projector for hidden_mse when the widths differ; None when they are equal (nothing to learn then)."""
    s, t = hidden_size_of(student_config), hidden_size_of(teacher_config)
    return None if s == t else HiddenProjector(s, t, len(pairs))


def hidden_mse(student_hidden, teacher_hidden, pairs, projector: HiddenProjector | None = None) -> torch.Tensor:
    """Mean over layer pairs of MSE(project(h_s), h_t) / mean(h_t**2): scale-free, so layers with large
    activations do not dominate. student_hidden / teacher_hidden: transformers' hidden_states tuples."""
    if not pairs:
        raise ValueError("hidden-state matching needs at least one (student, teacher) layer pair")
    losses = []
    for k, (i, j) in enumerate(pairs):
        if not (0 <= i < len(student_hidden) and 0 <= j < len(teacher_hidden)):
            raise ValueError(f"layer pair ({i}, {j}) is out of range: the student has {len(student_hidden) - 1} "
                             f"layers and the teacher {len(teacher_hidden) - 1}")
        hs, ht = student_hidden[i].float(), teacher_hidden[j].detach().float()
        if projector is not None:
            hs = projector(k, hs)
        if hs.shape != ht.shape:
            raise ValueError(f"student hidden states {tuple(hs.shape)} do not match the teacher's {tuple(ht.shape)}"
                             f" at layer pair ({i}, {j}): widths differ, so pass a projector (make_projector)")
        denom = ht.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)
        losses.append(F.mse_loss(hs, ht) / denom)
    return torch.stack(losses).mean()


@dataclass
class LossConfig:
    """Weights of the loss terms (0 = not computed) and the softening temperature of the divergences."""

    kl: float = 1.0
    reverse_kl: float = 0.0
    js: float = 0.0
    ce: float = 0.0
    hidden: float = 0.0
    temperature: float = 1.0

    @property
    def needs_hidden(self) -> bool:
        return self.hidden > 0

    def weights(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in LOSS_NAMES}

    def validate(self) -> None:
        w = self.weights()
        negative = [n for n, v in w.items() if not v >= 0]  # also catches NaN
        if negative:
            raise ValueError(f"loss weights must not be negative: {', '.join(f'{n}={w[n]}' for n in negative)}")
        if not any(w.values()):
            raise ValueError(f"at least one loss weight ({', '.join(LOSS_NAMES)}) must be positive")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def distill_loss(student_out, teacher_out, input_ids: torch.Tensor, cfg: LossConfig,
                 projector: HiddenProjector | None = None, pairs=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms with a positive weight in cfg, and each of those terms unweighted (floats).
    student_out / teacher_out: transformers model outputs (.logits; .hidden_states when cfg.needs_hidden, i.e.
    both models ran with output_hidden_states=True). pairs default to layer_map of the two depths."""
    cfg.validate()
    T = cfg.temperature
    divergences = {"kl": forward_kl, "reverse_kl": reverse_kl, "js": js_divergence}
    terms: dict[str, torch.Tensor] = {}
    for name, weight in cfg.weights().items():
        if weight == 0:
            continue
        if name in divergences:
            terms[name] = divergences[name](student_out.logits, teacher_out.logits, T)
        elif name == "ce":
            terms[name] = next_token_ce(student_out.logits, input_ids)
        else:
            hs, ht = getattr(student_out, "hidden_states", None), getattr(teacher_out, "hidden_states", None)
            if hs is None or ht is None:
                raise ValueError("hidden-state matching needs both models run with output_hidden_states=True")
            terms[name] = hidden_mse(hs, ht, pairs or layer_map(len(hs) - 1, len(ht) - 1), projector)
    total = sum(cfg.weights()[n] * t for n, t in terms.items())
    return total, {n: float(t.detach()) for n, t in terms.items()}
