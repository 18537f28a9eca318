"""What the Slurm side does in MLflow itself: ready the store, create a job array's parent run at
submission, and mark a run FAILED when the job fails after training. Everything else is recorded by
the trainer and `ldot eval` (ldot.tracking)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import uuid
from pathlib import Path
from urllib.parse import urlparse

from ldot.tracking import RUN_FILE, Tracker, ensure_sweep_parent

SCHEDULED = "SCHEDULED"  # a parent run whose array has not started yet


@contextlib.contextmanager
def _store_lock(tracking_uri: str):
    """An exclusive lock beside a local store (sqlite file, file: directory); a server needs none."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        lock = Path(tracking_uri[len("sqlite:///"):] + ".lock")
    elif parsed.scheme in ("", "file"):
        lock = Path(parsed.path or tracking_uri).with_suffix(".lock")
    else:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_store(tracking_uri: str) -> None:
    """Opens the store once, under the lock: a fresh sqlite store gets its tables here, not from every
    task of an array at the same moment. (The trainer creates the experiment itself, race-safely.)"""
    from mlflow.tracking import MlflowClient

    with _store_lock(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def _delivery(tracking_uri: str, experiment: str):
    from ldot.tracking.outbox import (
        Delivery,  # the experiment made as the trainer makes it (artifact root)
    )

    ensure_store(tracking_uri)
    return Delivery(tracking_uri, experiment)


def create_parent(tracking_uri: str, experiment: str, name: str | None) -> str:
    """The parent run of an array about to be submitted; returns its id.

    name given (LDOT_SWEEP or tracking.sweep: jobs sharing it share the parent): found or created as the
    trainer would (ensure_sweep_parent). None: the name holds the job id that sbatch has not given yet,
    so the run gets a name of its own until name_parent() renames it."""
    delivery = _delivery(tracking_uri, experiment)
    client, exp = delivery.client, delivery.experiment_id()
    if name:
        return ensure_sweep_parent(client, exp, name)
    pending = f"submitting-{uuid.uuid4().hex[:12]}"
    run = client.create_run(exp, run_name=pending, tags={"ldot.sweep_parent": pending, "ldot.sweep": pending})
    client.update_run(run.info.run_id, status=SCHEDULED)
    return run.info.run_id


def name_parent(tracking_uri: str, run_id: str, name: str | None, array_job_id: str) -> None:
    """After sbatch: the parent is named (unless it had a name) and tagged with the array's job id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if name:
        client.set_tag(run_id, "mlflow.runName", name)
        client.set_tag(run_id, "ldot.sweep_parent", name)
        client.set_tag(run_id, "ldot.sweep", name)
    client.set_tag(run_id, "slurm.array_job_id", array_job_id)


def delete_parent(tracking_uri: str, run_id: str) -> None:
    """sbatch refused the array: its parent goes too."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).delete_run(run_id)


def fail_run(run_dir: str | Path) -> str:
    """Marks the run that trained in `run_dir` FAILED (the job failed after training, e.g. at recall);
    returns a line for the job's log. Through the run's outbox: sent now, or by `ldot eval sync`."""
    run_file = Path(run_dir) / RUN_FILE
    if not run_file.is_file():
        return f"no MLflow run to mark ({run_file} missing)"
    info = json.loads(run_file.read_text())
    tracker = Tracker.attach(info, writer="slurm-batch")
    sent = tracker.finish("FAILED")
    run = info.get("run_id") or info.get("run_key")
    return (f"MLflow run {run} marked FAILED" if sent else
            f"MLflow run {run} is to be marked FAILED; the store did not answer (`ldot eval sync {run_dir}`)")
