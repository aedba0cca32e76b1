"""Distillation in several processes through torchrun: the job directory, the entry point and the launcher.

    python -m torch.distributed.run --standalone --nproc-per-node N -m core.distill.launch JOB_DIR

JOB_DIR holds student.pt and teacher.pt (whole modules, torch.save), train.pt / val.pt (token windows) and
job.json ({"opts": TrainOptions fields, "loss": LossConfig fields, "keep_masks": bool}); write_job() writes it.
Each rank trains with core.distill.trainer.train (out_dir = JOB_DIR: checkpoint.pt, log.jsonl); rank 0 then
writes the finalized student (student_final.pt) and the result (result.json). run_torchrun() launches all this
as a subprocess, follows log.jsonl for progress and returns (student, result).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import paths
from ..errors import SlimError
from .losses import LossConfig
from .trainer import LOG, Progress, TrainOptions, full_state_dict, train

JOB = "job.json"
STUDENT, TEACHER, TRAIN, VAL = "student.pt", "teacher.pt", "train.pt", "val.pt"
FINAL, RESULT, OUTPUT = "student_final.pt", "result.json", "torchrun.log"
STOP_GRACE_S = 60.0  # after SIGTERM, time for the ranks to finish their step and save before they are killed


class DistillLaunchError(SlimError):
    pass


def picklable(model: torch.nn.Module) -> torch.nn.Module:
    """The model without the forward hooks transformers installs (local functions, which pickle cannot save) the
    first time it runs with output_hidden_states, so that torch.save can write the whole module; transformers
    installs them again when they are needed."""
    for m in model.modules():
        for key, hook in list(m._forward_hooks.items()):
            if getattr(hook, "__module__", "").startswith("transformers") and "<locals>" in hook.__qualname__:
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)
        m.__dict__.pop("_output_capturing_hooks_installed", None)
    return model


def load_module(path: Path) -> torch.nn.Module:
    """A whole module saved with torch.save, memory-mapped: the ranks of one host share the file's pages until
    they copy the weights to their device or change them. transformers registers per-class state when a model
    is constructed (e.g. which outputs output_hidden_states can capture); unpickling skips that, so one model of
    the class is constructed too, on the meta device (no memory, no weights)."""
    from transformers import PreTrainedModel

    model = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if isinstance(model, PreTrainedModel):
        with torch.device("meta"):
            type(model)(copy.deepcopy(model.config))
    return model


def write_job(job_dir, student, teacher, train_windows: torch.Tensor, val_windows: torch.Tensor,
              opts: TrainOptions, loss_cfg: LossConfig, keep_masks: bool = True) -> Path:
    """Write everything the ranks load into job_dir (created if needed); returns it."""
    opts.validate()
    loss_cfg.validate()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    torch.save(picklable(student), job_dir / STUDENT)
    torch.save(picklable(teacher), job_dir / TEACHER)
    torch.save(train_windows.cpu(), job_dir / TRAIN)
    torch.save(val_windows.cpu(), job_dir / VAL)
    job = {"opts": dataclasses.asdict(opts), "loss": dataclasses.asdict(loss_cfg), "keep_masks": keep_masks}
    (job_dir / JOB).write_text(json.dumps(job, indent=1))
    return job_dir


def _save_atomically(save, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save(tmp)
    os.replace(tmp, path)


def _finalized_student(prepared, job_dir: Path, job: dict):
    """The trained student in its compressed storage, on CPU (rank 0; None elsewhere). An FSDP2-sharded student
    cannot be un-sharded in place: its gathered weights go into a fresh copy prepared from student.pt."""
    from torch.distributed.fsdp import FSDPModule

    from .student import prepare_student

    if not isinstance(prepared.model, FSDPModule):
        return prepared.finalize().cpu() if dist.get_rank() == 0 else None
    state = full_state_dict(prepared.model)  # collective: every rank takes part, rank 0 gets the weights
    if dist.get_rank() != 0:
        return None
    fresh = prepare_student(load_module(job_dir / STUDENT), keep_masks=job.get("keep_masks", True))
    fresh.model.load_state_dict(state)
    return fresh.finalize().cpu()


def main(argv: list[str] | None = None) -> None:
    """One rank of a torchrun job (see the module docstring)."""
    from .student import prepare_student

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m torch.distributed.run --nproc-per-node N -m core.distill.launch JOB_DIR")
    job_dir = Path(args[0])
    job = json.loads((job_dir / JOB).read_text())
    opts, loss_cfg = TrainOptions(**job["opts"]), LossConfig(**job["loss"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        prepared = prepare_student(load_module(job_dir / STUDENT), keep_masks=job.get("keep_masks", True))
        windows = [torch.load(job_dir / name) for name in (TRAIN, VAL)]
        result = train(prepared, load_module(job_dir / TEACHER), *windows, opts, loss_cfg, out_dir=job_dir)
        student = _finalized_student(prepared, job_dir, job)
        if dist.get_rank() == 0:
            _save_atomically(lambda p: torch.save(picklable(student), p), job_dir / FINAL)
            _save_atomically(lambda p: p.write_text(json.dumps(result, indent=1)), job_dir / RESULT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _LogFollower:
    """New complete records of a log.jsonl that is being appended to (and rewritten on resume)."""

    def __init__(self, path: Path):
        self.path, self.pos = path, 0

    def new_records(self) -> list[dict]:
        if not self.path.exists():
            return []
        if self.path.stat().st_size < self.pos:  # rewritten by a resume: read it again
            self.pos = 0
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a last line still being written waits for the next call
        self.pos += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records


def _failure_excerpt(path: Path, lines: int = 40) -> str:
    """The first failing rank's traceback (torchrun prefixes its lines with "[rankN]:"), else the end of the
    output (torchrun's own summary names no cause)."""
    if not path.exists():
        return "(no output)"
    text = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(text):
        if line.startswith("[rank") and line.endswith("Traceback (most recent call last):"):
            prefix = line.split(":", 1)[0] + ":"
            return "\n".join([ln for ln in text[i:] if ln.startswith(prefix)][-lines:])
    return "\n".join(text[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (torchrun forwards it: the ranks finish their step and save a checkpoint), then kill."""
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_torchrun(job_dir, nproc: int, progress: Progress | None = None, timeout: float | None = None):
    """Run the job in job_dir (see write_job) on nproc processes; returns (finalized student, result dict).
    Output goes to job_dir/torchrun.log. After `timeout` seconds the job is stopped like a cancel (the ranks
    save a checkpoint): the result then says "interrupted". Raises DistillLaunchError, with the end of the
    output, when the job fails."""
    job_dir = Path(job_dir).resolve()
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    max_steps = json.loads((job_dir / JOB).read_text())["opts"].get("max_steps", TrainOptions.max_steps)
    for name in (FINAL, RESULT):  # left by an earlier launch: only this one's count
        (job_dir / name).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "core.distill.launch", str(job_dir)]
    pythonpath = os.pathsep.join(p for p in (str(paths.REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
    output = job_dir / OUTPUT
    with open(output, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, cwd=paths.REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    follower = _LogFollower(job_dir / LOG)

    def report_progress():
        for record in follower.new_records():
            if progress and record.get("kind") == "train":
                progress("distill", record["step"], max_steps)

    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    try:
        while proc.poll() is None:
            report_progress()
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                _stop(proc)
                break
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:  # our caller was interrupted: stop the job the same way
            _stop(proc)

    report_progress()
    # an interrupted job (timeout, cancel) still writes its result before torchrun exits non-zero
    if (job_dir / RESULT).exists() and (job_dir / FINAL).exists():
        result = json.loads((job_dir / RESULT).read_text())
        return load_module(job_dir / FINAL), result
    why = f"timed out after {timeout:g} s" if timed_out else f"failed (exit code {proc.returncode})"
    raise DistillLaunchError(f"Distillation with torchrun ({nproc} processes) {why}. "
                             f"From {output}:\n{_failure_excerpt(output)}")


if __name__ == "__main__":
    main()
