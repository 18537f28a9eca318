"""MLflow tracking: one run per job, owned by rank 0; params, per-step metrics, artifacts, recall tables.

Other ranks hold a disabled Tracker whose calls do nothing, so the loop needs no `if rank == 0`.
Metrics are buffered and sent with `log_batch`, so a step costs no round trip to the store.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

RUN_FILE = "mlflow_run.json"  # written next to outputs so eval logs into the training run
_BATCH = 500


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def git_state(repo: Path | None = None) -> dict[str, str]:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()} if commit else {}


def slurm_tags() -> dict[str, str]:
    """The Slurm job and array task ids, so a run can be traced back to its job's logs."""
    names = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
             "SLURM_ARRAY_TASK_ID": "slurm.array_task_id", "SLURM_RESTART_COUNT": "slurm.restart_count"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, *, enabled: bool = True, autoflush: bool = True):
        """autoflush=False holds metrics until flush(): the trainer flushes right after each checkpoint,
        so the record never holds a step that a resume would train again."""
        self.enabled, self.autoflush = enabled, autoflush
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_id: str | None = None
        self._buffer: list = []
        if not enabled:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, run_name: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        if self.enabled:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
            self.run_id = run.info.run_id
        return self.run_id

    @classmethod
    def attach(cls, info: dict, autoflush: bool = True) -> "Tracker":
        """Continue an existing run (e.g. eval logging into the run that trained the checkpoint)."""
        tracker = cls(info["tracking_uri"], info["experiment"], autoflush=autoflush)
        tracker.run_id = info["run_id"]
        return tracker

    def info(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "run_id": self.run_id}

    def write_info(self, directory: str | Path) -> None:
        if self.enabled:
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / RUN_FILE).write_text(json.dumps(self.info(), indent=2))

    def set_status(self, status: str) -> None:
        if self.enabled and self.run_id:
            self.client.update_run(self.run_id, status=status)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.flush()
            self.client.set_terminated(self.run_id, status=status)

    # -- records -----------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if self.autoflush and len(self._buffer) >= _BATCH:
            self.flush()

    def pending(self) -> list[list]:
        """Records not yet sent, as [key, value, timestamp, step] rows (stored in each checkpoint)."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self._buffer]

    def replay(self, rows: list[list]) -> None:
        """Send records saved in a checkpoint. The store ignores exact duplicates, so rows that did
        reach it before a crash are not recorded twice."""
        if self.enabled and rows:
            from mlflow.entities import Metric

            self._buffer.extend(Metric(k, float(v), int(t), int(s)) for k, v, t, s in rows)
            self.flush()

    def flush(self) -> None:
        if self.enabled and self._buffer:
            for i in range(0, len(self._buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
            self._buffer.clear()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)
