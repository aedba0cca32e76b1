"""The distillation trainer (core/distill/trainer.py) and its torchrun launcher (core/distill/launch.py), on CPU
with the tiny model: distillation recovers a pruned student, resume continues the exact trajectory, a changed
option refuses the checkpoint, and 2 torchrun processes (DDP, FSDP2) follow the 1-process trajectory."""
from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.distill.launch import run_torchrun, write_job
from core.distill.log import read_log
from core.distill.losses import LossConfig
from core.distill.student import prepare_student, smaller_student
from core.distill.trainer import CheckpointMismatch, TrainOptions, stream_indices, train
from core.quant.linear import QuantLinear, quantize_model_rtn
from core.recipe import RTNStep
from tests.conftest import TEXT

WINDOW = 32
FAST = {"lr": 3e-3, "warmup_steps": 2, "eval_every": 4, "checkpoint_every": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons need the same reduction order from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def windows(tiny_model_dir):
    """(train, val) windows of the tokenized corpus."""
    ids = torch.tensor(AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT)["input_ids"])
    w = ids[: len(ids) // WINDOW * WINDOW].view(-1, WINDOW)
    return w[:-16], w[-16:]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, windows):
    """The tiny model trained briefly on the corpus, so that it has something to teach."""
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = windows[0][torch.randint(len(windows[0]), (8,), generator=g)]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval().requires_grad_(False)


