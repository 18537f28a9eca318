"""The tracking outbox: MLflow records go to a journal in the output directory first and a background
thread sends them from there, so an absent or slow tracking server never stalls or kills training.

Each writing process owns one journal, `<dir>/<writer>.jsonl`, one operation per line:

    {"op": "run", "key": K, "name": ..., "tags": {...}, "start_time": ms, "sweep": ..., "parent_run_id": ...}
    {"op": "log", "key": K, "metrics": [[key, value, timestamp, step], ...], "params": [[k, v]], "tags": [[k, v]]}
    {"op": "status", "key": K, "status": "RUNNING" | "FINISHED" | "FAILED" | "KILLED", "time": ms}
    {"op": "artifact", "key": K, "path": ..., "artifact_path": ..., "owned": bool}

beside `<writer>.sent` (the byte offset delivered so far), `<writer>.json` (tracking URI, experiment,
run key and, once known, run id) and `<writer>.lock` (held by the live process that sends it).
Runs are named by a key made on the client (tag `ldot.run_key`), so a run can be started while the
server is away and created when it answers.

Delivery is at least once: an operation whose answer is lost is sent again. Every operation is
idempotent in MLflow's SQL stores (sqlite, PostgreSQL, MySQL: what `mlflow server` runs on): a run
is looked up by its key before it is created; an exact duplicate metric row (key, value, timestamp,
step) is dropped; a param logged again with the same value is accepted; tags and artifacts
overwrite. A file store (`./mlruns`) keeps duplicate metric rows, so it is not exactly-once.

Why not MLflow's own async logging (`log_metrics(..., synchronous=False)`): it drops a batch that
fails. Checked in the installed MLflow 3.17.2, mlflow/utils/async_logging/async_logging_queue.py:
in `_log_run_data` the worker's `logging_func` (lines 197-209) catches any exception from
`log_batch`, logs "Failed to log run data", stores it on the batch (`run_batch.exception = e`) and
completes it; the only `self._queue.put` is in `log_batch_async` (line 313), so nothing puts a
failed batch back, and the queue is a `queue.Queue` in memory, gone with a killed process. A server
away for minutes would cost every record of those minutes; here they wait on disk and are sent
when it answers.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from ldot.files import write_atomic

log = logging.getLogger("ldot.tracking")

OUTBOX_DIR = "mlflow_outbox"
ARTIFACTS_DIR = "mlartifacts"  # beside a sqlite store, instead of MLflow's ./mlruns in the working directory
SWEEP_SETTLE_S = 3.0  # >= twice a create_run round trip: see ensure_sweep_parent
_MAX_METRICS, _MAX_PARAMS_TAGS, _MAX_ENTITIES = 1000, 100, 1000  # MLflow's log_batch limits
_READ_OPS = 5000
_COMPACT_BYTES = 4 << 20
_BACKOFF_S = (1, 2, 5, 10, 30)
_WARN_EVERY_S = 300.0
_MIN_INTERVAL_S = 1.0  # a healthy sender batches what arrives within a second


def limit_mlflow_retries() -> None:
    """MLflow's REST client retries a refused connection 7 times with exponential backoff (about four
    minutes) and waits 120 s for an answer. The outbox retries on its own schedule, so a request should
    fail fast. Values the user has set are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_key() -> str:
    return uuid.uuid4().hex


class Unreachable(Exception):
    """The store did not answer, or a run another writer creates is not there yet; try again later."""


# --------------------------------------------------------------------------------------------
# The journal


