"""The training log a distillation run writes as it goes (log.jsonl: one JSON object per line, appended and
flushed by the trainer), read back for the live charts and the run's report. Only json here: the app reads it."""
from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    """Records of a log.jsonl, skipping a last line that is still being written. [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def run_logs(artifact_dir: str | Path) -> dict[int, list[dict]]:
    """{chain step index: records} for every distillation step of a run (artifacts/<run>/distill-<i>/log.jsonl)."""
    logs = {}
    for d in sorted(Path(artifact_dir).glob("distill-*")):
        suffix = d.name.removeprefix("distill-")
        if suffix.isdigit():
            logs[int(suffix)] = read_log(d / "log.jsonl")
    return logs
