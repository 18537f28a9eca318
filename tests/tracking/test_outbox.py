"""Unit tests of the outbox (tracking/outbox.py): the journal on disk, and Delivery's batching, error
handling and run creation against a stand-in client (fake_client.py) that records every call and
fails on demand. Fast: no server, no database, no waiting. The same paths against a real store and a
real `mlflow server` are in test_tracker.py."""
import itertools
import json
from collections import Counter

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import REQUEST_LIMIT_EXCEEDED, TEMPORARILY_UNAVAILABLE

from fake_client import FakeClient
from ldot.tracking import outbox
from ldot.tracking.outbox import OUTBOX_DIR, Delivery, Journal, Unreachable, journals_under

# fast tests: a delivery loop that never ends (a cursor that does not move) fails in a minute, not 15
pytestmark = pytest.mark.timeout(60)

KEY = "run-key-1"


def log(key=KEY, metrics=(), params=(), tags=()):
    op = {"op": "log", "key": key}
    for name, items in (("metrics", metrics), ("params", params), ("tags", tags)):
        if items:
            op[name] = [list(x) for x in items]
    return op


def metrics(prefix: str, n: int, step: int = 1):
    return [[f"{prefix}{i}", float(i), 1000 + step, step] for i in range(n)]


def params(prefix: str, n: int):
    return [[f"{prefix}{i}", str(i)] for i in range(n)]


RUN = {"op": "run", "key": KEY, "name": "unit", "tags": {"who": "test"}, "start_time": 1, "sweep": None,
       "parent_run_id": None}


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / OUTBOX_DIR, "w")
    yield j
    j.release()


def sent(client, run_id):
    """(key, step) -> how many times the store received that metric row."""
    return Counter((k, s) for k, _, _, s in client.runs[run_id].data.metrics)


def expected(ops):
    return Counter((k, s) for op in ops for k, _, _, s in op.get("metrics", ()))


def only_run(client):
    assert len(client.runs) == 1, client.runs
    return next(iter(client.runs))


# --------------------------------------------------------------------------------------------
# The journal

OPS = [log(metrics=[["m", float(i), 1000 + i, i]]) for i in range(5)]


def test_read_returns_each_op_with_the_offset_past_it_and_ack_moves_the_cursor(journal):
    journal.append(OPS[:2])
    journal.append(OPS[2:])
    got = journal.read()
    assert [op for _, op in got] == OPS
    lines = journal.path.read_bytes().splitlines(keepends=True)
    assert [offset for offset, _ in got] == list(itertools.accumulate(map(len, lines)))
    assert journal.backlog() == journal.size() == got[-1][0]
    assert [op for _, op in journal.read(max_ops=2)] == OPS[:2]

    journal.ack(got[1][0])
    again = Journal(journal.dir, "w")  # the cursor is on disk: a restarted process reads on from it
    assert again.cursor() == got[1][0]
    assert [op for _, op in again.read()] == OPS[2:]
    assert journal.backlog() == journal.size() - got[1][0]

    journal.ack(got[-1][0])
    assert journal.read() == [] and journal.backlog() == 0


def test_a_torn_last_line_is_left_alone_then_cut_when_the_journal_is_taken(journal):
    """A process killed in the middle of a write: read stops before the partial line, and the next
    owner cuts it off, so what it appends next is not glued to the torn bytes."""
    journal.append(OPS[:2])
    whole = journal.size()
    with open(journal.path, "ab") as f:
        f.write(b'{"op":"log","key":"run-key-1","metr')
    assert [op for _, op in journal.read()] == OPS[:2]
    assert journal.acquire()
    assert journal.size() == whole
    journal.append(OPS[2:3])
    assert [op for _, op in journal.read()] == OPS[:3]


def test_a_journal_holding_only_a_torn_line_is_emptied(journal):
    journal.dir.mkdir(parents=True, exist_ok=True)
    journal.path.write_bytes(b'{"op":"ru')
    assert journal.acquire()
    assert journal.size() == 0


def test_an_unreadable_line_is_skipped_and_the_rest_read(journal):
    journal.append(OPS[:1])
    with open(journal.path, "a") as f:
        f.write("not json\n")
    journal.append(OPS[1:2])
    assert [op for _, op in journal.read()] == [OPS[0], {"op": "skip"}, OPS[1]]


