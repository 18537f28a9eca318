"""tracking/tracker.py and tracking/outbox.py against a real `mlflow server`: a run started while
the server is away, an outage in the middle of a run, a journal delivered twice, sweep parents made
by members that start at once."""
import json
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from ldot.tracking import RUN_FILE, Tracker
from ldot.tracking.outbox import Delivery, Journal, ensure_sweep_parent, sync


def _steps(client, run_id, key):
    steps: dict[int, int] = {}
    for m in client.get_metric_history(run_id, key):
        steps[m.step] = steps.get(m.step, 0) + 1
    return steps


def test_server_away_at_start_and_in_the_middle(mlflow_server, tmp_path, caplog):
    """Nothing waits on the server, nothing is lost, nothing is recorded twice, and the warnings are few."""
    mlflow_server.kill()
    t0 = time.monotonic()
    tracker = Tracker(mlflow_server.uri, "outage-unit", outbox=tmp_path / "outbox", writer="rank0",
                      autoflush=False, timeout_s=20)
    assert tracker.start("away", tags={"who": "test"}) is None
    tracker.log_params({"lr": 0.1, "layers": [1, 2]})
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.flush()
    tracker.log_text("hello\n", "notes/hello.txt")
    tracker.write_info(tmp_path)
    assert time.monotonic() - t0 < 8, "a refused connection must fail fast"
    assert json.loads((tmp_path / RUN_FILE).read_text())["run_id"] is None

    mlflow_server.start()
    assert tracker.drain(60)
    run_id = tracker.run_id
    assert run_id and json.loads((tmp_path / RUN_FILE).read_text())["run_id"] == run_id

    mlflow_server.kill()
    for step in range(6, 11):
        tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.flush()
    tracker.set_tags({"phase": "outage"})
    assert not tracker.drain(5)
    mlflow_server.start()
    assert tracker.drain(60)
    assert tracker.finish()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage" and run.data.tags["who"] == "test"
    assert run.data.params == {"lr": "0.1", "layers": "[1, 2]"}
    assert _steps(client, run_id, "loss") == {s: 1 for s in range(1, 11)}
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "not reachable" in r.getMessage()]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]  # once per outage
    assert not (tmp_path / "outbox" / "rank0.jsonl").exists(), "a delivered journal is removed"


def test_a_journal_delivered_twice_records_everything_once(live_server, tmp_path):
    """At-least-once delivery is exactly-once in effect: runs, params, tags, metrics, artifacts."""
    tracker = Tracker(live_server.uri, "twice", outbox=tmp_path, writer="w", autoflush=False)
    run_id = tracker.start("twice")
    tracker.log_params({"a": 1, "b": "x"})
    tracker.set_tags({"t": "1"})
    tracker.log_metrics({"m": 0.5, "n": float("nan")}, 1)
    tracker.log_metrics({"m": 0.25}, 2)
    tracker.flush()
    tracker.log_text("x", "f.txt")
    assert tracker.drain(30)
    tracker._sender.close()

    journal = Journal(tmp_path, "w")
    journal.ack(0)  # as if every answer had been lost
    assert journal.acquire()
    delivery = Delivery(live_server.uri, "twice")
    assert delivery.deliver(journal) >= 5 and delivery.rejected == 0
    client = MlflowClient(live_server.uri)
    run = client.get_run(run_id)
    assert run.data.params == {"a": "1", "b": "x"} and run.data.tags["t"] == "1"
    assert _steps(client, run_id, "m") == {1: 1, 2: 1} and _steps(client, run_id, "n") == {1: 1}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    journal.release()


def test_sweep_members_starting_at_once_share_one_parent(live_server):
    client = MlflowClient(live_server.uri)
    exp = client.create_experiment("sweep-race")
    ids, barrier = [], threading.Barrier(4)

    def member():
        c = MlflowClient(live_server.uri)
        barrier.wait()
        ids.append(ensure_sweep_parent(c, exp, "lr-sweep", settle_s=2.0))

    threads = [threading.Thread(target=member) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == 4 and len(set(ids)) == 1, ids
    parents = client.search_runs([exp], "tags.`ldot.sweep_parent` = 'lr-sweep'")
    assert [p.info.run_id for p in parents] == ids[:1]


def test_sweep_members_are_nested_and_the_parent_ends_with_them(live_server, tmp_path, monkeypatch):
    monkeypatch.setattr("ldot.tracking.outbox.SWEEP_SETTLE_S", 1.0)  # one process: no race to wait out
    members = []
    for i in range(2):
        t = Tracker(live_server.uri, "sweep-nest", outbox=tmp_path, writer=f"m{i}")
        t.start(f"task-{i}", sweep="s1")
        members.append(t)
    client = MlflowClient(live_server.uri)
    parent_ids = {client.get_run(t.run_id).data.tags["mlflow.parentRunId"] for t in members}
    assert len(parent_ids) == 1
    parent = parent_ids.pop()
    assert client.get_run(parent).data.tags["ldot.sweep_parent"] == "s1"
    members[0].finish()
    assert client.get_run(parent).info.status == "RUNNING", "a member still runs"
    members[1].finish()
    assert client.get_run(parent).info.status == "FINISHED"


def test_sync_sends_what_a_finished_process_left(mlflow_server, tmp_path, capsys):
    mlflow_server.ensure_up()
    tracker = Tracker(mlflow_server.uri, "left-behind", outbox=tmp_path / "mlflow_outbox", writer="rank0",
                      timeout_s=3)
    run_id = tracker.start("left")
    mlflow_server.kill()
    tracker.log_metrics({"x": 1.0}, 1)
    t0 = time.monotonic()
    assert not tracker.finish()
    assert time.monotonic() - t0 < 5
    mlflow_server.start()
    assert sync(tmp_path) == 0
    client = MlflowClient(mlflow_server.uri)
    assert _steps(client, run_id, "x") == {1: 1} and client.get_run(run_id).info.status == "FINISHED"
    assert "sent" in capsys.readouterr().out
    assert sync(tmp_path) == 0  # nothing left, nothing sent twice


@pytest.mark.parametrize("value", ["a'b"])
def test_quotes_cannot_name_a_sweep(value):
    from ldot.tracking import sweep_of

    class Cfg:
        sweep, parent_run_id = value, None

    with pytest.raises(ValueError):
        sweep_of(Cfg)


def test_log_checkpoint_uploads_the_encoders_the_tag_names(tmp_path):
    """tracking.log_checkpoint: the final encoders as artifacts, not only the ldot.checkpoint reference;
    a small file logged is the file as it was then (copied), a directory is sent as it is."""
    final = tmp_path / "final"
    (final / "text_encoder").mkdir(parents=True)
    (final / "text_encoder" / "config.json").write_text("{}")
    (final / "ldot.json").write_text('{"steps": 3}')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "ckpt", outbox=tmp_path / "outbox", writer="rank0")
    run_id = tracker.start("ckpt")
    tracker.log_artifact(final / "ldot.json", "meta")
    (final / "ldot.json").write_text('{"steps": 4}')  # changed after logging
    tracker.checkpoint_artifacts = True
    tracker.set_tags({"ldot.checkpoint": str(final)})
    assert tracker.finish()
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.tags["ldot.checkpoint"] == str(final)
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/ldot.json",
                                                                           "checkpoint/text_encoder"}
    local = client.download_artifacts(run_id, "meta/ldot.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == {"steps": 3}
    assert client.get_experiment_by_name("ckpt").artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
