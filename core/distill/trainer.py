"""The distillation training loop: one code path for a single process and for torchrun (DDP or FSDP2).

The student (a PreparedStudent from core.distill.student) learns to match a frozen teacher on token windows,
with the losses of core.distill.losses. What makes runs comparable and resumable:

- Data order: a stream of windows, epoch e shuffled by torch.randperm with a generator seeded from (seed, e).
  Optimizer step s takes the next micro_batch * grad_accum * world_size windows of that stream and rank r its
  own slice of them, so a run's global batches are the same whatever the world size (grad_accum adjusted) and a
  resumed run continues the exact order.
- Learning rate: a pure function of the step (linear warm-up, cosine decay to min_lr_ratio * lr at max_steps).
- Checkpoints (out_dir/checkpoint.pt, written atomically by rank 0): full (gathered) state dicts, so a run can
  resume on another world size or strategy, plus a fingerprint of everything that shapes the trajectory.
- Live log (out_dir/log.jsonl, rank 0): one JSON object per optimizer step and per evaluation, flushed at once.

In a distributed run every rank calls train() with the same arguments; the process group must be initialised
(core/distill/launch.py does it). Never imports pydantic or anything app-level: it runs on GPU hosts without them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..calibrate import find_decoder_layers
from ..errors import SlimError
from .losses import LossConfig, distill_loss, layer_map, make_projector

Progress = Callable[[str, int, int], None]

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
CHECKPOINT_VERSION = 1


class CheckpointMismatch(SlimError):
    """out_dir holds a checkpoint written with different settings or data."""


@dataclass
class TrainOptions:
    max_steps: int = 200
    time_budget_s: float | None = None  # stop at the first step boundary after this much wall time (all sessions)
    micro_batch: int = 4  # windows per forward pass, per rank
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 25
    patience: int = 0  # evaluations without a better held-out perplexity before stopping early; 0 = never
    checkpoint_every: int = 50
    seed: int = 0
    bf16: bool | str = "auto"  # "auto": bf16 autocast on CUDA only
    strategy: str = "ddp"  # "ddp" or "fsdp" (FSDP2 fully_shard per decoder layer; only matters when distributed)
    restore_best: bool = True

    def validate(self) -> None:
        positive = ("max_steps", "micro_batch", "grad_accum", "eval_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "patience", "weight_decay", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive (or None for no limit), got {self.time_budget_s}")
        if self.bf16 not in ("auto", True, False):
            raise ValueError(f"bf16 must be 'auto', True or False, got {self.bf16!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up over warmup_steps, then cosine decay
        from lr to min_lr_ratio * lr at max_steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        done = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def window_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of n windows in one epoch, from a generator seeded with (seed, epoch)."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(n, generator=g)


def stream_indices(seed: int, n: int, start: int, count: int) -> torch.Tensor:
    """Window indices at positions [start, start + count) of the endless stream of shuffled epochs."""
    out = []
    pos = start
    while pos < start + count:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, start + count - pos)
        out.append(window_order(seed, epoch, n)[offset:offset + take])
        pos += take
    return torch.cat(out)


def _check_windows(name: str, windows) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor [n_windows, window_len] of token ids")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"{name} needs at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")


def _data_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _numel(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


class _StopSignals:
    """SIGTERM / SIGINT set a flag that the loop checks at each step boundary (finish the step, save, return).
    Repeated signals change nothing (a cancel reaches a torchrun rank twice: from the process group and
    forwarded by torchrun); SIGKILL still kills. Signal handlers can only be set in the main thread: elsewhere
    (e.g. a thread of the app) this does nothing."""

    def __init__(self):
        self.received = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Log:
    """out_dir/log.jsonl, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def reset(self, keep_until_step: int | None) -> None:
        """Start afresh (None), or keep only the records up to a resumed checkpoint's step."""
        if not self.enabled:
            return
        kept = []
        if keep_until_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if record.get("step", math.inf) <= keep_until_step:
                    kept.append(line + "\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


class _Run:
    def __init__(self, prepared, teacher: nn.Module, train_windows: torch.Tensor, val_windows: torch.Tensor,
                 opts: TrainOptions, loss_cfg: LossConfig, out_dir: Path):
        self.prepared, self.opts, self.loss_cfg = prepared, opts, loss_cfg
        self.train_windows, self.val_windows = train_windows, val_windows
        self.out_dir = out_dir
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.student = prepared.model
        if self.distributed:
            self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                           else torch.device("cpu"))
        else:
            self.device = next(self.student.parameters()).device
        self.sharded = self.distributed and opts.strategy == "fsdp"
        self.use_bf16 = opts.bf16 is True or (opts.bf16 == "auto" and self.device.type == "cuda"
                                                and torch.cuda.is_bf16_supported())
        self.log = _Log(out_dir / LOG, self.rank == 0)
        self.fingerprint = self._fingerprint(teacher)

        torch.manual_seed(opts.seed)  # projector initialisation (a resumed run loads its state over it)
        self.pairs = self.projector = None
        if loss_cfg.needs_hidden:
            self.pairs = layer_map(_num_layers(self.student), _num_layers(teacher))
            self.projector = make_projector(self.student.config, teacher.config, self.pairs)
            if self.projector is not None:
                self.projector.to(self.device)
        # the student's trainable parameters, looked up again by name after placement (FSDP2 replaces the tensors)
        wanted = {id(p) for p in prepared.trainable_parameters()}
        names = {n for n, p in self.student.named_parameters() if id(p) in wanted}
        if not names:
            raise ValueError("the prepared student has no trainable parameters")
        self.teacher = self._place(teacher, trainable=False)
        self.train_model = self._place(self.student, trainable=True)
        self.params = [p for n, p in self.student.named_parameters() if n in names]
        self.sharded_masks = self._shard_masks() if self.sharded else []
        adamw = {"lr": opts.lr, "weight_decay": opts.weight_decay}
        self.optim = torch.optim.AdamW(self.params, **adamw)
        self.projector_optim = (torch.optim.AdamW(self.projector.parameters(), **adamw)
                                if self.projector is not None else None)

        # counters, all restored on resume
        self.step = 0
        self.tokens = 0
        self.wall_before = 0.0  # wall time of earlier sessions
        self.train_s = 0.0  # time spent in training steps only (throughput excludes evaluation and saving)
        self.val_history: list[dict] = []
        self.best: dict | None = None  # {"step", "val_nll", "val_ppl"} of the best evaluation
        self.best_weights: dict = {}  # full student state at the best evaluation (rank 0; only with restore_best)
        self.bad_evals = 0
        self.t0 = time.monotonic()

    # ---------------------------------------------------------------- placement
    def _place(self, model: nn.Module, trainable: bool) -> nn.Module:
        """Move to the device; wrap the student in DDP, or shard student and teacher with FSDP2."""
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for layer in _decoder_layers(model):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model.to(self.device)  # moves each rank's shards only
        model.to(self.device)
        if not trainable:
            return model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # hidden-state matching alone leaves the final norm (and an untied lm_head) without gradients
            uses_logits = any(getattr(self.loss_cfg, n) for n in ("kl", "reverse_kl", "js", "ce"))
            ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                      find_unused_parameters=not uses_logits)
            # buffers (masks, quantization grids) are the same on every rank and never change: no need to
            # broadcast them before every forward (set as an attribute: the argument's name differs by version)
            ddp.broadcast_buffers = False
            return ddp
        return model

    def _shard_masks(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(weight, mask) pairs sharded like the weights. The student's own masking (gradient hooks on the
        weight tensors, after_step() multiplying full-size masks) does not survive FSDP2, which replaces every
        weight by a DTensor shard; under FSDP2 the trainer masks gradients and weights itself."""
        from torch.distributed.tensor import distribute_tensor

        pairs = []
        for name in self.prepared.masks:
            w = self.student.get_submodule(name).weight
            mask = self.student.get_submodule(name).mask
            pairs.append((w, distribute_tensor(mask.to(w.device, w.dtype), w.device_mesh, w.placements)))
        return pairs

    # ---------------------------------------------------------------- fingerprint and checkpoints
    def _fingerprint(self, teacher: nn.Module) -> dict:
        """What shapes the training trajectory. Run-control options (time budget, evaluation and checkpoint
        cadence, patience, strategy, the split of the global batch into processes and accumulation) may change."""
        o = self.opts
        run_control = {"time_budget_s", "eval_every", "checkpoint_every", "patience", "strategy", "grad_accum",
                       "micro_batch"}
        fp = {"checkpoint_version": CHECKPOINT_VERSION}
        fp.update({k: v for k, v in dataclasses.asdict(o).items() if k not in run_control})
        fp["global_batch"] = o.micro_batch * o.grad_accum * self.world
        fp.update({f"loss.{k}": v for k, v in dataclasses.asdict(self.loss_cfg).items()})
        fp["train_windows"] = list(self.train_windows.shape)
        fp["train_data"] = _data_digest(self.train_windows)
        fp["val_windows"] = list(self.val_windows.shape)
        fp["val_data"] = _data_digest(self.val_windows)
        fp["student_numel"] = _numel(self.student)
        fp["teacher_numel"] = _numel(teacher)
        return fp

    def load_student_state(self, sd: dict) -> None:
        """Load a full state dict (needed on rank 0 only in a distributed run)."""
        set_model_state_dict(self.student, sd, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=self.distributed))

    def save_checkpoint(self) -> None:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        student = full_state_dict(self.student)
        optim = get_optimizer_state_dict(self.student, self.optim, options=full)  # collective under FSDP2
        if self.rank != 0:
            return
        payload = {
            "fingerprint": self.fingerprint,
            "small": {
                "step": self.step, "tokens": self.tokens, "wall_s": self.wall_s(), "train_s": self.train_s,
                "val_history": self.val_history, "best": self.best, "bad_evals": self.bad_evals,
                "projector": None if self.projector is None else self.projector.state_dict(),
                "projector_optim": None if self.projector_optim is None else self.projector_optim.state_dict(),
                "rng": {"torch": torch.get_rng_state(),  # CUDA: this rank's device only (the others'
                        # state would need a context on every GPU)
                        "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            },
            "student": student,
            "optim": optim,
            "best_weights": self.best_weights,
        }
        path = self.out_dir / CHECKPOINT
        tmp = path.with_suffix(".pt.tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, resume: bool) -> bool:
        """Resume from out_dir/checkpoint.pt when there is one (True), or start fresh (False)."""
        path = self.out_dir / CHECKPOINT
        payload, message = None, None
        if self.rank == 0 and path.exists():
            if resume:
                payload = torch.load(path, map_location="cpu", weights_only=False)
                message = _mismatch(payload.get("fingerprint") or {}, self.fingerprint, path)
            else:
                path.unlink()
        small = (payload or {}).get("small")
        if self.distributed:
            box = [message, small]
            dist.broadcast_object_list(box, src=0)
            message, small = box
        if message:
            raise CheckpointMismatch(message)
        if small is None:
            return False
        self.load_student_state(payload["student"] if self.rank == 0 else {})
        set_optimizer_state_dict(self.student, self.optim, payload["optim"] if self.rank == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.distributed))
        if self.projector is not None:
            self.projector.load_state_dict(small["projector"])
            self.projector_optim.load_state_dict(small["projector_optim"])
        self.step, self.tokens, self.train_s = small["step"], small["tokens"], small["train_s"]
        self.wall_before = small["wall_s"]
        self.val_history, self.best, self.bad_evals = small["val_history"], small["best"], small["bad_evals"]
        self.best_weights = payload["best_weights"] if self.rank == 0 else {}
        torch.set_rng_state(small["rng"]["torch"])
        if small["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(small["rng"]["cuda"], self.device)
        return True

    # ---------------------------------------------------------------- one optimizer step
    def wall_s(self) -> float:
        return self.wall_before + time.monotonic() - self.t0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    @contextmanager
    def _grad_sync(self, enabled: bool):
        """Reduce gradients across ranks only on the last micro-batch of an accumulation."""
        if self.sharded:
            self.student.set_requires_gradient_sync(enabled)
            yield
        elif self.train_model is not self.student and not enabled:
            with self.train_model.no_sync():
                yield
        else:
            yield

    def _rank_windows(self, step: int) -> torch.Tensor:
        per_rank = self.opts.micro_batch * self.opts.grad_accum
        start = (step * self.world + self.rank) * per_rank
        return stream_indices(self.opts.seed, len(self.train_windows), start, per_rank)

    def train_step(self) -> dict:
        o, cfg = self.opts, self.loss_cfg
        self.student.train()
        t = time.monotonic()
        idx = self._rank_windows(self.step)
        loss_sum, parts_sum = 0.0, {}
        tokens = 0
        for a in range(o.grad_accum):
            ids = self.train_windows[idx[a * o.micro_batch:(a + 1) * o.micro_batch]].to(self.device)
            tokens += ids.numel()
            with self._grad_sync(a == o.grad_accum - 1):
                with self._autocast():
                    with torch.no_grad():
                        t_out = self.teacher(ids, use_cache=False, output_hidden_states=cfg.needs_hidden)
                    s_out = self.train_model(ids, use_cache=False, output_hidden_states=cfg.needs_hidden)
                    loss, parts = distill_loss(s_out, t_out, ids, cfg, projector=self.projector, pairs=self.pairs)
                (loss / o.grad_accum).backward()
            loss_sum += loss.item()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        if self.projector is not None and self.distributed:
            _average_grads(list(self.projector.parameters()), self.world)  # replicated outside DDP / FSDP

        for w, mask in self.sharded_masks:
            if w.grad is not None:
                w.grad.mul_(mask)
        grad_norm = self._clip()
        if not math.isfinite(grad_norm):
            raise SlimError(f"Distillation diverged at step {self.step + 1}: the gradient norm is {grad_norm} "
                            f"(loss {loss_sum / o.grad_accum:.4g}). Try a lower lr or a lower max_grad_norm.")
        lr = o.lr_at(self.step)
        for optim in (self.optim, self.projector_optim):
            if optim is not None:
                for group in optim.param_groups:
                    group["lr"] = lr
                optim.step()
                optim.zero_grad(set_to_none=True)
        if self.sharded:
            with torch.no_grad():
                for w, mask in self.sharded_masks:
                    w.mul_(mask)
        else:
            self.prepared.after_step()

        # average loss and parts over micro-batches and ranks; count tokens over ranks
        keys = sorted(parts_sum)
        stats = torch.tensor([loss_sum, tokens, *(parts_sum[k] for k in keys)], dtype=torch.float64)
        stats = self._all_reduce(stats)
        n = o.grad_accum * self.world
        self.step += 1
        self.tokens += int(stats[1].item())
        self.train_s += time.monotonic() - t
        return {"kind": "train", "step": self.step, "tokens": self.tokens, "wall_s": round(self.wall_s(), 3),
                "loss": stats[0].item() / n, "parts": {k: stats[2 + i].item() / n for i, k in enumerate(keys)},
                "lr": lr, "grad_norm": grad_norm}

    def _clip(self) -> float:
        """Clip all gradients (student and projector) to max_grad_norm together; returns the norm before."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.projector is not None:
            projector_grads = [p.grad for p in self.projector.parameters() if p.grad is not None]
        else:
            projector_grads = []
        norm = math.sqrt(_total_norm(grads) ** 2 + _total_norm(projector_grads) ** 2)
        if norm > self.opts.max_grad_norm:
            scale = self.opts.max_grad_norm / (norm + 1e-6)
            for g in grads + projector_grads:
                g.mul_(scale)
        return norm

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if not self.distributed:
            return t
        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(backend_device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.cpu()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out next-token NLL and perplexity of the student, val windows split across ranks."""
        self.student.eval()
        mine = list(range(self.rank, len(self.val_windows), self.world))
        # every rank runs the same number of forward passes (FSDP2 gathers weights collectively), padding with
        # a window whose loss is not counted
        per_rank = -(-len(self.val_windows) // self.world)
        nll, count = 0.0, 0
        for b in range(0, per_rank, self.opts.micro_batch):
            ids = mine[b:b + self.opts.micro_batch]
            counted = bool(ids)
            x = self.val_windows[ids or [0]].to(self.device)
            with self._autocast():
                logits = self.student(x, use_cache=False).logits
            if counted:
                nll += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
                count += x[:, 1:].numel()
        totals = self._all_reduce(torch.tensor([nll, count], dtype=torch.float64))
        val_nll = totals[0].item() / totals[1].item()
        return {"kind": "eval", "step": self.step, "tokens": self.tokens, "wall_s": round(self.wall_s(), 3),
                "val_ppl": math.exp(val_nll), "val_nll": val_nll}

    def record_eval(self, record: dict) -> None:
        self.val_history.append({k: record[k] for k in ("step", "tokens", "val_ppl", "val_nll")})
        self.log.write(record)
        if self.best is None or record["val_nll"] < self.best["val_nll"]:
            self.best = {k: record[k] for k in ("step", "val_nll", "val_ppl")}
            self.bad_evals = 0
            if self.opts.restore_best:
                self.best_weights = full_state_dict(self.student)
        else:
            self.bad_evals += 1

    def agree_to_stop(self, flags: list[bool]) -> list[bool]:
        """Any rank's reason to stop (a signal, its clock) stops every rank at the same step."""
        t = self._all_reduce(torch.tensor(flags, dtype=torch.float64), op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


def full_state_dict(model: nn.Module) -> dict:
    """The model's full (gathered) state dict on CPU, never sharing memory with the model. In a distributed run
    every rank must call it (FSDP2 gathers shards) and only rank 0 gets the weights ({} elsewhere)."""
    from torch.distributed.fsdp import FSDPModule

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not isinstance(model, FSDPModule):  # a model on CPU: these can be its own tensors
        own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
        sd = {k: v.clone() if v.untyped_storage().data_ptr() in own else v for k, v in sd.items()}
    return sd


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, each its own FSDP2 unit. find_decoder_layers looks for float linears, which a student
    whose linears are all fake-quant lacks: then the ModuleList with the most parameters."""
    try:
        return find_decoder_layers(model)[1]
    except SlimError:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise SlimError(f"FSDP needs the model's stack of decoder layers; {type(model).__name__} has none")
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _num_layers(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    return n if n is not None else len(find_decoder_layers(model)[1])


def _total_norm(grads: list[torch.Tensor]) -> float:
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: reduce the shards' norms
        norm = norm.full_tensor()
    return float(norm)


def _average_grads(params: list[nn.Parameter], world: int) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _mismatch(saved: dict, current: dict, path: Path) -> str | None:
    changed = [f"{k}: {saved.get(k, '(absent)')} -> {current.get(k, '(absent)')}"
               for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if not changed:
        return None
    return (f"{path} was written by a run with different settings or data ({'; '.join(changed)}). Resume with "
            "the same settings, or start fresh (resume=False, or delete the checkpoint).")


def train(prepared, teacher: nn.Module, train_windows: torch.Tensor, val_windows: torch.Tensor,
          opts: TrainOptions, loss_cfg: LossConfig, out_dir, progress: Progress | None = None,
          stop_after: int | None = None, resume: bool = True) -> dict:
    """Distil `teacher` into `prepared.model` (in place). Resumes from out_dir/checkpoint.pt when it was written
    with the same fingerprint; resume=False starts fresh. stop_after=N behaves like a signal after step N
    (save, return with "interrupted": True). Returns the run's summary (JSON-serialisable)."""
    opts.validate()
    loss_cfg.validate()
    _check_windows("train_windows", train_windows)
    _check_windows("val_windows", val_windows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.eval()
    teacher.requires_grad_(False)

    # a signal from here on stops at the next step boundary, with a checkpoint (before: nothing to lose)
    with _StopSignals() as signals:
        run = _Run(prepared, teacher, train_windows, val_windows, opts, loss_cfg, out_dir)
        resumed = run.load_checkpoint(resume)
        resumed_from = run.step if resumed else None
        run.log.reset(run.step if resumed else None)
        report = progress if run.rank == 0 and progress else (lambda *a: None)
        report("distill", run.step, opts.max_steps)
        if not resumed:
            run.record_eval(run.evaluate())

        stopped = None
        saved_step = run.step if resumed else None
        while stopped is None:
            if run.step >= opts.max_steps:
                stopped = "max_steps"
                break
            if opts.patience and run.bad_evals >= opts.patience:
                stopped = "early_stop"
                break
            run.log.write(run.train_step())
            report("distill", run.step, opts.max_steps)
            if run.step % opts.eval_every == 0:
                run.record_eval(run.evaluate())
            if run.step % opts.checkpoint_every == 0:
                run.save_checkpoint()
                saved_step = run.step
            interrupted, out_of_time = run.agree_to_stop([
                signals.received or (stop_after is not None and run.step >= stop_after),
                opts.time_budget_s is not None and run.wall_s() >= opts.time_budget_s,
            ])
            if interrupted:
                stopped = "interrupted"
            elif out_of_time:
                stopped = "time_budget"

        if stopped != "interrupted" and run.val_history[-1]["step"] != run.step:
            run.record_eval(run.evaluate())
            saved_step = None
        if saved_step != run.step:
            run.save_checkpoint()  # every stop leaves a checkpoint matching the log's last step

        restored = None
        if stopped != "interrupted" and opts.restore_best and run.best["step"] != run.val_history[-1]["step"]:
            run.load_student_state(run.best_weights)
            restored = run.best["step"]
    run.student.eval()

    final = run.val_history[-1]
    return {
        "steps": run.step,
        "tokens": run.tokens,
        "wall_s": run.wall_s(),
        "train_s": run.train_s,
        "tokens_per_s": run.tokens / run.train_s if run.train_s > 0 else None,
        "device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "world_size": run.world,
        "strategy": opts.strategy if run.distributed else "single",
        "bf16": run.use_bf16,
        "val_history": run.val_history,
        "initial_val_ppl": run.val_history[0]["val_ppl"],
        "final_val_ppl": final["val_ppl"],
        "best_val_ppl": run.best["val_ppl"],
        "best_step": run.best["step"],
        "student_val_ppl": run.best["val_ppl"] if restored is not None else final["val_ppl"],
        "stopped": stopped,
        "interrupted": stopped == "interrupted",
        "resumed_from_step": resumed_from,
        "restored_best_step": restored,
        "student": prepared.info(),
    }
