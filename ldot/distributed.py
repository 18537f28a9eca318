"""Process-group setup: rank, world size and device from torchrun, srun or a plain single process; and
host-side agreement between ranks (a preemption flag, batch sizes) that never waits on a device."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    # gloo over all ranks for host-side values (None: the default group, itself gloo on CPU). A small
    # collective on CPU tensors lets ranks agree without reading anything back from a GPU, so the
    # host can stay ahead of the device's queue.
    control_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (a host-side collective; all ranks call it)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int64)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.control_group)
        return bool(value[0])

    def all_gather_int(self, n: int) -> list[int]:
        """Every rank's `n`, in rank order (a host-side collective; all ranks call it)."""
        if self.world_size == 1:
            return [n]
        mine = torch.tensor([n], dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, mine, group=self.control_group)
        return [int(p[0]) for p in parts]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_not_bare_srun() -> None:
    """Slurm's layout becomes torch's in one place, slurm/launch.sh (see there why): an srun task
    started without it has no RANK, and would train alone as a world of one beside its siblings."""
    ntasks = os.environ.get("SLURM_NTASKS", "1")
    if "RANK" not in os.environ and "SLURM_STEP_ID" in os.environ and ntasks.isdigit() and int(ntasks) > 1:
        from ldot.errors import LdotError

        raise LdotError(f"srun started {ntasks} tasks but RANK is not set: launch them through slurm/launch.sh "
                        "(srun slurm/launch.sh ldot train ...) or torchrun")


def _skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory op at init_distributed.

    The op serves only inference_all_reduce, which training never calls. Building it runs g++ in every
    rank behind a lock file in ~/.cache/torch_extensions; a rank killed mid-build (a timeout, scancel,
    a preemption) leaves the lock behind and every later run on the machine waits on it forever.
    DeepSpeed caches its op-compatibility table in one dict and documents that edits to it persist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> DistInfo:
    import deepspeed

    _check_not_bare_srun()
    if "RANK" not in os.environ:  # a plain `ldot train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    world = torch.distributed.get_world_size()
    control = torch.distributed.new_group(backend="gloo") if backend != "gloo" and world > 1 else None
    return DistInfo(rank=torch.distributed.get_rank(), world_size=world, local_rank=local_rank, device=device,
                    backend=backend, control_group=control)