class Journal:
    """One writer's append-only journal of operations and how far it has been delivered."""

    def __init__(self, directory: str | Path, writer: str):
        self.dir, self.writer = Path(directory), writer
        self.path = self.dir / f"{writer}.jsonl"
        self.meta_path = self.dir / f"{writer}.json"
        self._cursor_path = self.dir / f"{writer}.sent"
        self._lock_path = self.dir / f"{writer}.lock"
        self._lock = threading.Lock()
        self._lock_fd: int | None = None

    # -- ownership ------------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Take the writer's lock (a POSIX record lock: released when the process dies, not inherited
        by forked data-loader workers). False if another live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self._repair()
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the record lock
            self._lock_fd = None

    def _repair(self) -> None:
        """A process killed in the middle of a write leaves a partial last line: drop it."""
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)

    # -- meta -----------------------------------------------------------------------------------
    def read_meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_meta(self, meta: dict) -> None:
        write_atomic(self.meta_path, json.dumps(meta, indent=2))

    # -- records --------------------------------------------------------------------------------
    def append(self, ops: Iterable[dict], sync: bool = False) -> None:
        lines = "".join(json.dumps(op, separators=(",", ":")) + "\n" for op in ops)
        if not lines:
            return
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(lines)
                f.flush()
                if sync:
                    os.fsync(f.fileno())

    def cursor(self) -> int:
        try:
            return int(self._cursor_path.read_text())
        except (OSError, ValueError):
            return 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def backlog(self) -> int:
        """Bytes of operations not yet delivered."""
        return max(0, self.size() - self.cursor())

    def read(self, max_ops: int = _READ_OPS) -> list[tuple[int, dict]]:
        """Undelivered operations as (offset just past it, op); a partial last line is left alone."""
        out: list[tuple[int, dict]] = []
        try:
            f = open(self.path, "rb")
        except OSError:
            return out
        with f:
            f.seek(self.cursor())
            while len(out) < max_ops:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                try:
                    op = json.loads(line)
                except ValueError:
                    log.warning("%s: unreadable line skipped at byte %d", self.path, f.tell() - len(line))
                    op = {"op": "skip"}
                out.append((f.tell(), op))
        return out

    def ack(self, offset: int) -> None:
        write_atomic(self._cursor_path, str(offset))

    def compact(self) -> None:
        """Start the journal afresh once everything in it is delivered (a long job would grow it)."""
        with self._lock:
            if self.size() >= _COMPACT_BYTES and self.backlog() == 0:
                with open(self.path, "r+b") as f:
                    f.truncate(0)
                self.ack(0)

    def remove(self) -> None:
        """Delete a fully delivered journal (and the files its operations owned)."""
        with self._lock:
            for p in (self.path, self._cursor_path, self.meta_path, self._lock_path):
                p.unlink(missing_ok=True)
            shutil.rmtree(self.dir / "files" / self.writer, ignore_errors=True)
        self.release()
        for d in (self.dir / "files", self.dir):
            try:
                d.rmdir()
            except OSError:
                pass

    def set_aside(self) -> str:
        """Rename this writer's files to a fresh writer name (keeps another job's leftovers for sync)."""
        other = f"{self.writer}-{new_key()[:8]}"
        for p, suffix in ((self.path, ".jsonl"), (self._cursor_path, ".sent"), (self.meta_path, ".json")):
            if p.exists():
                p.rename(self.dir / f"{other}{suffix}")
        files = self.dir / "files" / self.writer
        if files.exists():
            files.rename(self.dir / "files" / other)
        return other

    def own_file(self, name: str) -> Path:
        """A path for a file the journal keeps until its artifact operation is delivered."""
        d = self.dir / "files" / self.writer / new_key()[:12]
        d.mkdir(parents=True, exist_ok=True)
        return d / name


def journals_under(directory: str | Path) -> list[Journal]:
    """Every journal in DIR, DIR/mlflow_outbox, or any mlflow_outbox below DIR."""
    root = Path(directory)
    dirs = {p.parent for p in root.glob("*.jsonl")} if root.name == OUTBOX_DIR else set()
    dirs |= {p.parent for p in root.rglob(f"{OUTBOX_DIR}/*.jsonl")}
    return [Journal(d, p.stem) for d in sorted(dirs) for p in sorted(d.glob("*.jsonl"))]


# --------------------------------------------------------------------------------------------
# Delivery


