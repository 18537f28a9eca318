"""slurm/launch.sh and the scripts' failure paths on a real Slurm: rank mapping, bad input never requeued."""
import socket

import pytest


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
        assert int(port) == 10000 + int(job) % 20000  # derived from the job id: the same after a requeue


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
    out = (tmp_path / f"ldot-finetune-{job}.out").read_text()
    assert "unknown config key in section 'optim': no_such_key" in out
    assert "not requeued" in out


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
