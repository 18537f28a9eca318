"""A stand-in for `mlflow.tracking.MlflowClient` with the calls `Delivery` makes, for unit tests of the
outbox's journal and batching: fast (no server, no database) and able to fail on demand, which a real
store cannot be made to do one call at a time.

It keeps the rules of MLflow's SQL stores that the batching depends on: log_batch's limits (MLflow's
REST API reference, runs/log-batch: at most 1000 metrics, 100 params, 100 tags, 1000 in all), a
batch that repeats a param key is refused, a param logged again must keep its value, and a refused
batch writes nothing. Unlike the SQL stores it keeps exact duplicate metric rows, and it remembers
every call, so a test sees anything sent twice. The integration tests (test_tracker.py,
test_job_tracking.py) run against a real store and a real `mlflow server`."""
from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000

_CLAUSE = re.compile(r"(?:tags\.`([^`]+)`|attributes\.(status)) = '([^']*)'")


def refused(message: str) -> MlflowException:
    """What a store answers to a bad request (HTTP 400): an error it will repeat however often asked."""
    return MlflowException(message, INVALID_PARAMETER_VALUE)


class FakeClient:
    def __init__(self):
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, SimpleNamespace] = {}
        self.batches: list[dict] = []  # every log_batch the store accepted, in order
        self.refused_batches = 0
        self.refuse_keys: set[str] = set()  # metric keys the store refuses (as it would a malformed one)
        self.failures: dict[str, list[BaseException | None]] = {}  # method -> what its next calls raise
        self.lose_answer: set[str] = set()  # methods whose next call is done but answered by an error
        self.calls: list[str] = []
        self._ids = itertools.count(1)

    def fail_next(self, method: str, *errors: BaseException | None) -> None:
        """The next calls of `method` raise these errors in turn (None: that call goes through)."""
        self.failures.setdefault(method, []).extend(errors)

    def _call(self, method: str) -> None:
        self.calls.append(method)
        error = self.failures[method].pop(0) if self.failures.get(method) else None
        if error is not None:
            raise error

    def _answer(self, method: str, result=None):
        if method in self.lose_answer:
            self.lose_answer.discard(method)
            raise ConnectionError(f"{method}: the answer was lost")
        return result

    # -- experiments ----------------------------------------------------------------------------
    def get_experiment_by_name(self, name):
        self._call("get_experiment_by_name")
        exp_id = self.experiments.get(name)
        return SimpleNamespace(experiment_id=exp_id, name=name) if exp_id else None

    def create_experiment(self, name, artifact_location=None):
        self._call("create_experiment")
        if name in self.experiments:
            raise refused(f"experiment {name!r} exists")
        self.experiments[name] = str(next(self._ids))
        return self.experiments[name]

    # -- runs -----------------------------------------------------------------------------------
    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        self._call("create_run")
        run_id = f"run{next(self._ids)}"
        run = SimpleNamespace(
            info=SimpleNamespace(run_id=run_id, experiment_id=experiment_id, start_time=start_time or 0,
                                 status="RUNNING", end_time=None, run_name=run_name),
            data=SimpleNamespace(tags=dict(tags or {}), params={}, metrics=[]), artifacts=[])
        self.runs[run_id] = run
        return self._answer("create_run", run)

    def get_run(self, run_id):
        self._call("get_run")
        return self._run(run_id)

    def _run(self, run_id):
        if run_id not in self.runs:
            raise MlflowException(f"run {run_id} not found", INVALID_PARAMETER_VALUE)
        return self.runs[run_id]

    def search_runs(self, experiment_ids, filter_string="", max_results=1000):
        """Only the filters Delivery writes: `tags.`k` = 'v'` and `attributes.status = 'S'`, joined by and."""
        self._call("search_runs")
        clauses = filter_string.split(" and ")
        parsed = [_CLAUSE.fullmatch(c.strip()) for c in clauses]
        assert all(parsed), f"the fake does not read the filter {filter_string!r}"

        def matches(run) -> bool:
            for m in parsed:
                tag, status, value = m.groups()
                have = run.info.status if status else run.data.tags.get(tag)
                if have != value:
                    return False
            return True

        found = [r for r in self.runs.values() if r.info.experiment_id in experiment_ids and matches(r)]
        return found[:max_results]

    def update_run(self, run_id, status=None, name=None):
        self._call("update_run")
        if status:
            self._run(run_id).info.status = status

    def set_terminated(self, run_id, status=None, end_time=None):
        self._call("set_terminated")
        run = self._run(run_id)
        run.info.status, run.info.end_time = status or "FINISHED", end_time

    # -- records --------------------------------------------------------------------------------
    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self._call("log_batch")
        metrics, params, tags = list(metrics), list(params), list(tags)
        run = self._run(run_id)
        try:
            for name, n, limit in (("metrics", len(metrics), MAX_METRICS), ("params", len(params), MAX_PARAMS),
                                   ("tags", len(tags), MAX_TAGS),
                                   ("entities", len(metrics) + len(params) + len(tags), MAX_ENTITIES)):
                if n > limit:
                    raise refused(f"a batch holds at most {limit} {name}, got {n}")
            keys = [p.key for p in params]
            if len(keys) != len(set(keys)):
                raise refused(f"duplicate param keys in one batch: {keys}")
            for p in params:
                if p.key in run.data.params and run.data.params[p.key] != p.value:
                    raise refused(f"param {p.key} changed value")
            for m in metrics:
                if m.key in self.refuse_keys:
                    raise refused(f"invalid metric name {m.key!r}")
        except MlflowException:
            self.refused_batches += 1
            raise
        run.data.metrics.extend((m.key, m.value, m.timestamp, m.step) for m in metrics)
        run.data.params.update((p.key, p.value) for p in params)
        run.data.tags.update((t.key, t.value) for t in tags)
        self.batches.append({"run_id": run_id, "metrics": len(metrics), "params": len(params), "tags": len(tags)})
        return self._answer("log_batch")

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._call("log_artifact")
        self._run(run_id).artifacts.append((local_path, artifact_path))

    log_artifacts = log_artifact
