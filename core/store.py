"""SQLite store (WAL) of runs: the experiment, its status and live progress, metrics, errors.

One row per run. Metrics are one JSON document per run (see core/pipeline.py for its keys).
Large per-run files go to artifacts/<run_id>/. Every write is a short transaction, so the app,
the CLI and worker processes can share the file safely.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .recipe import Experiment, parse_experiment

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    label TEXT NOT NULL,
    experiment TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    metrics TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
"""


@dataclass
class Run:
    id: str
    created: float
    updated: float
    label: str
    experiment: Experiment
    status: str
    stage: str = ""
    step: int = 0
    total: int = 0
    pid: int | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status not in ACTIVE


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else paths.store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @property
    def artifacts(self) -> Path:
        return self.path.parent / "artifacts"

    def artifact_dir(self, run_id: str) -> Path:
        d = self.artifacts / run_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    # -- writes -------------------------------------------------------------------------------
    def create_run(self, experiment: Experiment) -> str:
        run_id = uuid.uuid4().hex[:12]
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT INTO runs (id, created, updated, label, experiment, status) VALUES (?,?,?,?,?,?)",
                (run_id, now, now, experiment.label(), experiment.model_dump_json(), "queued"),
            )
        return run_id

    def update(self, run_id: str, **fields) -> None:
        allowed = {"status", "stage", "step", "total", "pid", "metrics", "error", "label"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown run fields {bad}")
        if "metrics" in fields and not isinstance(fields["metrics"], (str, type(None))):
            fields["metrics"] = json.dumps(fields["metrics"])
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._connect() as db:
            db.execute(f"UPDATE runs SET {cols} WHERE id=?", (*fields.values(), run_id))

    def set_status_if_active(self, run_id: str, status: str, error: str | None = None) -> bool:
        """Move an active run to a final status; False if it had already finished."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE runs SET status=?, error=COALESCE(?, error), updated=? WHERE id=? AND status IN ('queued','running')",
                (status, error, time.time(), run_id),
            )
            return cur.rowcount == 1

    def delete(self, run_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))
        shutil.rmtree(self.artifacts / run_id, ignore_errors=True)

    # -- reads --------------------------------------------------------------------------------
    @staticmethod
    def _row(r: sqlite3.Row) -> Run:
        return Run(
            id=r["id"], created=r["created"], updated=r["updated"], label=r["label"],
            experiment=parse_experiment(r["experiment"]), status=r["status"], stage=r["stage"],
            step=r["step"], total=r["total"], pid=r["pid"],
            metrics=json.loads(r["metrics"]) if r["metrics"] else {}, error=r["error"],
        )

    def get(self, run_id: str) -> Run | None:
        with self._connect() as db:
            r = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return self._row(r) if r else None

    def list(self, ids: list[str] | None = None) -> list[Run]:
        with self._connect() as db:
            if ids is None:
                rows = db.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
            else:
                q = ",".join("?" * len(ids))
                rows = db.execute(f"SELECT * FROM runs WHERE id IN ({q}) ORDER BY created DESC", ids).fetchall()
        return [self._row(r) for r in rows]
