"""Tracker.replay (issue 12, bug 5): the records a checkpoint holds reach the run on resume, every
key at every step exactly once. Through the real Tracker, journal and sender; the stand-in client
(fake_client.py) keeps every metric row it receives, so a row sent twice shows, which a SQL store,
dropping exact duplicates, would hide."""
import functools
from collections import Counter

import pytest

from fake_client import FakeClient
from ldot.tracking import Tracker, tracker as tracker_module
from ldot.tracking.outbox import Delivery

pytestmark = pytest.mark.timeout(60)  # a sender that never finishes fails in a minute, not 15


def test_replay_sends_every_key_at_every_step_exactly_once(tmp_path, monkeypatch):
    client = FakeClient()
    # the Tracker makes its own Delivery: this one sends through the stand-in
    monkeypatch.setattr(tracker_module, "Delivery", functools.partial(Delivery, client=client))
    first = Tracker("fake://store", "replay", autoflush=False, outbox=tmp_path, writer="rank0")
    run_id = first.start("resumed")
    assert run_id is not None
    steps = range(1, 5)
    for step in steps:
        first.log_metrics({"loss": 1.0 / step, "lr": 0.1 * step, "grad_norm": 2.0 + step}, step)
    rows = first.pending()  # what a checkpoint after step 4 stores
    assert len(rows) == 12
    first.finish("FAILED")  # the job dies: records held since the checkpoint are not sent
    assert client.runs[run_id].data.metrics == []

    resumed = Tracker.attach(first.info(), autoflush=False, outbox=tmp_path, writer="rank0")
    resumed.replay(rows)
    assert resumed.finish()

    got = client.runs[run_id].data.metrics
    assert Counter((k, s) for k, _, _, s in got) == {(k, s): 1 for k in ("loss", "lr", "grad_norm") for s in steps}
    assert sorted((k, s, v) for k, v, _, s in got) == sorted((k, s, v) for k, v, _, s in rows)
    assert len(client.runs) == 1
