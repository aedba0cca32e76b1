"""Distillation as a step of an experiment (core/pipeline.py): pick the teacher and the student, draw the
training and held-out windows, train in this process or through torchrun, and report what it cost (steps,
tokens, wall time, device) and what it recovered (perplexity before / after on the measurement windows, next
to the teacher's)."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch

from .. import data, models
from ..errors import RecipeError, SlimError
from ..measure.accuracy import evaluate
from ..recipe import PRUNE_METHODS
from .log import read_log
from .losses import LossConfig
from .trainer import TrainOptions


class DistillInterrupted(SlimError):
    pass


MAX_CURVE_POINTS = 500  # train-loss points kept in the run's metrics (the live log keeps every step)


def train_options(step) -> TrainOptions:
    names = {f.name for f in fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in step.model_dump().items() if k in names})


def loss_config(step) -> LossConfig:
    return LossConfig(kl=step.kl, reverse_kl=step.reverse_kl, js=step.js, ce=step.ce, hidden=step.hidden,
                      temperature=step.temperature)


def recovered_fraction(before: float, after: float, teacher: float) -> float | None:
    """Share of the student's perplexity gap to the teacher that training closed (None when there was no gap)."""
    gap = before - teacher
    return (before - after) / gap if gap > 0 else None


def _teacher(step, ctx):
    if step.teacher == "baseline":
        if ctx.reference is None:
            raise RecipeError("distillation from the baseline needs the uncompressed model, which this run did not keep")
        return ctx.reference
    src = models.resolve(step.teacher)
    if models.load_tokenizer(src).get_vocab() != ctx.tokenizer.get_vocab():
        raise RecipeError(f"teacher {step.teacher} has a different tokenizer from the student's model: "
                          "distillation compares next-token distributions, so both need the same vocabulary")
    return models.load_model(src, "fp32", ctx.device)


def _downsample(points: list[dict], n: int) -> list[dict]:
    if len(points) <= n:
        return points
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in idx]


def apply_distill(model, step, ctx):
    """Distil into `model` (or into a smaller student built from it); returns the trained model, which replaces
    `model` in the chain. Appends the step's report to ctx.distill."""
    from .student import smaller_student

    teacher = _teacher(step, ctx)
    info_student = {"kind": "the compressed model"}
    if step.smaller_student():
        model, init = smaller_student(teacher, step.student_layers, step.student_hidden_size,
                                      step.student_intermediate_size)
        model = model.to(ctx.device)
        info_student = {"kind": "smaller configuration", **init}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    model.float()  # train float32 master weights (bf16 autocast on GPU); cast back at the end

    d, m = step.data, ctx.measure
    train = data.calibration_windows(ctx.tokenizer, d.corpus, d.window_len, d.windows, d.seed)
    val = data.validation_windows(ctx.tokenizer, m.corpus, m.window_len, step.val_windows, m.eval_windows)
    ctx.progress("distill: perplexity before", 0, 1)
    before = evaluate(model, ctx.eval_windows)
    teacher_eval = evaluate(teacher, ctx.eval_windows)

    with _work_dir(ctx) as (out_dir, kept):
        model, result = _train(model, teacher, step, ctx, out_dir, train, val)
        log = read_log(out_dir / "log.jsonl")
    if teacher is not ctx.reference:
        del teacher
    model.to(dtype if dtype.is_floating_point else torch.float32)

    ctx.progress("distill: perplexity after", 0, 1)
    after = evaluate(model, ctx.eval_windows)
    ctx.distill.append({
        "step": step.label(),
        "teacher": step.teacher,
        "student": {**info_student, **(result.get("student") or {})},
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "teacher_perplexity": teacher_eval["perplexity"],
        "recovered_fraction": recovered_fraction(before["perplexity"], after["perplexity"], teacher_eval["perplexity"]),
        "eval_tokens": after["tokens"],
        "train": {k: v for k, v in result.items() if k != "student"},
        "train_windows": int(train.shape[0]), "train_window_len": int(train.shape[1]),
        "val_windows": int(val.shape[0]),
        "curve": _downsample([r for r in log if r.get("kind") == "train"], MAX_CURVE_POINTS),
        "evals": [r for r in log if r.get("kind") == "eval"],
        "log": str(out_dir / "log.jsonl") if kept else None,
    })
    return model


@contextmanager
def _work_dir(ctx):
    """(directory for the checkpoint and live log, whether it is kept): the run's artifacts, or a temporary
    directory for in-process use without a store."""
    if ctx.artifact_dir is None:
        with tempfile.TemporaryDirectory(prefix="slimlm-distill-") as tmp:
            yield Path(tmp), False
        return
    out_dir = Path(ctx.artifact_dir) / f"distill-{ctx.step_index}"
    out_dir.mkdir(parents=True, exist_ok=True)
    yield out_dir, True


def _train(model, teacher, step, ctx, out_dir: Path, train, val):
    """Train in this process or with torchrun; returns (the re-packed student, the trainer's result)."""
    from .student import prepare_student

    opts, loss = train_options(step), loss_config(step)
    # Zeros are pruned weights only after a pruning step: low-bit rounding alone makes 20-40 % of codes zero.
    keep_masks = any(m in PRUNE_METHODS for m in ctx.methods[:ctx.step_index])
    if step.nproc > 1 or step.launcher == "torchrun":
        from .launch import run_torchrun, write_job

        write_job(out_dir, model.cpu(), teacher.cpu(), train, val, opts, loss, keep_masks)
        teacher.to(ctx.device)
        model, result = run_torchrun(out_dir, step.nproc, progress=ctx.progress)
        model = model.to(ctx.device)
    else:
        from .trainer import train as run_training

        prepared = prepare_student(model, keep_masks)
        result = run_training(prepared, teacher, train, val, opts, loss, out_dir, progress=ctx.progress)
        model = prepared.finalize()
    if result.get("stopped") == "interrupted":
        raise DistillInterrupted(f"Distillation stopped at step {result.get('steps')} of {opts.max_steps} (interrupted); "
                                 f"its checkpoint is in {out_dir}. Resume the run to continue from it.")
    for f in out_dir.glob("*.pt"):  # checkpoint and torchrun job files: only a stopped run needs them
        f.unlink()
    return model, result