def pruned(model, fraction: float = 0.5):
    """A copy with the smallest `fraction` of each decoder-layer linear's weights zeroed."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(w.numel() * fraction)).values] = 0
    return model


def rtn(model):
    model = copy.deepcopy(model)
    quantize_model_rtn(model, RTNStep(bits=4, group_size=32))
    return model


def train_losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_log(out_dir / "log.jsonl") if r["kind"] == "train"]


def test_data_order_does_not_depend_on_world_size():
    """The global batch of a step is the same windows whether 1 rank takes 8 or 2 ranks take 4 each."""
    one = stream_indices(0, 10, 3 * 8, 8)
    two = torch.cat([stream_indices(0, 10, (3 * 2 + r) * 4, 4) for r in range(2)])
    assert torch.equal(one, two)
    epoch = stream_indices(0, 10, 0, 10)
    assert sorted(epoch.tolist()) == list(range(10))  # each epoch is a permutation
    assert not torch.equal(epoch, stream_indices(0, 10, 10, 10))  # reshuffled the next epoch


def test_distillation_recovers_pruned_student(teacher, windows, tmp_path):
    student = pruned(teacher)
    zero = {n: p == 0 for n, p in student.named_parameters() if "layers" in n and p.dim() == 2}
    prepared = prepare_student(student)
    result = train(prepared, teacher, *windows, TrainOptions(max_steps=30, **{**FAST, "eval_every": 10}),
                   LossConfig(kl=1.0), tmp_path)

    losses = train_losses(tmp_path)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert result["final_val_ppl"] < result["initial_val_ppl"]
    assert [h["step"] for h in result["val_history"]] == [0, 10, 20, 30]
    assert result["stopped"] == "max_steps" and result["steps"] == 30 and result["world_size"] == 1
    assert result["tokens"] == 30 * 4 * WINDOW and result["tokens_per_s"] > 0 and result["device"] == "cpu"
    evals = [r for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "eval"]
    assert [r["val_ppl"] for r in evals] == [h["val_ppl"] for h in result["val_history"]]

    params = dict(prepared.model.named_parameters())  # as trained (finalize() would re-apply the masks)
    for name, was_zero in zero.items():
        assert (params[name][was_zero] == 0).all(), f"{name}: pruned weights grew back"


def test_resume_continues_exactly(teacher, windows, tmp_path):
    """Run A: 12 steps straight. Run B: interrupted after step 6, resumed: the same steps 7..12. The student is
    RTN-quantized, so fake quantization and its buffers go through the checkpoint too."""
    opts = TrainOptions(max_steps=12, **FAST)
    student = rtn(pruned(teacher))
    a = train(prepare_student(copy.deepcopy(student)), teacher, *windows, opts, LossConfig(kl=1.0, ce=0.5), tmp_path / "a")

    prepared = prepare_student(copy.deepcopy(student))
    first = train(prepared, teacher, *windows, opts, LossConfig(kl=1.0, ce=0.5), tmp_path / "b", stop_after=6)
    assert first["interrupted"] and first["stopped"] == "interrupted" and first["steps"] == 6
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write('{"kind": "train", "step": 7, "loss": 99.0}\n{"kind": "tra')
    prepared = prepare_student(copy.deepcopy(student))  # a new process: the student as it was before training
    b = train(prepared, teacher, *windows, opts, LossConfig(kl=1.0, ce=0.5), tmp_path / "b")

    assert b["resumed_from_step"] == 6 and b["steps"] == 12 and a["resumed_from_step"] is None
    torch.testing.assert_close(train_losses(tmp_path / "b"), train_losses(tmp_path / "a"), rtol=1e-6, atol=1e-7)
    log = read_log(tmp_path / "b" / "log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 4, 8, 12]
    assert b["tokens"] == a["tokens"] == log[-1]["tokens"]
    assert b["val_history"] == a["val_history"]
    assert isinstance(prepared.finalize().model.layers[0].mlp.down_proj, QuantLinear)


def test_changed_option_refuses_checkpoint(teacher, windows, tmp_path):
    prepared = prepare_student(pruned(teacher))
    train(prepared, teacher, *windows, TrainOptions(max_steps=4, **FAST), LossConfig(), tmp_path, stop_after=2)

    changed = TrainOptions(max_steps=4, **{**FAST, "lr": 1e-3})
    with pytest.raises(CheckpointMismatch, match=r"lr: 0\.003 -> 0\.001.*resume=False"):
        train(prepare_student(pruned(teacher)), teacher, *windows, changed, LossConfig(), tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"loss\.temperature: 1\.0 -> 2\.0"):
        train(prepare_student(pruned(teacher)), teacher, *windows, TrainOptions(max_steps=4, **FAST),
              LossConfig(temperature=2.0), tmp_path)

    fresh = train(prepare_student(pruned(teacher)), teacher, *windows, changed, LossConfig(), tmp_path, resume=False)
    assert fresh["resumed_from_step"] is None and fresh["steps"] == 4
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_stops_at_a_step_boundary(teacher, windows, tmp_path):
    opts = TrainOptions(max_steps=50, time_budget_s=1e-6, **FAST)
    result = train(prepare_student(pruned(teacher)), teacher, *windows, opts, LossConfig(), tmp_path / "budget")
    assert result["stopped"] == "time_budget" and result["steps"] == 1
    assert [h["step"] for h in result["val_history"]] == [0, 1]  # a final evaluation all the same

    def sigterm_at_step_3(stage, step, total):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    result = train(prepare_student(pruned(teacher)), teacher, *windows, TrainOptions(max_steps=50, **FAST),
                   LossConfig(), tmp_path / "signal", progress=sigterm_at_step_3)
    assert result["stopped"] == "interrupted" and result["steps"] == 3
    assert torch.load(tmp_path / "signal" / "checkpoint.pt", weights_only=False)["small"]["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == handler  # restored

    with pytest.raises(ValueError, match="warmup_steps"):
        TrainOptions(max_steps=5, warmup_steps=10).validate()


def test_early_stop_restores_best_weights(teacher, windows, tmp_path):
    """Training on random tokens (cross-entropy only) makes the student forget the text, so its held-out
    perplexity is best at step 0; patience 2 stops at the second evaluation after it."""
    noise = torch.randint(int(windows[0].max()) + 1, (32, WINDOW), generator=torch.Generator().manual_seed(0))
    student = pruned(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    prepared = prepare_student(student)
    result = train(prepared, teacher, noise, windows[1], TrainOptions(max_steps=40, patience=2, **FAST),
                   LossConfig(kl=0.0, ce=1.0), tmp_path)
    assert result["stopped"] == "early_stop" and result["steps"] == 8
    assert result["restored_best_step"] == 0 and result["best_val_ppl"] == result["initial_val_ppl"]
    assert result["final_val_ppl"] > result["initial_val_ppl"] == result["student_val_ppl"]
    for k, v in prepared.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def _reference_run(student, teacher, windows, opts, loss_cfg, out_dir):
    """One process with grad_accum=2: the same global batches as 2 processes with grad_accum=1."""
    result = train(prepare_student(copy.deepcopy(student)), teacher, *windows, opts, loss_cfg, out_dir)
    return train_losses(out_dir), [h["val_nll"] for h in result["val_history"]]


def test_torchrun_ddp_matches_one_process(teacher, windows, tmp_path):
    """DDP over 2 gloo processes, with a narrower student whose hidden states go through a learned projector
    (replicated outside DDP: its gradients are averaged by the trainer)."""
    torch.manual_seed(0)
    student, _ = smaller_student(teacher, hidden_size=32)
    loss_cfg = LossConfig(kl=1.0, hidden=0.5)
    opts = TrainOptions(max_steps=6, micro_batch=4, grad_accum=2, **FAST)
    losses, val_nll = _reference_run(student, teacher, windows, opts, loss_cfg, tmp_path / "one")

    write_job(tmp_path / "job", student, teacher, *windows, TrainOptions(max_steps=6, micro_batch=4, **FAST), loss_cfg)
    seen = []
    final, result = run_torchrun(tmp_path / "job", 2, progress=lambda stage, step, total: seen.append(step))
    assert result["world_size"] == 2 and result["strategy"] == "ddp" and result["steps"] == 6
    assert result["student"]["trainable_params"] > 0 and seen[-1] == 6
    torch.testing.assert_close(train_losses(tmp_path / "job"), losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close([h["val_nll"] for h in result["val_history"]], val_nll, rtol=1e-4, atol=1e-6)
    assert "hidden" in read_log(tmp_path / "job" / "log.jsonl")[1]["parts"]
    assert isinstance(final, torch.nn.Module) and not final.training


def test_torchrun_fsdp_resumes_and_matches_one_process(teacher, windows, tmp_path):
    """FSDP2 over 2 gloo processes, with a pruned and RTN-quantized student (masks applied to the sharded
    weights; the gathered weights packed back into QuantLinear). The job starts in this process (stop after
    step 2) and the 2 processes resume its checkpoint. 9 held-out windows: the ranks' shards are uneven and one
    rank evaluates a padding batch."""
    student = rtn(pruned(teacher))
    windows = (windows[0], windows[1][:9])
    opts = TrainOptions(max_steps=4, micro_batch=4, grad_accum=2, **FAST)
    losses, val_nll = _reference_run(student, teacher, windows, opts, LossConfig(), tmp_path / "one")

    job = tmp_path / "job"
    write_job(job, student, teacher, *windows, TrainOptions(max_steps=4, micro_batch=4, strategy="fsdp", **FAST),
              LossConfig())
    train(prepare_student(copy.deepcopy(student)), teacher, *windows, opts, LossConfig(), job, stop_after=2)
    final, result = run_torchrun(job, 2)
    assert result["world_size"] == 2 and result["strategy"] == "fsdp"
    assert result["resumed_from_step"] == 2 and result["steps"] == 4
    assert [r["step"] for r in read_log(job / "log.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]
    torch.testing.assert_close(train_losses(job), losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close([h["val_nll"] for h in result["val_history"]], val_nll, rtol=1e-4, atol=1e-6)

    pruned_before = student.model.layers[0].mlp.down_proj.qweight.dequantize(torch.float32) == 0
    trained = torch.load(job / "checkpoint.pt", weights_only=False)["student"]["model.layers.0.mlp.down_proj.weight"]
    assert (trained[pruned_before] == 0).all(), "pruned weights grew back during sharded training"
    down = final.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear)
    assert (down.qweight.dequantize(torch.float32)[pruned_before] == 0).all()
