"""Training progress for a person watching: a tqdm bar on a terminal, plain log lines in a batch job.

Under sbatch stderr is a file: a bar there becomes one ever-growing line of carriage returns that
neither ``tail -f`` nor ``grep`` reads well. Off a terminal, one line goes to the log at the first
step, then at most every ``every_s`` seconds and at the last step: step, percent, the step's task and
loss, lr, samples/s over the interval, and the time left at that rate.
"""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("ldot.train")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, initial: int, *, enabled: bool, every_s: float = 30.0, tty: bool | None = None,
                 clock=time.monotonic):
        self.total, self.enabled, self.every_s, self.clock = total, enabled, every_s, clock
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = tqdm(total=total, initial=initial, desc="train", mininterval=2.0) if enabled and self.tty else None
        self.last_step, self.last_t, self.samples = initial, clock(), 0.0
        self.first = True

    def update(self, step: int, task: str, loss: float, lr: float, samples: float) -> None:
        """After optimizer step ``step`` (1-based), which trained on ``samples`` pairs over all ranks."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self.bar.update()
            return
        self.samples += samples
        now = self.clock()
        if not (self.first or step == self.total or now - self.last_t >= self.every_s):
            return
        dt, steps = max(now - self.last_t, 1e-9), step - self.last_step
        eta = (self.total - step) * dt / steps if steps else float("nan")
        log.info("step %d/%d (%.1f%%) %s loss %.4f lr %.2e %.1f samples/s %.2f s/step eta %s", step, self.total,
                 100.0 * step / self.total, task, loss, lr, self.samples / dt, dt / max(steps, 1),
                 _duration(eta) if eta == eta else "?")
        self.first, self.last_step, self.last_t, self.samples = False, step, now, 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
