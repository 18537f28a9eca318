"""A real single-node Slurm cluster (slurm/local/start.sh) for the tests of slurm/, started once per session.

The fixture installs Debian's slurm-wlm and munge when they are missing (apt, as root), starts munged,
slurmctld and slurmd with a slurm.conf generated from this machine, and stops them afterwards. It skips,
saying why, where that cannot be done: not root, no apt-get, installation or start-up refused.

Each session's cluster is its own: a block of ports (PORT_BLOCK of them, below the kernel's ephemeral
range) taken under a lock file that the session holds, and a state directory named after it. The block
holds the controller's and slurmd's ports and every MASTER_PORT that slurm/launch.sh derives for the
session's jobs (LDOT_MASTER_PORT_BASE/SPAN), so two test runs on one machine share neither a daemon,
a port nor a job's rendezvous, even where their job ids are equal. Job ids count on from the last
session that held the same block (start.sh keeps the saved state), and every test writes its runs
under its own tmp_path, so no two sessions' output directories meet either.

`slurm_two_nodes` is a second cluster of the session, with a block of its own: two nodes, each a network
and UTS namespace of its own on a bridge (LDOT_SLURM_NODES=2, slurm/local/netns.sh), one CPU each. Its
finalizer runs stop.sh, which removes the namespaces, links, bridge and hosts files whatever the tests did;
so does a start that fails halfway.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "slurm" / "local"
# reachable by the munge user (a session's own munged keeps its socket in the state directory)
STATES = Path(os.environ.get("LDOT_SLURM_TEST_DIR", "/var/tmp/ldot-slurm-test"))
PORT_BLOCK = 200
PORT_BLOCKS = range(20000, 32000, PORT_BLOCK)  # below the ephemeral range (32768-60999 by default)
CANNOT = 77  # start.sh: "cannot run here"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Node:
    name: str    # its hostname and Slurm node name
    addr: str    # its address on the bridge
    netns: str   # its network namespace (ip netns)
    veth: str    # this machine's end of its link: counters, and `ip link set ... down` cuts the node off


@dataclass
class SlurmCluster:
    conf: Path
    port_base: int  # the session's port block: controller, slurmd, then its jobs' MASTER_PORTs
    nodes: tuple[Node, ...] = ()  # several-node clusters: each node's namespace and link

    @property
    def job_env(self) -> dict[str, str]:
        """MASTER_PORT = base + job id % span (slurm/launch.sh) inside this session's block."""
        return {"LDOT_MASTER_PORT_BASE": str(self.port_base + 2), "LDOT_MASTER_PORT_SPAN": str(PORT_BLOCK - 2)}

    def master_port(self, job: str | int) -> int:
        return self.port_base + 2 + int(job) % (PORT_BLOCK - 2)

    def env(self, output_root: Path, **extra: str) -> dict[str, str]:
        """The environment of a submission: this cluster, this checkout, this Python, no site.env."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                          "MASTER_PORT", "MLFLOW_TRACKING_URI")}
        env.update(SLURM_CONF=str(self.conf), LDOT_ROOT=str(ROOT), LDOT_SITE_ENV="/dev/null",
                   LDOT_PYTHON=sys.executable, LDOT_OUTPUT_ROOT=str(output_root), OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **self.job_env)
        env.update(extra)
        return env

    def run(self, *cmd: str, env: dict | None = None, timeout: float = 60, check: bool = True):
        proc = subprocess.run(list(cmd), cwd=ROOT, env=env or {**os.environ, "SLURM_CONF": str(self.conf)},
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def sbatch(self, *args: str, env: dict, wait: bool = False, timeout: float = 300) -> tuple[str, int]:
        """Submits; returns (job id, sbatch's exit code: the job's under --wait)."""
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            # a job left running would hold the cluster's CPUs through every later test
            started = (err.stdout or b"").decode().strip().split(";")[0]
            if started:
                subprocess.run(["scancel", started], env=env, capture_output=True, timeout=60)
            raise AssertionError(f"job {started or '?'} did not end within {timeout} s; cancelled it") from err
        job = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else ""
        assert job, f"sbatch gave no job id: exit {proc.returncode}\n{proc.stderr}"
        return job, proc.returncode

    def sbatch_via_submit(self, *args: str, env: dict) -> tuple[str, int]:
        """slurm/submit (site settings from LDOT_SITE_ENV) instead of plain sbatch; returns (job id, exit code)."""
        proc = subprocess.run([str(ROOT / "slurm" / "submit"), "--parsable", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        job = proc.stdout.strip().split(";")[0]
        assert proc.returncode == 0 and job, f"slurm/submit: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return job, proc.returncode

    def jobs(self, job: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as dicts: one per job, or one per task of an array."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        recs = []
        for line in out.splitlines():
            rec = {}
            for field in line.split():
                key, sep, value = field.partition("=")
                if sep and key not in rec:
                    rec[key] = value
            if rec:
                recs.append(rec)
        return recs

    def wait(self, job: str, timeout: float = 300) -> list[dict[str, str]]:
        """Polls until every job (or array task) of `job` has ended; requeues count as still running."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.jobs(job)
            if recs and all(r.get("JobState") in TERMINAL for r in recs):
                return recs
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} not finished after {timeout} s: {recs}")
            time.sleep(1)


