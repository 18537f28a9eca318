"""Two nodes on one machine (slurm/local/start.sh with LDOT_SLURM_NODES=2): each node a network and UTS
namespace of its own with one CPU, the ranks on different "hosts" that meet over the bridge, never over
loopback. What exists only across nodes: the rendezvous on the first node's address, the second node's
ranks, gloo over a real interface (GLOO_SOCKET_IFNAME=ldot0, the nodes' interface), a preemption signal
that reaches the batch step on node 1 only, a node that drops off the network mid-training.

One task per node: the nodes have one CPU each, so 2 nodes x 2 tasks does not fit on this 2-core machine.
"""
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

DIST_TIMEOUT_S = 20  # LDOT_DIST_TIMEOUT_S for these jobs: how long a rank waits for a silent peer
STEP_WAIT_S = 10     # LDOT_STEP_WAIT_S: srun's grace for the other tasks once one has ended
PROCESS_GROUP = re.compile(r"process group: rank (\d)/2 on (\S+): gloo, rendezvous (\S+) \(([\d.]+)\):(\d+), "
                           r"timeout (\S+) s, GLOO_SOCKET_IFNAME=(\S+)")


def two_node_env(cluster, root: Path, **extra):
    return cluster.env(root, GLOO_SOCKET_IFNAME="ldot0", LDOT_DIST_TIMEOUT_S=str(DIST_TIMEOUT_S),
                       LDOT_STEP_WAIT_S=str(STEP_WAIT_S), **extra)


def link_bytes(veth: str) -> int:
    stats = Path("/sys/class/net") / veth / "statistics"
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def metric(root: Path, experiment: str, key: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run, client.get_metric_history(run.info.run_id, key)


def wait_for(predicate, timeout: float, what: str, logs):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{logs()}"
        time.sleep(0.3)


def test_jobs_see_two_hosts_and_reach_them_by_name(slurm_two_nodes, tmp_path):
    """SLURM_JOB_NODELIST names both nodes; every task resolves both names to the nodes' own addresses."""
    n1, n2 = slurm_two_nodes.nodes
    script = ('srun bash -c \'echo "$SLURM_PROCID $(hostname) $SLURM_JOB_NODELIST '
              f'$(getent hosts {n1.name} | cut -d" " -f1) $(getent hosts {n2.name} | cut -d" " -f1) '
              '$(ip -4 -o addr show ldot0 | awk "{print \\$4}")"\'')
    job, _ = slurm_two_nodes.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/out", "--wrap", script,
                                    env=slurm_two_nodes.env(tmp_path))
    (rec,) = slurm_two_nodes.wait(job, timeout=120)  # polls every second (sbatch --wait backs off to 30 s)
    out = (tmp_path / "out").read_text()
    assert rec["JobState"] == "COMPLETED", out
    lines = sorted(line.split() for line in out.splitlines() if line[:1].isdigit())
    prefix = n1.name[:-1]
    assert lines == [["0", n1.name, f"{prefix}[1-2]", n1.addr, n2.addr, f"{n1.addr}/24"],
                     ["1", n2.name, f"{prefix}[1-2]", n1.addr, n2.addr, f"{n2.addr}/24"]], out