def _permanent(exc: BaseException) -> bool:
    """An error the store will repeat however often we ask (a bad value, a missing run), as opposed
    to one that says it is away or busy (refused connection, timeout, 5xx, 429)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(exc, (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError))


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"a quote in {value!r} cannot go into an MLflow filter")
    return f"'{value}'"


def ensure_sweep_parent(client, experiment_id: str, sweep: str, settle_s: float | None = None) -> str:
    """The id of the parent run of `sweep` in the experiment, created by whichever member asks first.

    Race-safe for members that start at once (a Slurm array): each looks for runs tagged
    `ldot.sweep_parent=<sweep>` and creates one if there is none; then it waits `settle_s` and looks
    again, and every member takes the same one, the earliest by (start time, run id). A member whose
    parent lost deletes it. This holds when a create_run round trip takes under settle_s / 2."""
    settle_s = SWEEP_SETTLE_S if settle_s is None else settle_s
    flt = f"tags.`ldot.sweep_parent` = {_quote(sweep)}"
    found = client.search_runs([experiment_id], flt, max_results=50)
    mine = None
    if not found:
        mine = client.create_run(experiment_id, run_name=sweep, start_time=now_ms(),
                                 tags={"ldot.sweep_parent": sweep, "ldot.sweep": sweep}).info.run_id
    time.sleep(settle_s)
    found = client.search_runs([experiment_id], flt, max_results=50)
    if not found:  # ours must be there at least, unless someone deleted it
        raise Unreachable(f"the parent run of sweep {sweep!r} vanished")
    winner = min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if mine and mine != winner:
        client.delete_run(mine)
    return winner


class Delivery:
    """Sends journal operations through one MlflowClient; used by the background sender and by sync."""

    def __init__(self, tracking_uri: str, experiment: str, on_run: Callable[[str, str], None] | None = None,
                 client=None):
        """`client`: what sends (an MlflowClient for tracking_uri unless given; the unit tests of the
        batching give a stand-in that records each call)."""
        limit_mlflow_retries()
        self.tracking_uri, self.experiment, self.on_run = tracking_uri, experiment, on_run
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
        self.client = client
        self.run_ids: dict[str, str] = {}
        self._experiment_id: str | None = None
        self.rejected = 0

    # -- lookups --------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment, self._artifact_root())
                except Exception as exc:  # another rank or array task created it first
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise exc
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _artifact_root(self) -> str | None:
        """Beside a sqlite store (the output directory by default); a server decides for itself."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///"):])
            return (db.parent / ARTIFACTS_DIR).resolve().as_uri()
        return None

    def _find_run(self, key: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id()], f"tags.`ldot.run_key` = {_quote(key)}",
                                       max_results=10)
        if not runs:
            return None
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

    def run_id(self, key: str) -> str:
        if key not in self.run_ids:
            found = self._find_run(key)
            if found is None:
                raise Unreachable(f"run {key} is not created yet")
            self._resolved(key, found)
        return self.run_ids[key]

    def _resolved(self, key: str, run_id: str) -> None:
        self.run_ids[key] = run_id
        if self.on_run:
            self.on_run(key, run_id)

    # -- operations -----------------------------------------------------------------------------
    def _create_run(self, op: dict) -> None:
        key = op["key"]
        existing = self.run_ids.get(key) or self._find_run(key)
        if existing:  # created before (an answer lost, or a replayed journal)
            self._resolved(key, existing)
            return
        tags = {**op.get("tags", {}), "ldot.run_key": key}
        parent = op.get("parent_run_id")
        if op.get("sweep"):
            parent = ensure_sweep_parent(self.client, self.experiment_id(), op["sweep"])
            tags["ldot.sweep"] = op["sweep"]
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id(), start_time=op.get("start_time"), tags=tags,
                                     run_name=op.get("name"))
        self._resolved(key, run.info.run_id)
        if parent:
            self._best_effort(lambda: self.client.update_run(parent, status="RUNNING"))

    def _status(self, op: dict) -> None:
        run_id = self.run_id(op["key"])
        if op["status"] == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
            return
        self.client.set_terminated(run_id, status=op["status"], end_time=op.get("time"))
        self._best_effort(lambda: self._close_parent(run_id))

    def _close_parent(self, run_id: str) -> None:
        """A sweep's parent is finished when none of its members runs."""
        parent = self.client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if not parent:
            return
        running = self.client.search_runs(
            [self.experiment_id()], f"tags.`mlflow.parentRunId` = {_quote(parent)} and attributes.status = 'RUNNING'",
            max_results=1)
        if not running:
            self.client.set_terminated(parent, status="FINISHED")

    def _best_effort(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # cosmetic: the parent's status
            log.debug("parent run status not updated: %s", exc)

    def _artifact(self, op: dict) -> None:
        path = Path(op["path"])
        if not path.exists():
            if op.get("owned"):  # sent before, and its copy removed then
                return
            raise FileNotFoundError(f"artifact {path} is gone")
        run_id = self.run_id(op["key"])
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), op.get("artifact_path"))
        else:
            self.client.log_artifact(run_id, str(path), op.get("artifact_path"))
        if op.get("owned"):
            shutil.rmtree(path.parent, ignore_errors=True)

    def _log(self, ops: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = self.run_id(ops[0]["key"])
        metrics = [Metric(k, float(v), int(t), int(s)) for op in ops for k, v, t, s in op.get("metrics", ())]
        params = [Param(k, v) for op in ops for k, v in op.get("params", ())]
        tags = [RunTag(k, v) for op in ops for k, v in op.get("tags", ())]
        self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)

    def _send(self, group: list[dict]) -> None:
        kind = group[0]["op"]
        if kind == "log":
            self._log(group)
        elif kind == "run":
            self._create_run(group[0])
        elif kind == "status":
            self._status(group[0])
        elif kind == "artifact":
            self._artifact(group[0])
        # "skip" (an unreadable line) and unknown operations: nothing to send

    # -- a journal ------------------------------------------------------------------------------
    def deliver(self, journal: Journal) -> int:
        """Send what the journal holds; returns how many operations went. Raises Unreachable (with
        the cursor at the first operation not delivered) when the store does not answer."""
        sent = 0
        while True:
            ops = journal.read()
            if not ops:
                journal.compact()
                return sent
            i = 0
            while i < len(ops):
                j = _group_end(ops, i)
                group = [op for _, op in ops[i:j]]
                try:
                    self._send(group)
                except Unreachable:
                    raise
                except Exception as exc:
                    if not _permanent(exc):
                        raise Unreachable(_short(exc)) from exc
                    self._one_by_one(journal, ops[i:j], exc)
                journal.ack(ops[j - 1][0])
                sent += j - i
                i = j

    def _one_by_one(self, journal: Journal, items: list[tuple[int, dict]], exc: BaseException) -> None:
        """A batch the store refused: send its operations one at a time and set aside those it refuses."""
        if len(items) == 1:
            self._reject(journal, items[0][1], exc)
            return
        for offset, op in items:
            try:
                self._send([op])
            except Unreachable:
                raise
            except Exception as one:
                if not _permanent(one):
                    raise Unreachable(_short(one)) from one
                self._reject(journal, op, one)
            journal.ack(offset)

    def _reject(self, journal: Journal, op: dict, exc: BaseException) -> None:
        self.rejected += 1
        log.warning("MLflow refused a record (%s); it is kept in %s", _short(exc), journal.dir / "rejected.log")
        with open(journal.dir / "rejected.log", "a") as f:
            f.write(json.dumps({"writer": journal.writer, "error": _short(exc), "op": op}) + "\n")