def test_compact_starts_afresh_only_once_everything_is_delivered(journal, monkeypatch):
    monkeypatch.setattr(outbox, "_COMPACT_BYTES", 1)
    journal.append(OPS)
    got = journal.read()
    journal.ack(got[2][0])
    journal.compact()
    assert [op for _, op in journal.read()] == OPS[3:], "undelivered operations survive a compaction"
    journal.ack(got[-1][0])
    journal.compact()
    assert journal.size() == 0 and journal.cursor() == 0
    journal.append(OPS[:1])
    assert [op for _, op in journal.read()] == OPS[:1]


def test_compact_leaves_a_small_journal(journal):
    journal.append(OPS)
    journal.ack(journal.read()[-1][0])
    journal.compact()
    assert journal.size() > 0 and journal.backlog() == 0


def test_set_aside_moves_records_cursor_meta_and_owned_files_to_a_writer_of_their_own(journal, tmp_path):
    """What a job started afresh in an old output directory does with the earlier run's unsent records."""
    journal.append(OPS)
    journal.ack(journal.read()[1][0])
    journal.write_meta({"run_key": "old"})
    owned = journal.own_file("a.txt")
    owned.write_text("kept")

    other = Journal(journal.dir, journal.set_aside())
    assert other.writer != journal.writer
    assert [op for _, op in other.read()] == OPS[2:]
    assert other.read_meta() == {"run_key": "old"}
    assert (journal.dir / "files" / other.writer / owned.parent.name / "a.txt").read_text() == "kept"
    assert journal.read() == [] and journal.cursor() == 0 and journal.read_meta() == {}
    journal.append(OPS[:1])
    assert sorted(j.writer for j in journals_under(tmp_path)) == sorted([journal.writer, other.writer])


# --------------------------------------------------------------------------------------------
# Delivery


def setup(tmp_path, ops, client=None, **kwargs):
    client = client or FakeClient()
    journal = Journal(tmp_path, "w")
    journal.append(ops)
    return journal, Delivery("fake://store", "unit", client=client, **kwargs), client


def shapes(client):
    return [(b["metrics"], b["params"], b["tags"]) for b in client.batches]


def delivered_all(journal, delivery):
    """Everything acknowledged, and a second pass sends nothing again."""
    return journal.backlog() == 0 and delivery.deliver(journal) == 0


@pytest.mark.parametrize("ops, batches", [
    pytest.param([log(metrics=metrics("a", 400)), log(metrics=metrics("b", 400)), log(metrics=metrics("c", 400))],
                 [(800, 0, 0), (400, 0, 0)], id="metrics"),
    pytest.param([log(metrics=metrics("a", 500)), log(metrics=metrics("b", 500)), log(metrics=metrics("c", 1))],
                 [(1000, 0, 0), (1, 0, 0)], id="metrics-at-the-limit"),
    pytest.param([log(params=params("a", 50)), log(params=params("b", 50)), log(params=params("c", 1))],
                 [(0, 100, 0), (0, 1, 0)], id="params-at-the-limit"),
    pytest.param([log(params=params("a", 60)), log(params=params("b", 60))], [(0, 60, 0), (0, 60, 0)], id="params"),
    pytest.param([log(tags=params("a", 60)), log(tags=params("b", 60))], [(0, 0, 60), (0, 0, 60)], id="tags"),
    pytest.param([log(metrics=metrics("a", 950)), log(params=params("b", 40), tags=params("t", 20))],
                 [(950, 0, 0), (0, 40, 20)], id="entities"),
    pytest.param([log(params=[["lr", "1"]]), log(params=[["lr", "1"]])], [(0, 1, 0), (0, 1, 0)],
                 id="a-param-key-twice"),
    pytest.param([log(metrics=metrics("a", 1)), log(params=params("p", 1)), log(tags=params("t", 1)),
                  log(metrics=metrics("b", 2), params=params("q", 2))], [(3, 3, 1)], id="mixed"),
])
def test_log_ops_of_a_run_go_in_as_few_batches_as_mlflow_limits_allow(tmp_path, ops, batches):
    journal, delivery, client = setup(tmp_path, [RUN] + ops)
    assert delivery.deliver(journal) == 1 + len(ops)
    assert shapes(client) == batches
    assert client.refused_batches == 0 and delivery.rejected == 0
    run = client.runs[only_run(client)]
    assert sent(client, run.info.run_id) == expected(ops)
    assert run.data.params == {k: v for op in ops for k, v in op.get("params", ())}
    assert delivered_all(journal, delivery)


