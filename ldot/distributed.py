"""Process-group setup: rank, world size and device from torchrun, srun or a plain single process; and
host-side agreement between ranks (a preemption flag, batch sizes) that never waits on a device.

The process group's timeout bounds how long a rank waits in a collective for the others:
LDOT_DIST_TIMEOUT_S seconds (default 600, DeepSpeed's own default). A node that dies or hangs then ends
the job after that long with one line naming the cause (collective_failure) instead of holding its
allocation until the job's time limit. It must exceed the longest stretch one rank works while the
others wait at a collective (a checkpoint save, rank 0's export at the end).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
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
    timeout_s: float = 0.0  # the process group's timeout (LDOT_DIST_TIMEOUT_S)
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


log = logging.getLogger("ldot.distributed")

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "LDOT_DIST_TIMEOUT_S"
# What a collective raises when a peer is gone (gloo: a reset or closed connection) or silent (gloo: a
# timed-out receive; NCCL: its watchdog's timeout).
_LOST_PEER = re.compile(r"Timed out waiting|timed out|Connection (reset|closed) by peer|Connection refused|"
                        r"Broken pipe|NCCL communicator was aborted|Watchdog caught collective operation timeout",
                        re.IGNORECASE)
# ... and what it raises when rank 0's store (MASTER_ADDR:MASTER_PORT) cannot be reached at the start.
_RENDEZVOUS = re.compile(r"trying to connect to|failed to connect/validate|TCPStore", re.IGNORECASE)


def timeout_s() -> float:
    """The process group timeout in seconds: LDOT_DIST_TIMEOUT_S, else 600."""
    from ldot.errors import LdotError

    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LdotError(f"{TIMEOUT_ENV}={value!r}: give the process group timeout in seconds (> 0)")
    return seconds


def collective_failure(exc: BaseException) -> str | None:
    """One line for an exception that means another rank is gone or hung (None for any other exception)."""
    import torch.distributed as dist

    text = str(exc)
    if not (isinstance(exc, getattr(dist, "DistError", ())) or (isinstance(exc, RuntimeError) and _LOST_PEER.search(text))):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", first)  # gloo's source location
    if _RENDEZVOUS.search(text):
        host, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        return (f"could not reach the rendezvous {host}:{port} ({first[:200]}): every node must resolve MASTER_ADDR "
                f"to an address of rank 0's node that it can reach (LDOT_MASTER_ADDR, GLOO_SOCKET_IFNAME, "
                f"NCCL_SOCKET_IFNAME); the process group timeout is {TIMEOUT_ENV}={timeout_s():g} s")
    return (f"lost contact with another rank in a collective ({first[:200]}): a node or rank died or hangs; "
            f"the process group timeout is {TIMEOUT_ENV}={timeout_s():g} s")


def _describe(world: int, rank: int, backend: str, seconds: float) -> str:
    """Where this rank meets the others: the rendezvous host as given and as resolved, the interfaces."""
    host, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    try:
        resolved = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except OSError as exc:
        resolved = f"unresolved: {exc}"
    ifaces = " ".join(f"{k}={os.environ[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if os.environ.get(k))
    return (f"rank {rank}/{world} on {socket.gethostname()}: {backend}, rendezvous {host} ({resolved}):{port}, "
            f"timeout {seconds:g} s{', ' + ifaces if ifaces else ''}")


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


def _every_group_times_out(timeout: datetime.timedelta) -> None:
    """The timeout for every process group, not the default one alone. torch gives a group made without a
    timeout its module default (30 minutes), not the default group's, and DeepSpeed makes its data-parallel
    group that way (a clone of the world group: ZeRO's gradient norm and reductions run on it), so a
    lost node would hang a step for half an hour. torch reads that default from these two module names."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


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
    seconds = timeout_s()
    timeout = datetime.timedelta(seconds=seconds)
    _every_group_times_out(timeout)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    control = torch.distributed.new_group(backend="gloo", timeout=timeout) if backend != "gloo" and world > 1 else None
    if world > 1:
        log.info("process group: %s", _describe(world, rank, backend, seconds))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                    timeout_s=seconds, control_group=control)


def close_distributed() -> None:
    """Tear the process group down while the interpreter is still whole: left to finalization, gloo's
    worker threads can be destroyed while joinable and the process aborts ("terminate called without an
    active exception", exit 134) after its work is done — seen 3 times in 30 on 2 ranks here, never with
    this call (pytorch/pytorch#190489). Local to this rank: no collective, so ranks may leave at
    different times. Not for the lost-peer path, where teardown itself aborts or waits (see train's main)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
