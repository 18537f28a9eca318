"""train/progress.py: plain progress lines off a terminal (first step, every N seconds, last step), a bar on one."""
import logging

import pytest

from train.progress import Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _run(progress, clock, steps, start=0, dt=2.0, samples=32):
    for step in range(start + 1, start + steps + 1):
        clock.t += dt
        progress.update(step, "cmr", 1.0 / step, 1e-4, samples)
    progress.close()


def test_lines_at_first_step_every_interval_and_last(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="ldot.train"):
        _run(Progress(100, 0, enabled=True, every_s=30.0, tty=False, clock=clock), clock, 100)
    lines = [r.getMessage() for r in caplog.records]
    steps = [int(m.split()[1].split("/")[0]) for m in lines]
    # 2 s a step: step 1, then every 15 steps (30 s), then the last
    assert steps == [1, 16, 31, 46, 61, 76, 91, 100]
    assert lines[1] == "step 16/100 (16.0%) cmr loss 0.0625 lr 1.00e-04 16.0 samples/s 2.00 s/step eta 2m48s"
    assert lines[-1].endswith("eta 0m00s") and "(100.0%)" in lines[-1]


def test_a_resumed_run_counts_from_its_start_step(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="ldot.train"):
        _run(Progress(5000, 4000, enabled=True, every_s=1e9, tty=False, clock=clock), clock, 2, start=4000, dt=3.6)
    first = caplog.records[0].getMessage()
    assert first.startswith("step 4001/5000 (80.0%)") and first.endswith("eta 59m56s")


@pytest.mark.parametrize("enabled,tty", [(False, False), (False, True), (True, True)])
def test_no_lines_when_disabled_or_on_a_terminal(caplog, enabled, tty):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="ldot.train"):
        p = Progress(10, 0, enabled=enabled, tty=tty, clock=clock)
        _run(p, clock, 10)
    assert not caplog.records
    assert (p.bar is not None) == (enabled and tty)
