"""ldot/distributed.py: the process group timeout (LDOT_DIST_TIMEOUT_S) and the one line for a lost peer.

The timeout at work, on real processes across two nodes, is tests/slurm/test_two_nodes.py's cut link."""
import datetime
import os
import subprocess
import sys

import pytest

from ldot.distributed import DEFAULT_TIMEOUT_S, collective_failure, timeout_s
from ldot.errors import LdotError


def test_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("LDOT_DIST_TIMEOUT_S", raising=False)
    assert timeout_s() == DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv("LDOT_DIST_TIMEOUT_S", "45.5")
    assert timeout_s() == 45.5
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv("LDOT_DIST_TIMEOUT_S", bad)
        with pytest.raises(LdotError, match=f"LDOT_DIST_TIMEOUT_S='{bad}': give the process group timeout"):
            timeout_s()


def test_a_lost_peer_is_one_line_and_anything_else_is_not(monkeypatch):
    monkeypatch.setenv("LDOT_DIST_TIMEOUT_S", "20")
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                        "waiting 20000ms for recv operation to complete")
    assert collective_failure(gloo) == (
        "lost contact with another rank in a collective (Timed out waiting 20000ms for recv operation to "
        "complete): a node or rank died or hangs; the process group timeout is LDOT_DIST_TIMEOUT_S=20 s")
    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [10.0.0.3]:4242: Connection reset by peer. "
                         "This is typically caused by a remote worker hanging")
    assert "Read error [10.0.0.3]:4242: Connection reset by peer" in collective_failure(reset)
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "node02")
    monkeypatch.setenv("MASTER_PORT", "14321")
    store = dist.DistNetworkError("The client socket has timed out after 20000ms while trying to connect to "
                                  "(node02, 14321).")
    assert collective_failure(store).startswith(
        "could not reach the rendezvous node02:14321 (The client socket has timed out after 20000ms while trying "
        "to connect to (node02, 14321).): every node must resolve MASTER_ADDR")
    assert collective_failure(RuntimeError("CUDA out of memory")) is None
    assert collective_failure(ValueError("Timed out waiting")) is None


@pytest.mark.timeout(120)
def test_the_timeout_reaches_every_process_group(tmp_path):
    """A world of one: the default group and a group made later without a timeout of its own (as DeepSpeed
    makes its data-parallel group, where ZeRO reduces) both carry LDOT_DIST_TIMEOUT_S."""
    code = ("import torch, torch.distributed as d; from ldot.distributed import init_distributed; i = init_distributed(); "
            "from torch.distributed.distributed_c10d import _get_default_group as g; cpu = torch.device('cpu'); "
            "print(i.timeout_s, g()._get_backend(cpu).options._timeout, d.new_group()._get_backend(cpu).options._timeout)")
    env = {**os.environ, "LDOT_DIST_TIMEOUT_S": "37"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds, default, later = proc.stdout.strip().splitlines()[-1].split(" ")
    assert float(seconds) == 37 and default == later == str(datetime.timedelta(seconds=37)), proc.stdout