def _group_end(ops: list[tuple[int, dict]], i: int) -> int:
    """Consecutive log operations of one run go in one log_batch, within MLflow's limits and without
    a param or tag key twice (MLflow refuses a batch that repeats one)."""
    first = ops[i][1]
    if first.get("op") != "log":
        return i + 1
    n_metrics = n_params = n_tags = 0
    keys: set[tuple[str, str]] = set()
    j = i
    while j < len(ops):
        op = ops[j][1]
        if op.get("op") != "log" or op.get("key") != first.get("key"):
            break
        m, p, t = len(op.get("metrics", ())), len(op.get("params", ())), len(op.get("tags", ()))
        new_keys = {("p", k) for k, _ in op.get("params", ())} | {("t", k) for k, _ in op.get("tags", ())}
        if j > i and (n_metrics + m > _MAX_METRICS or n_params + p > _MAX_PARAMS_TAGS or n_tags + t > _MAX_PARAMS_TAGS
                      or n_metrics + n_params + n_tags + m + p + t > _MAX_ENTITIES or keys & new_keys):
            break
        n_metrics, n_params, n_tags = n_metrics + m, n_params + p, n_tags + t
        keys |= new_keys
        j += 1
    return j


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------------------------
# The background sender


class Sender:
    """A daemon thread that drains one journal into MLflow.

    Healthy, it sends at most once a second whatever has been appended. When the store does not
    answer it retries after 1, 2, 5, 10, then every 30 s, and warns once, then at most every five
    minutes, and once more when the store is back. Training never waits on it, except through drain()."""

    def __init__(self, journal: Journal, delivery: Delivery):
        self.journal, self.delivery = journal, delivery
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._hurry = threading.Event()  # drain() or close(): no waiting for the once-a-second slot
        self._last_attempt = float("-inf")
        self._stop = False
        self._urgent = False
        self.attempts = 0
        self.failing_since: float | None = None
        self.last_error = ""
        self._failures = 0
        self._next_try = 0.0
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-outbox-{journal.writer}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Send now and wait until everything appended so far is delivered (True), or until one fresh
        attempt has failed or `timeout` has passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            start = self.attempts
            self._urgent = True
            self._hurry.set()
            self._wake.set()
            while True:
                if self.attempts > start and self.failing_since is None and self.journal.backlog() == 0:
                    return True
                if self.attempts > start and self.failing_since is not None:
                    return False
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return self.journal.backlog() == 0 and self.failing_since is None
                self._cond.wait(min(left, 0.5))

    def close(self, timeout: float = 2.0) -> None:
        self._stop = True
        self._hurry.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop:
            if self.failing_since is not None:
                wait = max(0.0, self._next_try - time.monotonic())
            else:
                wait = None if self.journal.backlog() == 0 else _MIN_INTERVAL_S
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop:
                break
            if self.failing_since is not None and not self._urgent and time.monotonic() < self._next_try:
                continue
            if not self._urgent and self.failing_since is None:
                # at most one request a second: what arrives meanwhile goes in the same batch
                self._hurry.wait(self._last_attempt + _MIN_INTERVAL_S - time.monotonic())
            self._hurry.clear()
            self._urgent = False
            self._last_attempt = time.monotonic()
            self._attempt()

    def _attempt(self) -> None:
        try:
            self.delivery.deliver(self.journal)
            error = None
        except Unreachable as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not kill the thread: keep the records, report, retry
            error = _short(exc)
            log.exception("MLflow outbox: unexpected error")
        with self._cond:
            self.attempts += 1
            if error is None:
                if self.failing_since is not None:
                    log.warning("MLflow tracking at %s answers again after %.0f s; queued records sent",
                                self.delivery.tracking_uri, time.monotonic() - self.failing_since)
                self.failing_since, self._failures, self.last_error = None, 0, ""
            else:
                self._on_failure(error)
            self._cond.notify_all()

    def _on_failure(self, error: str) -> None:
        now = time.monotonic()
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = now
            self._last_warning = now
            log.warning("MLflow tracking at %s is not reachable (%s); training goes on and records are kept "
                        "in %s until it answers (or `ldot eval sync`)", self.delivery.tracking_uri, error,
                        self.journal.path)
        elif now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("MLflow tracking at %s still not reachable after %.0f s (%s); %d bytes of records waiting",
                        self.delivery.tracking_uri, now - self.failing_since, error, self.journal.backlog())
        self._next_try = now + _BACKOFF_S[min(self._failures, len(_BACKOFF_S) - 1)]
        self._failures += 1