def test_two_nodes_train_like_one_node(slurm_two_nodes, slurm_cluster, tmp_path, demo_overrides, job_logs):
    """finetune.sbatch --nodes=2 --ntasks-per-node=1: rank 1 on the second node, the rendezvous on the first
    node's address (resolved to its namespace address, not loopback), the gradients' all-reduce through
    the second node's link; the losses and grad norms are those of the same job on one node with 2 tasks."""
    n1, n2 = slurm_two_nodes.nodes
    steps = 6
    args = ["slurm/finetune.sbatch", "train/configs/demo.yaml", *demo_overrides, f"optim.max_steps={steps}",
            "tracking.experiment=two-nodes"]
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    before = link_bytes(n2.veth)
    job, _ = slurm_two_nodes.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={two}/%x-%j.out", *args,
                                    env=two_node_env(slurm_two_nodes, two))
    (rec,) = slurm_two_nodes.wait(job)
    crossed = link_bytes(n2.veth) - before
    assert rec["JobState"] == "COMPLETED" and rec["NumNodes"] == "2" and rec["NumTasks"] == "2", job_logs(two)

    logs = tmp_path / "two" / "logs" / f"ldot-finetune-{job}"
    port = slurm_two_nodes.master_port(job)
    seen = {}
    for task, node in ((0, n1), (1, n2)):
        text = (logs / f"train.{task}.log").read_text()
        assert f"launch: rank {task}/2 local 0 on {node.name}, master {n1.name}:{port}" in text, text[-3000:]
        (match,) = PROCESS_GROUP.findall(text)
        seen[task] = match
        # the rendezvous: node 1 by name, resolved on either node to node 1's namespace address
        assert match == (str(task), node.name, n1.name, n1.addr, str(port), f"{DIST_TIMEOUT_S:g}", "ldot0"), match
    # the all-reduces went through node 2's link: at least the gradients' bytes of every step (ZeRO-2 with 2
    # ranks: each rank sends and receives about all of them once a step)
    from ldot.model import load_dual_encoder

    _, model, _ = load_dual_encoder(two / f"ldot-finetune-{job}" / "checkpoints" / "final")
    grad_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert crossed >= steps * grad_bytes, (crossed, steps * grad_bytes)

    job1, _ = slurm_cluster.sbatch("--ntasks-per-node=2", f"--output={one}/%x-%j.out", *args, env=slurm_cluster.env(one))
    (rec1,) = slurm_cluster.wait(job1)
    assert rec1["JobState"] == "COMPLETED", job_logs(one)
    for key in ("loss/cmr", "grad_norm"):
        run2, got = metric(two, "two-nodes", key)
        run1, want = metric(one, "two-nodes", key)
        assert [m.step for m in got] == [m.step for m in want] == list(range(1, steps + 1))
        assert [m.value for m in got] == pytest.approx([m.value for m in want], rel=1e-6), key
    assert run2.data.params["world_size"] == "2" and run2.info.status == "FINISHED"


def test_preemption_reaches_node_1_and_both_nodes_checkpoint_the_same_step(slurm_two_nodes, tmp_path, demo_overrides,
                                                                           job_logs):
    """SIGUSR1 to the batch step only (it runs on node 1; srun passes it on): both ranks checkpoint at the
    same step, the job requeues on the two nodes and resumes into the same MLflow run, every step once."""
    steps = 60
    job, _ = slurm_two_nodes.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out",
                                    "slurm/finetune.sbatch", "train/configs/demo.yaml", *demo_overrides,
                                    f"optim.max_steps={steps}", "checkpoint.every_steps=10", "checkpoint.keep_last=10",
                                    "tracking.experiment=two-nodes-preempt", env=two_node_env(slurm_two_nodes, tmp_path))
    run_dir, logs = tmp_path / f"ldot-finetune-{job}", tmp_path / "logs" / f"ldot-finetune-{job}"
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000010" / "COMPLETE").exists(), 300, "first checkpoint",
             lambda: job_logs(tmp_path))
    slurm_two_nodes.run("scancel", "--signal=USR1", "--batch", job)
    (rec,) = slurm_two_nodes.wait(job, timeout=400)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", job_logs(tmp_path)

    job_log = (logs / "job.log").read_text()
    n1, n2 = slurm_two_nodes.nodes
    assert f"job {job} (ldot-finetune-{job}) on {n1.name[:-1]}[1-2]: 2 task(s)" in job_log, job_log
    assert "SIGUSR1: asking the tasks to checkpoint" in job_log and "requeueing (restart 1" in job_log, job_log
    at = set()
    for task in (0, 1):
        text = (logs / f"train.{task}.log").read_text()
        at |= set(re.findall(r"preempted: checkpoint \S+ written at step (\d+)", text))
        assert "restart 1" in text and "resumed from" in text, text[-3000:]
    (step,) = at  # one step, the same on both nodes
    assert 10 <= int(step) < steps
    tag = run_dir / "checkpoints" / f"step-{int(step):08d}"
    assert {p.name for p in tag.iterdir()} >= {"COMPLETE", "rank00000.pt", "rank00001.pt"}
    run, history = metric(tmp_path, "two-nodes-preempt", "loss/cmr")
    assert run.info.status == "FINISHED" and run.data.tags["slurm.restart_count"] == "1"
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "a step was lost or trained twice"


