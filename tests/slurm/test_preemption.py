"""Preemption on a real Slurm: SIGUSR1 mid-training -> checkpoint, exit 75, self-requeue, resume, no step twice."""
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

STEPS = 120


def _wait_for(path: Path, timeout: float, what: str, logs) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {what} ({path}) after {timeout} s\n{logs()}"
        time.sleep(0.3)


def test_requeued_job_resumes_and_trains_each_step_once(slurm_cluster, tmp_path, demo_overrides, job_logs):
    env = slurm_cluster.env(tmp_path)
    job, _ = slurm_cluster.sbatch("--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out",
                                  "slurm/finetune.sbatch", "train/configs/demo.yaml", *demo_overrides,
                                  f"optim.max_steps={STEPS}", "checkpoint.every_steps=10",
                                  "tracking.experiment=slurm-preempt", env=env)
    run_dir = tmp_path / f"ldot-finetune-{job}"
    # Preempt once training is under way: its first periodic checkpoint is complete.
    _wait_for(run_dir / "checkpoints" / "step-00000010" / "COMPLETE", 240, "first checkpoint",
              lambda: job_logs(tmp_path))
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)

    (rec,) = slurm_cluster.wait(job, timeout=300)
    logs = job_logs(tmp_path)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", logs
    job_log = (tmp_path / "logs" / f"ldot-finetune-{job}" / "job.log").read_text()
    assert "SIGUSR1: asking the tasks to checkpoint" in job_log and "requeueing (restart 1" in job_log
    assert "step train: exit 75" in job_log, "every rank leaves with the trainer's exit 75"
    train_log = (tmp_path / "logs" / f"ldot-finetune-{job}" / "train.0.log").read_text()
    assert "restart 1" in train_log and "resumed from" in train_log, logs
    resumed_at = int(train_log.split("resumed from", 1)[1].split("at step", 1)[1].split()[0])
    assert 10 <= resumed_at < STEPS, "the signal must land mid-training"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-preempt").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm.job_id"] == job and run.data.tags["slurm.restart_count"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/cmr")]
    assert sorted(steps) == list(range(1, STEPS + 1)), f"steps missing or trained twice: {sorted(steps)}"
    assert (run_dir / "checkpoints" / "final").is_dir()


def test_requeue_limit_stops_the_loop(slurm_cluster, tmp_path, demo_overrides, job_logs):
    """With LDOT_MAX_REQUEUES=0 a preempted job ends (exit 75) instead of requeueing. The signal comes
    while the config is being checked, so no training starts: the job goes straight to the decision."""
    env = slurm_cluster.env(tmp_path, LDOT_MAX_REQUEUES="0")
    job, _ = slurm_cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/finetune.sbatch",
                                  "train/configs/demo.yaml", *demo_overrides, "tracking.experiment=slurm-limit",
                                  env=env)
    job_log = tmp_path / "logs" / f"ldot-finetune-{job}" / "job.log"
    _wait_for(job_log, 60, "job.log (the trap is set once it exists)", lambda: job_logs(tmp_path))
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    (rec,) = slurm_cluster.wait(job, timeout=120)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "75:0" and rec["Restarts"] == "0", job_logs(tmp_path)
    text = job_log.read_text()
    assert "SIGUSR1 came before training started" in text
    assert "not requeued: restart 0 reached LDOT_MAX_REQUEUES=0" in text
    assert not (tmp_path / f"ldot-finetune-{job}" / "checkpoints").exists()