# --------------------------------------------------------------------------------------------
# Sync


def sync(directory: str | Path, tracking_uri: str | None = None, out: Callable[[str], None] = print) -> int:
    """Send every journal left under DIR; returns how many operations are still undelivered."""
    journals = journals_under(directory)
    if not journals:
        out(f"no MLflow outbox under {directory}: nothing to send")
        return 0
    # Writers that create runs first, so that the others find them.
    pending = sorted(journals, key=lambda j: (not _creates_runs(j), j.writer))
    deliveries: dict[tuple[str, str], Delivery] = {}
    left = 0
    for journal in pending:
        meta = journal.read_meta()
        uri = tracking_uri or meta.get("tracking_uri")
        if not uri or not meta.get("experiment"):
            out(f"{journal.path}: no {journal.meta_path.name} saying where it goes; skipped")
            left += len(journal.read())
            continue
        if not journal.acquire():
            out(f"{journal.path}: a running process is sending it; skipped")
            continue
        try:
            delivery = deliveries.setdefault((uri, meta["experiment"]), Delivery(uri, meta["experiment"]))
            if meta.get("run_key") and meta.get("run_id"):
                delivery.run_ids.setdefault(meta["run_key"], meta["run_id"])
            try:
                n = delivery.deliver(journal)
                out(f"{journal.path}: sent {n} records to {uri}")
                journal.remove()
            except Unreachable as exc:
                waiting = len(journal.read())
                left += waiting
                out(f"{journal.path}: {waiting} records not sent ({exc})")
        finally:
            journal.release()
    return left


def _creates_runs(journal: Journal) -> bool:
    try:
        with open(journal.path, "rb") as f:
            return any(b'"op":"run"' in line for line in f)
    except OSError:
        return False


def writer_name(rank: int | None = None) -> str:
    """rank<r> for a training rank; host-pid-random for anything else (eval attaching to a run)."""
    return f"rank{rank}" if rank is not None else f"{socket.gethostname()}-{os.getpid()}-{new_key()[:6]}"
