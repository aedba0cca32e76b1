"""Run experiments in worker processes: submit, follow, cancel; a dead worker is noticed.

The app never runs the engine in its own process: `submit` starts `python -m core worker RUN_ID`
in a new session (so it outlives an app restart), the worker writes progress and results into the
store, and `reconcile` marks runs whose worker vanished (killed, out of memory) as failed.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager

import psutil

from . import paths
from .errors import SlimError
from .recipe import Experiment
from .store import ACTIVE, Store

DIED = "The worker process ended without reporting a result (killed, crashed or out of memory). See worker.log in the run's artifacts."


def submit(experiment: Experiment, store: Store) -> str:
    run_id = store.create_run(experiment)
    _spawn(run_id, store)
    return run_id


def _spawn(run_id: str, store: Store) -> None:
    log = open(store.artifact_dir(run_id) / "worker.log", "ab")
    env = dict(os.environ, SLIMLM_DATA=str(store.path.parent), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "worker", run_id, "--store", str(store.path)],
        cwd=paths.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )
    log.close()
    store.update(run_id, pid=proc.pid)


def distill_checkpoints(run, store: Store) -> list:
    return sorted((store.artifacts / run.id).glob("distill-*/checkpoint.pt"))


def resumable(run, store: Store) -> bool:
    """A failed or cancelled run with a distillation step and a saved training checkpoint."""
    return (run.status in ("failed", "cancelled") and any(s.method == "distill" for s in run.experiment.steps)
            and bool(distill_checkpoints(run, store)))


def resume(run_id: str, store: Store, spawn: bool = True) -> None:
    """Queue a stopped distillation run again (and start its worker unless spawn=False, for a caller that
    executes it itself): the steps before it are recomputed (they are deterministic) and training continues
    from its last checkpoint (same data order, same schedule)."""
    run = store.get(run_id)
    if run is None:
        raise SlimError(f"No run with id {run_id}")
    if not resumable(run, store):
        raise SlimError(f"Run {run_id} cannot be resumed: only a failed or cancelled run with a distillation "
                        "checkpoint can (its status is " + run.status + ")")
    store.update(run_id, status="queued", error=None, stage="resuming", step=0, total=0, metrics=None)
    if spawn:
        _spawn(run_id, store)


def _worker_alive(pid: int | None, run_id: str) -> bool:
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            p.wait(0)  # reap a child of this process
            return False
        return run_id in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
        return False


def reconcile(store: Store, grace_s: float = 20.0) -> None:
    """Mark active runs whose worker is gone as failed (after a start-up grace period)."""
    now = time.time()
    for run in store.list():
        if run.status in ACTIVE and now - run.created > grace_s and not _worker_alive(run.pid, run.id):
            store.set_status_if_active(run.id, "failed", DIED)


def cancel(run_id: str, store: Store) -> bool:
    run = store.get(run_id)
    if run is None or run.finished:
        return False
    store.set_status_if_active(run_id, "cancelled", "Cancelled by the user.")
    if _worker_alive(run.pid, run_id):
        try:
            pgid = os.getpgid(run.pid)
        except ProcessLookupError:
            return True
        if run.stage.startswith("distill"):
            # a training worker saves a checkpoint at the end of its current step on SIGTERM (resumable);
            # anything still alive after the grace period is killed
            _signal_group(pgid, signal.SIGTERM)
            timer = threading.Timer(CANCEL_GRACE_S, _kill_if_alive, (run.pid, run_id, pgid))
            timer.daemon = True
            timer.start()
        else:
            _signal_group(pgid, signal.SIGKILL)
    return True


CANCEL_GRACE_S = 30.0


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _kill_if_alive(pid: int, run_id: str, pgid: int) -> None:
    if _worker_alive(pid, run_id):
        _signal_group(pgid, signal.SIGKILL)


class StoreProgress:
    """Progress callback that writes (stage, step, total) to the store, at most every 0.25 s
    unless the stage changes."""

    def __init__(self, store: Store, run_id: str, echo=None):
        self.store, self.run_id, self.echo = store, run_id, echo
        self._last = (None, 0.0)

    def __call__(self, stage: str, step: int = 0, total: int = 0) -> None:
        now = time.time()
        if stage != self._last[0] or now - self._last[1] > 0.25 or step == total:
            self.store.update(self.run_id, stage=stage, step=step, total=total)
            self._last = (stage, now)
        if self.echo:
            self.echo(stage, step, total)


@contextmanager
def _one_at_a_time(store: Store, run_id: str):
    """Runs take turns (an exclusive lock on a file beside the store), so concurrent runs do not
    share the cores and distort each other's latency. The OS drops the lock if a worker dies."""
    with open(store.path.parent / "run.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            store.update(run_id, stage="waiting for the running experiment to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def execute(run_id: str, store: Store, echo=None) -> dict:
    """Run a stored experiment in this process; record result or error. Returns metrics."""
    run = store.get(run_id)
    if run is None:
        raise SlimError(f"No run with id {run_id}")
    store.update(run_id, pid=os.getpid())
    with _one_at_a_time(store, run_id):
        if store.get(run_id).finished:  # cancelled while waiting
            return {}
        return _execute(run, store, echo)


def _execute(run, store: Store, echo) -> dict:
    from .pipeline import run_experiment  # heavy imports (torch) only where work happens

    run_id = run.id
    store.update(run_id, status="running")
    try:
        metrics = run_experiment(run.experiment, StoreProgress(store, run_id, echo), store.artifact_dir(run_id))
    except MemoryError:
        store.set_status_if_active(run_id, "failed", "Out of memory while running this experiment.")
        raise
    except SlimError as e:
        store.set_status_if_active(run_id, "failed", str(e))
        raise
    except BaseException as e:
        traceback.print_exc()
        store.set_status_if_active(run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    store.update(run_id, metrics=metrics)
    store.set_status_if_active(run_id, "done")
    return metrics