def _logs(output_root: Path) -> str:
    """Every log under the job's output root, for failure messages."""
    parts = []
    for path in sorted((output_root / "logs").rglob("*.log")) + sorted(output_root.glob("*.out")):
        text = path.read_text(errors="replace")
        parts.append(f"--- {path}\n{text[-4000:]}")
    return "\n".join(parts)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _take_port_block():
    """(base port, open lock file): the first block no other session holds whose daemon ports are free."""
    STATES.mkdir(parents=True, exist_ok=True)
    STATES.chmod(0o755)
    for base in PORT_BLOCKS:
        lock = open(STATES / f"{base}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        if _bindable(base) and _bindable(base + 1):
            return base, lock
        lock.close()
    pytest.skip(f"no free block of {PORT_BLOCK} ports in {PORT_BLOCKS.start}-{PORT_BLOCKS.stop} for a Slurm cluster")


def _nodes(state: Path, port: int) -> tuple[Node, ...]:
    """The nodes slurm/local/netns.sh made (its nodes.env and the addresses in the generated slurm.conf)."""
    lines = [dict(f.split("=", 1) for f in line.split()) for line in
             (state / "etc" / "slurm.conf").read_text().splitlines() if line.startswith("NodeName=")]
    return tuple(Node(name=n["NodeName"], addr=n["NodeAddr"], netns=f"ldot{port}n{i}", veth=f"ldv{port}n{i}")
                 for i, n in enumerate(lines, start=1))


@contextlib.contextmanager
def local_cluster(nodes: int = 1):
    """A cluster of its own (port block, state directory, munged), stopped on leaving; `nodes` > 1: that
    many nodes in namespaces of their own (slurm/local/netns.sh)."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root: they install slurm-wlm/munge with apt and run slurmd as root")
    if not (shutil.which("slurmctld") and shutil.which("munged")) and not shutil.which("apt-get"):
        pytest.skip("slurm-wlm/munge are not installed and there is no apt-get to install them")
    base, lock = _take_port_block()
    state = STATES / str(base)
    # the daemons serve the whole session: not marked as a test's leftovers (tests/conftest.py); the
    # jobs they run carry the submitting test's environment, mark included
    daemon_env = {k: v for k, v in os.environ.items() if k != "LDOT_TEST_SESSION"}
    daemon_env.update(LDOT_SLURM_LOCAL_DIR=str(state), LDOT_SLURM_CTLD_PORT=str(base),
                      LDOT_SLURM_SLURMD_PORT=str(base + 1), LDOT_SLURM_NODES=str(nodes))
    try:
        proc = subprocess.run([str(LOCAL / "start.sh")], capture_output=True, text=True, timeout=900, env=daemon_env)
        if proc.returncode == CANNOT:
            pytest.skip(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "slurm/local/start.sh: cannot start")
        assert proc.returncode == 0, f"slurm/local/start.sh failed:\n{proc.stdout}\n{proc.stderr}"
        yield SlurmCluster(conf=state / "etc" / "slurm.conf", port_base=base,
                           nodes=_nodes(state, base) if nodes > 1 else ())
    finally:
        subprocess.run([str(LOCAL / "stop.sh")], capture_output=True, text=True, timeout=300, env=daemon_env)
        lock.close()


@pytest.fixture(scope="session")
def slurm_cluster():
    with local_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_two_nodes():
    """Two nodes, each in its own network and UTS namespace with one CPU, one controller and munged."""
    with local_cluster(nodes=2) as cluster:
        yield cluster


@pytest.fixture
def start_local_cluster(slurm_cluster):
    """`with start_local_cluster() as c:` a second cluster beside the session's, as a second test session
    on this machine would start one."""
    return local_cluster


@pytest.fixture(scope="session")
def demo_overrides(tiny_shards, tiny_text_encoder):
    """Config overrides for train/configs/demo.yaml: tiny shards, a 2-layer 32-wide text encoder, batch 4."""
    return [f"data.train={tiny_shards / 'train'}", f"model.text_encoder={tiny_text_encoder}", "data.batch_size=4",
            "data.max_text_len=16"]


@pytest.fixture
def job_logs():
    """job_logs(output_root) -> the text of every log of the jobs written under output_root."""
    return _logs
