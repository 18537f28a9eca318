"""MLflow tracking: one run per job, owned by rank 0, that survives a tracking-server outage.

Rank 0 starts (or, on resume, continues) the run and records what defines the job: the resolved
config flattened, the DeepSpeed config, world size, git commit and dirty flag, the data manifests'
hashes, Slurm ids (params); the config files and manifests (artifacts); per-step metrics; recall
tables; the final encoders (tag `ldot.checkpoint`, and with `tracking.log_checkpoint` as artifacts).
It broadcasts the run to the other ranks, which record only their own system metrics, as
`system/<host>-rank<r>/...`. Their Trackers ignore every other call, so the loop needs no rank checks.

Records never go straight to MLflow: they are appended to a journal in `<output_dir>/mlflow_outbox`
and a background thread sends them (tracking/outbox.py). If the server is unreachable at
start or goes away later, training goes on; warnings are rate-limited; what the server missed is
sent when it answers, or by `ldot eval sync OUTPUT_DIR` after the job.

Sweeps: every member of a sweep is nested under one parent run (tag `mlflow.parentRunId`). A member
finds its sweep, in this order, from
  - `tracking.parent_run_id` or $LDOT_PARENT_RUN_ID: an existing run to nest under;
  - `tracking.sweep` or $LDOT_SWEEP: a sweep name; the parent run is named after it and created by
    whichever member starts first (race-safe when array tasks start at once: ensure_sweep_parent);
  - inside a Slurm job array, the sweep `slurm-array-$SLURM_ARRAY_JOB_ID`: one parent per array,
    with nothing to set. Members are then named `task-$SLURM_ARRAY_TASK_ID` unless tracking.run_name
    is set.
`tracking.sweep=` (empty) turns nesting off. An sbatch script therefore needs nothing for an array;
to give the parent a readable name, `export LDOT_SWEEP=lr-sweep-$SLURM_ARRAY_JOB_ID` before srun (the
same name across all tasks of the sweep, quotes not allowed). The parent is marked FINISHED when no
member is running.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ldot.files import write_atomic
from ldot.tracking.outbox import (OUTBOX_DIR, Delivery, Journal, Sender, new_key,
                                   now_ms, writer_name)
from ldot.tracking.system_metrics import SystemMetrics


log = logging.getLogger("ldot.tracking")

RUN_FILE = "mlflow_run.json"  # written next to outputs so eval logs into the training run
_METRICS_PER_OP, _PARAMS_PER_OP = 1000, 100
_COPY_BYTES = 16 << 20  # smaller files are copied into the outbox, so what is sent is what was logged
_PARAM_CHARS = 6000  # MLflow's limit on a param value


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


SLURM_PARAMS = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
          "SLURM_ARRAY_TASK_ID": "slurm.array_task_id"}


def slurm_tags() -> dict[str, str]:
    """The Slurm job and array task ids, so a run can be traced back to its job's logs."""
    names = {**SLURM_PARAMS, "SLURM_RESTART_COUNT": "slurm.restart_count"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def sweep_of(tracking_cfg) -> tuple[str | None, str | None]:
    """(sweep name, explicit parent run id) for this job; at most one is set. See the module docstring."""
    parent = tracking_cfg.parent_run_id or os.environ.get("LDOT_PARENT_RUN_ID") or None
    if parent:
        return None, parent
    sweep = tracking_cfg.sweep
    if sweep is None:
        sweep = os.environ.get("LDOT_SWEEP")
    if sweep is None and os.environ.get("SLURM_ARRAY_JOB_ID"):
        sweep = f"slurm-array-{os.environ['SLURM_ARRAY_JOB_ID']}"
    if sweep and "'" in sweep:
        raise ValueError(f"sweep name {sweep!r}: quotes are not allowed")
    return sweep or None, None


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return text[:_PARAM_CHARS]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tracker:
    """Records into one MLflow run through the outbox. Calls never wait on the network, except
    start() and finish(), which wait at most `timeout_s` (then training goes on)."""

    def __init__(self, tracking_uri: str, experiment: str, *, enabled: bool = True, autoflush: bool = True,
                 outbox: str | Path | None = None, writer: str | None = None, timeout_s: float = 10.0):
        """autoflush=False holds metrics until flush(): the trainer flushes right after each checkpoint,
        so the record never holds a step that a resume would train again. `outbox` is the journal's
        directory (a temporary one if not given); `writer` names this process's journal in it."""
        self.enabled, self.autoflush = enabled, autoflush
        self.tracking_uri, self.experiment, self.timeout_s = tracking_uri, experiment, timeout_s
        self.run_id: str | None = None
        self.run_key: str | None = None
        self.started_at: float | None = None
        self.checkpoint_artifacts = False  # set_tags({"ldot.checkpoint": DIR}) also uploads DIR
        self._buffer: list[list] = []
        self._info_dirs: list[Path] = []
        self._journal: Journal | None = None
        self._sender: Sender | None = None
        self._system: SystemMetrics | None = None
        self._closed = self._append_failed = False
        self._lock = threading.Lock()
        if enabled:
            self._open(outbox, writer)

    # -- plumbing ------------------------------------------------------------------------------
    def _open(self, outbox: str | Path | None, writer: str | None) -> None:
        directory = Path(outbox) if outbox else Path(tempfile.mkdtemp(prefix="ldot-mlflow-outbox-"))
        journal = Journal(directory, writer or writer_name())
        if not journal.acquire():  # another live process writes under this name: take one of our own
            journal = Journal(directory, f"{journal.writer}-{os.getpid()}")
            journal.acquire()
        self._journal = journal

    def _bind(self, key: str, run_id: str | None) -> None:
        """Tie the journal to this run and start sending. Another run's unsent leftovers in the journal
        (a job started afresh in an old output directory) are set aside under a writer name of their own."""
        journal = self._journal
        meta = journal.read_meta()
        if meta.get("run_key") not in (None, key) and journal.backlog() > 0:
            other = journal.set_aside()
            log.warning("unsent MLflow records of an earlier run in %s are kept as %s.jsonl; "
                        "`ldot eval sync %s` sends them", journal.dir, other, journal.dir)
        self.run_key, self.run_id = key, run_id
        self._write_meta()
        delivery = Delivery(self.tracking_uri, self.experiment, on_run=self._on_run)
        if run_id:
            delivery.run_ids[key] = run_id
        self._sender = Sender(journal, delivery)
        atexit.register(self._at_exit)

    def _write_meta(self) -> None:
        self._journal.write_meta({"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                                  "run_key": self.run_key, "run_id": self.run_id, "host": socket.gethostname(),
                                  "pid": os.getpid()})

    def _on_run(self, key: str, run_id: str) -> None:
        """The sender created or found the run (called on its thread)."""
        if key != self.run_key or run_id == self.run_id:
            return
        self.run_id = run_id
        self._write_meta()
        for d in self._info_dirs:
            self._write_info_file(d)

    def _emit(self, ops: list[dict], sync: bool = False) -> None:
        if self._journal is None or self._sender is None:
            raise RuntimeError("Tracker: call start() or attach() before recording")
        if self._closed:
            log.warning("Tracker: a record after finish() is dropped: %s", ops[0].get("op"))
            return
        try:
            self._journal.append(ops, sync=sync)
        except OSError as exc:  # a full or vanished disk costs records, never the training run
            if not self._append_failed:
                log.warning("MLflow records cannot be kept in %s (%s); they are dropped", self._journal.path, exc)
            self._append_failed = True
            return
        self._sender.kick()

    def _at_exit(self) -> None:
        """A process that never called finish() (eval attaching to a run) still sends what it logged."""
        if self._closed or self._sender is None:
            return
        if self.autoflush:
            self.flush()
        self._close(self.timeout_s)

    def _close(self, timeout: float) -> bool:
        self._closed = True
        done = self._sender.drain(timeout)
        self._sender.close()
        if done:
            self._journal.remove()
        else:
            log.warning("%d bytes of MLflow records are not sent yet; they are kept in %s and "
                        "`ldot eval sync %s` sends them", self._journal.backlog(), self._journal.path,
                        self._journal.dir)
            self._journal.release()
        return done

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, run_name: str | None = None, tags: dict[str, str] | None = None, *,
              sweep: str | None = None, parent_run_id: str | None = None) -> str | None:
        """Start a new run, nested under `parent_run_id` or the parent run of `sweep` if given.
        Returns its id, or None while the server has not answered (the run is created when it does)."""
        if not self.enabled:
            return None
        key = new_key()
        self._bind(key, None)
        start = now_ms()
        self.started_at = start / 1000
        self._emit([{"op": "run", "key": key, "name": run_name, "tags": {k: str(v) for k, v in (tags or {}).items()},
                     "start_time": start, "sweep": sweep, "parent_run_id": parent_run_id}], sync=True)
        if not self._sender.drain(self.timeout_s) and self.run_id is None and not self._sender.last_error:
            log.warning("MLflow run not created within %.0f s; training goes on, records are kept in %s",
                        self.timeout_s, self._journal.dir)
        return self.run_id

    @classmethod
    def attach(cls, info: dict, autoflush: bool = True, *, outbox: str | Path | None = None,
               writer: str | None = None, timeout_s: float = 10.0, records: bool = True) -> "Tracker":
        """Continue an existing run (e.g. eval logging into the run that trained the checkpoint).
        `info` is what info() returned (mlflow_run.json). By default the journal goes to the run's
        outbox if it is here, else to ./mlflow_outbox. records=False: a rank that sends only its system
        metrics."""
        if outbox is None:
            known = Path(info["outbox"]) if info.get("outbox") else None
            outbox = known if known is not None and known.parent.is_dir() else Path.cwd() / OUTBOX_DIR
        tracker = cls(info["tracking_uri"], info["experiment"], autoflush=autoflush, outbox=outbox, writer=writer,
                      timeout_s=timeout_s)
        tracker.started_at = info.get("started_at") or time.time()
        tracker._bind(info.get("run_key") or info["run_id"], info.get("run_id"))
        tracker.enabled = records
        return tracker

    def info(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "run_id": self.run_id,
                "run_key": self.run_key, "started_at": self.started_at,
                "outbox": str(self._journal.dir.resolve()) if self._journal else None}

    def write_info(self, directory: str | Path) -> None:
        """Write mlflow_run.json into `directory` (again once the run id is known, if it is not yet)."""
        if self.enabled:
            d = Path(directory)
            if d not in self._info_dirs:
                self._info_dirs.append(d)
            self._write_info_file(d)

    def _write_info_file(self, d: Path) -> None:
        with self._lock:
            d.mkdir(parents=True, exist_ok=True)
            write_atomic(d / RUN_FILE, json.dumps(self.info(), indent=2))

    def set_status(self, status: str) -> None:
        if self.enabled and self.run_key:
            self._emit([{"op": "status", "key": self.run_key, "status": status, "time": now_ms()}])

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run and wait up to timeout_s for the records to reach the server. Returns whether
        they did. A FAILED run with autoflush=False drops the records held since the last checkpoint:
        a resume trains those steps again and records them then."""
        if self._closed or self._sender is None:
            return True
        if self._system is not None:
            self._system.stop()
        if self.enabled:
            if status == "FAILED" and not self.autoflush and self._buffer:
                log.info("%d step records after the last checkpoint are not sent (a resume records them)",
                         len(self._buffer))
                self._buffer.clear()
            self.flush()
            self.set_status(status)
        return self._close(self.timeout_s)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until what has been recorded (and flushed) has reached the server."""
        return True if self._sender is None else self._sender.drain(self.timeout_s if timeout is None else timeout)

    # -- records -----------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        items = [[k, _param_value(v)] for k, v in params.items()]
        self._emit([{"op": "log", "key": self.run_key, "params": items[i:i + _PARAMS_PER_OP]}
                    for i in range(0, len(items), _PARAMS_PER_OP)])

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled or not tags:
            return
        items = [[k, str(v)] for k, v in tags.items()]
        self._emit([{"op": "log", "key": self.run_key, "tags": items[i:i + _PARAMS_PER_OP]}
                    for i in range(0, len(items), _PARAMS_PER_OP)])
        if self.checkpoint_artifacts and tags.get("ldot.checkpoint"):
            self.log_artifact(tags["ldot.checkpoint"], "checkpoint")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        now = now_ms()
        self._buffer.extend([k, float(v), now, int(step)] for k, v in metrics.items())
        if self.autoflush:
            self.flush()

    def pending(self) -> list[list]:
        """Records not yet sent, as [key, value, timestamp, step] rows (stored in each checkpoint)."""
        return [list(row) for row in self._buffer]

    def replay(self, rows: list[list]) -> None:
        """Send records saved in a checkpoint. The store ignores exact duplicates, so rows that did
        reach it before a crash are not recorded twice."""
        if self.enabled and rows:
            self._buffer.extend([k, float(v), int(t), int(s)] for k, v, t, s in rows)
            self.flush()

    def flush(self) -> None:
        """Hand the held metrics to the outbox (they are sent in the background)."""
        if self.enabled and self._buffer:
            rows, self._buffer = self._buffer, []
            self._emit([{"op": "log", "key": self.run_key, "metrics": rows[i:i + _METRICS_PER_OP]}
                        for i in range(0, len(rows), _METRICS_PER_OP)])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file (copied now if small, so later changes do not leak in) or a directory (sent as it is
        when the server answers)."""
        if not self.enabled:
            return
        path = Path(path).resolve()
        owned = path.is_file() and path.stat().st_size <= _COPY_BYTES
        if owned:
            copy = self._journal.own_file(path.name)
            shutil.copy2(path, copy)
            path = copy
        self._emit([{"op": "artifact", "key": self.run_key, "path": str(path), "artifact_path": artifact_path,
                     "owned": owned}])

    log_artifacts = log_artifact

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        where = Path(artifact_file)
        copy = self._journal.own_file(where.name)
        copy.write_text(text)
        self._emit([{"op": "artifact", "key": self.run_key, "path": str(copy),
                     "artifact_path": str(where.parent) if str(where.parent) != "." else None, "owned": True}])

    def start_system_metrics(self, node_id: str, interval_s: float, device_index: int | None = None,
                             disk_path: str | Path | None = None) -> None:
        """Sample this process's machine every interval_s seconds as system/<node_id>/<name>; the step
        is the seconds since the run started, so a resumed job continues the curves. The disk metrics
        are those of the filesystem holding `disk_path`, by default the outbox's (the output directory's
        in a training job)."""
        if self._sender is None or interval_s <= 0 or self._system is not None:
            return

        def emit(metrics: dict[str, float], step: int) -> None:
            now = now_ms()
            self._emit([{"op": "log", "key": self.run_key,
                         "metrics": [[f"system/{node_id}/{k}", float(v), now, step] for k, v in metrics.items()]}])

        self._system = SystemMetrics(emit, self.started_at or time.time(), interval_s, device_index,
                                     disk_path or self._journal.dir)
        self._system.start()