def test_a_batch_ends_at_another_run_or_another_kind_of_operation(tmp_path):
    other = {**RUN, "key": "run-key-2", "start_time": 2}
    ops = [RUN, other, log(metrics=metrics("a", 1)), log(key="run-key-2", metrics=metrics("b", 1)),
           log(metrics=metrics("c", 1)), {"op": "status", "key": KEY, "status": "RUNNING", "time": 3},
           log(metrics=metrics("d", 1)), log(metrics=metrics("e", 1))]
    journal, delivery, client = setup(tmp_path, ops)
    assert delivery.deliver(journal) == len(ops)
    assert [(b["run_id"], b["metrics"]) for b in client.batches] == [
        (delivery.run_ids[KEY], 1), (delivery.run_ids["run-key-2"], 1), (delivery.run_ids[KEY], 1),
        (delivery.run_ids[KEY], 2)]
    assert sent(client, delivery.run_ids[KEY]) == expected([ops[2], ops[4], ops[6], ops[7]])
    assert sent(client, delivery.run_ids["run-key-2"]) == expected([ops[3]])
    assert delivered_all(journal, delivery)


def test_a_refused_batch_goes_one_by_one_and_only_the_bad_op_is_set_aside(tmp_path):
    good = [log(metrics=metrics("a", 3)), log(metrics=metrics("c", 3))]
    bad = log(metrics=[["bad", 1.0, 1, 1]])
    ops = [RUN, good[0], bad, good[1], {"op": "status", "key": KEY, "status": "FINISHED", "time": 9}]
    journal, delivery, client = setup(tmp_path, ops)
    client.refuse_keys = {"bad"}
    assert delivery.deliver(journal) == len(ops)
    run_id = only_run(client)
    assert sent(client, run_id) == expected(good)
    assert client.runs[run_id].info.status == "FINISHED"
    assert delivery.rejected == 1
    rejected = [json.loads(line) for line in (tmp_path / "rejected.log").read_text().splitlines()]
    assert [(r["writer"], r["op"]) for r in rejected] == [("w", bad)]
    assert "bad" in rejected[0]["error"]
    assert delivered_all(journal, delivery)


def test_a_refused_op_alone_in_its_batch_is_set_aside(tmp_path):
    ops = [RUN, log(params=[["lr", "1"]]), log(metrics=metrics("a", 1)), log(params=[["lr", "2"]]),
           {"op": "status", "key": KEY, "status": "RUNNING", "time": 3}, log(metrics=metrics("b", 1))]
    journal, delivery, client = setup(tmp_path, ops)
    assert delivery.deliver(journal) == len(ops)
    run = client.runs[only_run(client)]
    assert run.data.params == {"lr": "1"}  # MLflow keeps a param's first value and refuses another
    assert sent(client, run.info.run_id) == expected(ops)
    assert delivery.rejected == 1
    assert [json.loads(line)["op"] for line in (tmp_path / "rejected.log").read_text().splitlines()] == [ops[3]]


def test_an_outage_while_going_one_by_one_keeps_the_rest_and_sets_nothing_aside_twice(tmp_path):
    ops = [RUN, log(metrics=metrics("a", 2)), log(metrics=[["bad", 1.0, 1, 1]]), log(metrics=metrics("c", 2))]
    journal, delivery, client = setup(tmp_path, ops)
    client.refuse_keys = {"bad"}
    # the batch (refused), a (sent), bad (refused), c: the server goes away
    client.fail_next("log_batch", None, None, None, ConnectionError("refused"))
    with pytest.raises(Unreachable):
        delivery.deliver(journal)
    assert [op for _, op in journal.read()] == [ops[3]], "a was sent and bad set aside: both acknowledged"
    assert delivery.deliver(journal) == 1
    assert sent(client, only_run(client)) == expected([ops[1], ops[3]])
    assert delivery.rejected == 1 and len((tmp_path / "rejected.log").read_text().splitlines()) == 1
    assert delivered_all(journal, delivery)


TRANSIENT = [
    pytest.param(lambda: ConnectionError("connection refused"), id="refused"),
    pytest.param(lambda: MlflowException("busy", TEMPORARILY_UNAVAILABLE), id="503"),
    pytest.param(lambda: MlflowException("slow down", REQUEST_LIMIT_EXCEEDED), id="429"),
]


