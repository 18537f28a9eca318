"""Preemption: SIGUSR1 (Slurm's --signal) or SIGTERM asks for a checkpoint at the next step boundary.

The trainer then exits with EXIT_REQUEUE (ldot.errors), the code the Slurm scripts requeue on. A
signal may reach only some ranks, so they agree every step through a host-side collective on CPU
tensors (ldot.distributed.DistInfo.any): no rank waits on its GPU to learn the answer.
"""
from __future__ import annotations

import logging
import signal

from ldot.distributed import DistInfo

log = logging.getLogger("ldot.preemption")


class PreemptionWatch:
    def __init__(self, dist: DistInfo, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.dist = dist
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        if not self.requested:
            log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def any_rank_requested(self) -> bool:
        return self.dist.any(self.requested)