def test_a_node_that_drops_off_ends_the_job_then_resume_auto_continues(slurm_two_nodes, tmp_path, demo_overrides,
                                                                       job_logs):
    """Node 2's link goes down mid-training: both ranks wait in a collective for LDOT_DIST_TIMEOUT_S, say so
    in one line and exit (node 2's rank too, cut off as it is), and the job fails, not requeued, within a
    bounded time (the link comes back once both have given up, as a node returns after a network fault,
    so Slurm hears of node 2's task and never declares the node down). A new job given the same output
    directory continues (--resume auto) from the newest complete checkpoint, into the same MLflow run,
    every step recorded once."""
    n1, n2 = slurm_two_nodes.nodes
    steps = 60
    args = ["slurm/finetune.sbatch", "train/configs/demo.yaml", *demo_overrides, f"optim.max_steps={steps}",
            "checkpoint.every_steps=5", "checkpoint.keep_last=3", "tracking.experiment=two-nodes-lost"]
    env = two_node_env(slurm_two_nodes, tmp_path)
    job, _ = slurm_two_nodes.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out", *args,
                                    env=env)
    run_dir, logs = tmp_path / f"ldot-finetune-{job}", tmp_path / "logs" / f"ldot-finetune-{job}"
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000010" / "COMPLETE").exists(), 300, "a checkpoint",
             lambda: job_logs(tmp_path))
    lost = "lost contact with another rank in a collective"
    try:
        subprocess.run(["ip", "link", "set", n2.veth, "down"], check=True)
        cut = time.monotonic()
        # both ranks give up by their own timeout, node 2's too, cut off as it is (its log is a local file)
        wait_for(lambda: all(lost in (logs / f"train.{t}.log").read_text() for t in (0, 1)), DIST_TIMEOUT_S + 60,
                 "timeout on both ranks", lambda: job_logs(tmp_path))
        gave_up = time.monotonic() - cut
    finally:
        subprocess.run(["ip", "link", "set", n2.veth, "up"], check=True)
    # node 2 answers again: srun hears that its task ended and the batch script goes on at once
    wait_for(lambda: "step train: exit" in (logs / "job.log").read_text(), STEP_WAIT_S + 30, "end of the training step",
             lambda: job_logs(tmp_path))
    ended = time.monotonic() - cut
    assert DIST_TIMEOUT_S - 2 <= gave_up and ended <= DIST_TIMEOUT_S + STEP_WAIT_S + 60, (gave_up, ended)
    wait_for(lambda: "not requeued" in (logs / "job.log").read_text(), 60, "the decision", lambda: job_logs(tmp_path))
    job_log = (logs / "job.log").read_text()
    assert "step train: exit 1" in job_log and "training failed (exit 1): not requeued" in job_log, job_log
    train0 = (logs / "train.0.log").read_text()
    assert (f"error: rank 0: {lost}" in train0
            and f"the process group timeout is LDOT_DIST_TIMEOUT_S={DIST_TIMEOUT_S} s" in train0), train0[-3000:]
    (rec,) = slurm_two_nodes.wait(job, timeout=300)  # Slurm hears from node 2 again once its link is back
    assert rec["JobState"] == "FAILED" and rec["Restarts"] == "0", rec

    newest = sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                    if (p / "COMPLETE").exists() and p.name.startswith("step-"))[-1]
    job2, _ = slurm_two_nodes.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out", *args,
                                     f"output_dir={run_dir}", env=env)
    (rec2,) = slurm_two_nodes.wait(job2, timeout=400)
    assert rec2["JobState"] == "COMPLETED", job_logs(tmp_path)
    train0 = (tmp_path / "logs" / f"ldot-finetune-{job2}" / "train.0.log").read_text()
    resumed = re.search(r"resumed from (\S+) at step (\d+)", train0)
    assert resumed and Path(resumed.group(1)).name == newest, train0[-3000:]
    run, history = metric(tmp_path, "two-nodes-lost", "loss/cmr")
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "a step was lost or recorded twice"


def test_stop_removes_the_nodes_namespaces_even_when_a_test_fails(start_local_cluster):
    """A failing test inside a two-node cluster: leaving it removes namespaces, links, bridge, hosts files;
    a second stop.sh is a no-op."""
    def present(c):
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        bridge = f"ldb{c.port_base}"
        return {"netns": [n.netns for n in c.nodes if n.netns in netns],
                "links": [n.veth for n in c.nodes if f" {n.veth}@" in links] + ([bridge] if f" {bridge}:" in links else []),
                "hosts": [n.netns for n in c.nodes if (Path("/etc/netns") / n.netns).exists()]}

    with pytest.raises(RuntimeError, match="a failing test"):
        with start_local_cluster(nodes=2) as cluster:
            assert all(len(v) == 2 + (k == "links") for k, v in present(cluster).items()), present(cluster)
            raise RuntimeError("a failing test")
    assert present(cluster) == {"netns": [], "links": [], "hosts": []}
    state = cluster.conf.parent.parent
    again = subprocess.run([str(Path(__file__).resolve().parents[2] / "slurm" / "local" / "stop.sh")],
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LDOT_SLURM_LOCAL_DIR": str(state)},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
