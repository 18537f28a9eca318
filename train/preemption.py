"""Preemption: SIGUSR1 (Slurm's --signal) or SIGTERM asks for a checkpoint at the next step boundary.

The trainer then exits with EXIT_REQUEUE, the code the Slurm scripts requeue on. Ranks agree through
an all-reduce, since a signal may reach only some of them.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from ldot.errors import EXIT_REQUEUE  # noqa: F401  (the trainer's exit code after a preemption checkpoint)

log = logging.getLogger("ldot.preemption")


class PreemptionWatch:
    def __init__(self, device: torch.device, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.device = device
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        if not self.requested:
            log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def any_rank_requested(self) -> bool:
        flag = torch.tensor([1 if self.requested else 0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
