"""slurm/launch.sh and the scripts' failure paths: the rank mapping under a faked two-node layout, then on
a real Slurm; bad input refused in one line (in job.log too) and never requeued."""
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRINT_VARS = 'echo "$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT"'


def _launch_as_task(tmp_path, **slurm):
    """slurm/launch.sh as srun would start task 3 of 4, the second of two tasks on the second of two nodes.
    Only scontrol is a stand-in (on PATH, for this test): it expands the node list as Slurm does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[07-08]" ] || exit 1\nprintf "node07\\nnode08\\n"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LDOT_MASTER")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                        "MASTER_ADDR", "MASTER_PORT",
                                                                        "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="20123", SLURM_PROCID="3", SLURM_LOCALID="1",
               SLURM_NODEID="1", SLURM_NTASKS="4", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="2",
               SLURM_TASKS_PER_NODE="2(x2)", SLURM_JOB_NODELIST="node[07-08]", SLURM_STEP_NODELIST="node[07-08]",
               **slurm)
    return subprocess.run([str(ROOT / "slurm" / "launch.sh"), "bash", "-c", PRINT_VARS], env=env,
                          capture_output=True, text=True, timeout=60)


def test_launch_maps_a_two_node_layout(tmp_path):
    """RANK is the global task id, LOCAL_RANK the task's place on its node (they differ off the first
    node), MASTER_ADDR the first host of the step, MASTER_PORT from the job id."""
    proc = _launch_as_task(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].split() == ["3", "1", "4", "node07", str(10000 + 20123 % 20000)]
    assert "launch: rank 3/4 local 1" in proc.stdout


def test_launch_port_rule_and_gpu_binding(tmp_path):
    # a cluster of the tests' gives its own port block, so two clusters' job 123 cannot meet on one port
    proc = _launch_as_task(tmp_path, LDOT_MASTER_PORT_BASE="24002", LDOT_MASTER_PORT_SPAN="198")
    assert proc.stdout.splitlines()[-1].split()[4] == str(24002 + 20123 % 198), proc.stderr
    # one GPU bound to the task (--gpus-per-task=1): it is the task's device 0
    proc = _launch_as_task(tmp_path, CUDA_VISIBLE_DEVICES="5")
    assert proc.stdout.splitlines()[-1].split()[:2] == ["3", "0"], proc.stderr
    proc = _launch_as_task(tmp_path, CUDA_VISIBLE_DEVICES="4,5")
    assert proc.stdout.splitlines()[-1].split()[:2] == ["3", "1"], proc.stderr
    proc = _launch_as_task(tmp_path, LDOT_MASTER_ADDR="ib-node07", LDOT_MASTER_PORT="29500")
    assert proc.stdout.splitlines()[-1].split()[3:] == ["ib-node07", "29500"], proc.stderr
    proc = _launch_as_task(tmp_path, LDOT_MASTER_PORT_SPAN="0")
    assert proc.returncode == 2 and "not port numbers" in proc.stderr


def test_launch_maps_slurm_tasks_to_torch_distributed(slurm_cluster, tmp_path):
    env = slurm_cluster.env(tmp_path)
    proc = slurm_cluster.run("srun", "--ntasks=2", "--label", "slurm/launch.sh", "bash", "-c",
                             "echo \"vars=$RANK\" $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT $SLURM_JOB_ID",
                             env=env, timeout=120)
    rows = sorted(line.split("vars=", 1)[1].split() for line in proc.stdout.splitlines() if " vars=" in line)
    assert [r[:3] for r in rows] == [["0", "2", "0"], ["1", "2", "1"]], proc.stdout
    host = socket.gethostname().split(".")[0]
    for rank, world, local, addr, port, job in rows:
        assert addr == host
        # derived from the job id (the same after a requeue), inside this session's port block
        assert int(port) == slurm_cluster.master_port(job)


def _job_on(cluster, tmp_path) -> subprocess.Popen:
    return subprocess.Popen(["srun", "--ntasks=1", "slurm/launch.sh", "bash", "-c",
                             'echo "port=$MASTER_PORT job=$SLURM_JOB_ID"'], cwd=ROOT, env=cluster.env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_job(cluster, proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    port, job = (int(x.split("=")[1]) for x in out.splitlines()[-1].split())
    assert port == cluster.master_port(job) and cluster.port_base < port < cluster.port_base + 200


def test_two_clusters_run_side_by_side(slurm_cluster, start_local_cluster, tmp_path):
    """What a second test session on this machine does: a cluster on its own ports, state directory and
    munged, beside the first. Both run jobs at once, their rendezvous ports fall in their own blocks, and
    stopping one leaves the other working."""
    with start_local_cluster() as second:
        assert second.port_base != slurm_cluster.port_base and second.conf != slurm_cluster.conf
        procs = [_job_on(c, tmp_path) for c in (slurm_cluster, second)]
        for cluster, proc in zip((slurm_cluster, second), procs):
            _check_job(cluster, proc)
    _check_job(slurm_cluster, _job_on(slurm_cluster, tmp_path))


def test_launch_refuses_to_run_outside_srun(slurm_cluster, tmp_path):
    proc = slurm_cluster.run("slurm/launch.sh", "true", env=slurm_cluster.env(tmp_path), check=False)
    assert proc.returncode == 2
    assert "not an srun task" in proc.stderr


def test_bad_config_fails_at_once_and_is_not_requeued(slurm_cluster, tmp_path, tiny_shards, job_logs):
    env = slurm_cluster.env(tmp_path)
    job, rc = slurm_cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/finetune.sbatch",
                                   "train/configs/demo.yaml", f"data.train={tiny_shards / 'train'}",
                                   "optim.no_such_key=1", env=env, wait=True)
    (rec,) = slurm_cluster.wait(job)
    assert rc == 2 and rec["JobState"] == "FAILED" and rec["Restarts"] == "0", job_logs(tmp_path)
    message = "unknown config key in section 'optim': no_such_key"
    out = (tmp_path / f"ldot-finetune-{job}.out").read_text()
    (error,) = [line for line in out.splitlines() if "error" in line]
    assert error.startswith(f"ldot-slurm: error: {message} (known: ")
    # job.log holds the message itself, not a pointer to the .out file
    job_log = (tmp_path / "logs" / f"ldot-finetune-{job}" / "job.log").read_text().splitlines()
    assert job_log[-1].endswith(error.split("ldot-slurm: ", 1)[1])
    assert not (tmp_path / "logs" / f"ldot-finetune-{job}" / "train.0.log").exists()


def test_eval_typo_fails_in_the_first_seconds(slurm_cluster, tmp_path, tiny_shards, job_logs):
    """finetune.sbatch --eval with a typo: refused before any task starts (it used to train fully, then
    fail at recall); the same typo through slurm/submit is refused before sbatch."""
    env = slurm_cluster.env(tmp_path, LDOT_DATA_ROOT=str(tiny_shards))
    args = ["slurm/finetune.sbatch", "--eval", "${LDOT_DATA_ROOT}/tset", "train/configs/demo.yaml",
            "data.train=${LDOT_DATA_ROOT}/train"]
    started = time.monotonic()
    job, rc = slurm_cluster.sbatch(f"--output={tmp_path}/%x-%j.out", *args, env=env, wait=True)
    (rec,) = slurm_cluster.wait(job)
    assert rc == 2 and rec["JobState"] == "FAILED" and rec["Restarts"] == "0", job_logs(tmp_path)
    assert time.monotonic() - started < 90
    message = f"--eval: no dataset directory at {tiny_shards}/tset"
    assert (tmp_path / "logs" / f"ldot-finetune-{job}" / "job.log").read_text().splitlines()[-1].endswith(message)
    assert not (tmp_path / f"ldot-finetune-{job}" / "config.yaml").exists()  # no training started

    proc = subprocess.run([str(ROOT / "slurm" / "submit"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (2, f"error: {message}", "")


def test_missing_site_settings_are_named(slurm_cluster, tmp_path):
    env = slurm_cluster.env(tmp_path)
    del env["LDOT_OUTPUT_ROOT"]
    job, rc = slurm_cluster.sbatch(f"--output={tmp_path}/%j.out", "slurm/finetune.sbatch", env=env, wait=True)
    assert rc == 2
    assert "LDOT_OUTPUT_ROOT is not set: copy slurm/site.env.example to slurm/site.env" in \
        (tmp_path / f"{job}.out").read_text()


@pytest.mark.parametrize("args, message", [
    ([], "usage: sbatch --array=1-N slurm/sweep.sbatch SWEEP_FILE"),
    (["slurm/sweeps/finetune-lr.txt"], "not an array job: submit with sbatch --array=1-3"),
])
def test_sweep_usage_errors(slurm_cluster, tmp_path, args, message):
    job, rc = slurm_cluster.sbatch(f"--output={tmp_path}/%j.out", "slurm/sweep.sbatch", *args,
                                   env=slurm_cluster.env(tmp_path), wait=True)
    assert rc == 2 and message in (tmp_path / f"{job}.out").read_text()


@pytest.mark.parametrize("env, refused", [
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, True),  # `srun ldot train`, no launch.sh
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4", "RANK": "1"}, False),  # through launch.sh
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, False),  # the batch shell itself: a world of one
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False),
])
def test_python_leaves_the_mapping_to_launch_sh(monkeypatch, env, refused):
    """ldot.distributed maps nothing: an srun task of several without launch.sh's RANK is refused in one
    line, where it would otherwise train alone as a world of one beside its siblings."""
    from ldot.distributed import _check_not_bare_srun
    from ldot.errors import LdotError

    for name in ("RANK", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if refused:
        with pytest.raises(LdotError, match="^srun started 4 tasks but RANK is not set: launch them through "
                                            "slurm/launch.sh"):
            _check_not_bare_srun()
    else:
        _check_not_bare_srun()
    assert "RANK" not in os.environ or env.get("RANK") == os.environ["RANK"]