@pytest.mark.parametrize("error", TRANSIENT)
def test_a_transient_error_keeps_everything_for_the_next_attempt(tmp_path, error):
    ops = [RUN, log(metrics=metrics("a", 400)), log(metrics=metrics("b", 400)), log(metrics=metrics("c", 400)),
           {"op": "status", "key": KEY, "status": "FINISHED", "time": 9}]
    journal, delivery, client = setup(tmp_path, ops)
    client.fail_next("log_batch", None, error())  # a+b go, then c meets the outage
    with pytest.raises(Unreachable):
        delivery.deliver(journal)
    assert [op for _, op in journal.read()] == ops[3:], "the cursor stops at the first op not delivered"
    assert delivery.rejected == 0 and not (tmp_path / "rejected.log").exists()
    assert client.runs[only_run(client)].info.status == "RUNNING"

    assert delivery.deliver(journal) == 2
    run_id = only_run(client)
    assert sent(client, run_id) == expected(ops)
    assert client.runs[run_id].info.status == "FINISHED"
    assert delivery.rejected == 0
    assert delivered_all(journal, delivery)


@pytest.mark.parametrize("error", TRANSIENT)
def test_a_transient_error_creating_the_run_keeps_it_for_the_next_attempt(tmp_path, error):
    journal, delivery, client = setup(tmp_path, [RUN, log(metrics=metrics("a", 1))])
    client.fail_next("create_run", error())
    with pytest.raises(Unreachable):
        delivery.deliver(journal)
    assert journal.cursor() == 0 and not client.runs
    assert delivery.deliver(journal) == 2
    assert sent(client, only_run(client)) == expected([log(metrics=metrics("a", 1))])


def test_a_run_whose_creation_answer_was_lost_is_found_by_its_key(tmp_path):
    seen = []
    journal, delivery, client = setup(tmp_path, [RUN, log(metrics=metrics("a", 2))],
                                      on_run=lambda key, run_id: seen.append((key, run_id)))
    client.lose_answer = {"create_run"}  # created, but the answer never came
    with pytest.raises(Unreachable):
        delivery.deliver(journal)
    assert journal.cursor() == 0
    assert delivery.deliver(journal) == 2
    run_id = only_run(client)
    assert client.runs[run_id].data.tags["ldot.run_key"] == KEY
    assert client.runs[run_id].data.tags["who"] == "test"
    assert sent(client, run_id) == expected([log(metrics=metrics("a", 2))])
    assert seen == [(KEY, run_id)]


def test_a_journal_delivered_again_by_a_fresh_sender_creates_no_second_run(tmp_path):
    journal, delivery, client = setup(tmp_path, [RUN, log(metrics=metrics("a", 2))])
    delivery.deliver(journal)
    journal.ack(0)  # as if every answer had been lost
    again = Delivery("fake://store", "unit", client=client)
    assert again.deliver(journal) == 2
    assert again.run_ids == delivery.run_ids
    only_run(client)


def test_of_runs_holding_one_key_every_writer_takes_the_earliest(tmp_path):
    """Two runs with one key (created by two senders at once): all records go to the earliest by
    (start time, run id), whichever order the store lists them in."""
    client = FakeClient()
    exp = client.create_experiment("unit")
    late = client.create_run(exp, start_time=5, tags={"ldot.run_key": KEY}).info.run_id
    early = client.create_run(exp, start_time=3, tags={"ldot.run_key": KEY}).info.run_id
    tie = client.create_run(exp, start_time=3, tags={"ldot.run_key": KEY}).info.run_id
    assert early < tie  # the tie goes to the smaller id
    journal, delivery, client = setup(tmp_path, [RUN, log(metrics=metrics("a", 1))], client=client)
    assert delivery.deliver(journal) == 2
    assert delivery.run_ids[KEY] == early and len(client.runs) == 3
    assert sent(client, early) == expected([log(metrics=metrics("a", 1))])
    assert not client.runs[late].data.metrics and not client.runs[tie].data.metrics


def test_records_of_a_run_another_writer_has_not_created_yet_wait(tmp_path):
    """Rank 1 attaching to a run rank 0 has not created yet: its records wait, none is set aside."""
    client = FakeClient()
    ops = [log(metrics=metrics("sys", 2))]
    journal, delivery, _ = setup(tmp_path, ops, client=client)
    with pytest.raises(Unreachable):
        delivery.deliver(journal)
    assert journal.cursor() == 0 and delivery.rejected == 0
    first, creator, _ = setup(tmp_path / "rank0", [RUN], client=client)
    creator.deliver(first)
    assert delivery.deliver(journal) == 1
    assert sent(client, only_run(client)) == expected(ops)
