"""slurm/finetune.sbatch on a real Slurm: 2 tasks train on tiny demo shards, then recall lands in the run;
eval.sbatch recalls and mines the same export."""
import json
import shutil

from mlflow.tracking import MlflowClient


def test_finetune_two_tasks_records_job_and_recall(slurm_cluster, tmp_path, tiny_shards, demo_overrides, job_logs):
    env = slurm_cluster.env(tmp_path)
    job, rc = slurm_cluster.sbatch("--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out",
                                   "slurm/finetune.sbatch", "--eval", str(tiny_shards / "test"),
                                   "train/configs/demo.yaml", *demo_overrides, "optim.max_steps=4",
                                   "tracking.experiment=slurm-finetune", env=env, wait=True)
    assert rc == 0, job_logs(tmp_path)
    (rec,) = slurm_cluster.wait(job)
    assert rec["JobState"] == "COMPLETED" and rec["NumTasks"] == "2"

    # Predictable places: outputs and logs named <job name>-<job id>, one log per task.
    tag = f"ldot-finetune-{job}"
    run_dir, log_dir = tmp_path / tag, tmp_path / "logs" / tag
    assert (run_dir / "checkpoints" / "final" / "recall.json").is_file()
    # the recall after training runs on both tasks too, each searching half of the split
    assert {p.name for p in log_dir.iterdir()} >= {"job.log", "train.0.log", "train.1.log", "eval.0.log", "eval.1.log"}
    assert "launch: rank 1/2" in (log_dir / "train.1.log").read_text()
    # A job's log is a file, not a terminal: progress comes as plain lines from rank 0, no bar
    train0 = (log_dir / "train.0.log").read_text()
    assert "train 4/4 (100.0%)" in train0 and "task=cmr, loss=" in train0 and "\r" not in train0
    assert "train 4/4" not in (log_dir / "train.1.log").read_text()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-finetune").experiment_id])
    assert run.data.tags["slurm.job_id"] == job
    assert run.data.tags["mlflow.runName"] == tag
    assert run.data.params["world_size"] == "2"
    assert {"test/ar", "test/tr_r1", "test/ir_r1", "test/tr_r10", "test/ir_r10"} <= set(run.data.metrics)
    assert 0.0 <= run.data.metrics["test/ar"] <= 1.0

    # eval.sbatch on the same export: one task, the recall table written where asked; equal to the
    # 2-task table above.
    out = tmp_path / "recall-again.json"
    job2, _ = slurm_cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/eval.sbatch",
                                   str(run_dir / "checkpoints" / "final"), "${LDOT_DATA_ROOT}/test", "--out", str(out),
                                   "--no-log", env={**env, "LDOT_DATA_ROOT": str(tiny_shards)})
    (rec2,) = slurm_cluster.wait(job2)
    assert rec2["JobState"] == "COMPLETED", job_logs(tmp_path)
    assert json.loads(out.read_text())["recall"] == json.loads((run_dir / "checkpoints" / "final" / "recall.json")
                                                                .read_text())["recall"]

    # eval.sbatch mine on 2 tasks (each encodes and searches half): hard negatives of the split, written
    # beside the checkpoint by default, equal to what one process writes.
    job3, _ = slurm_cluster.sbatch("--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out", "slurm/eval.sbatch", "mine",
                                   str(run_dir / "checkpoints" / "final"), "${LDOT_DATA_ROOT}/test", "--k", "2",
                                   env={**env, "LDOT_DATA_ROOT": str(tiny_shards)})
    (rec3,) = slurm_cluster.wait(job3)
    assert rec3["JobState"] == "COMPLETED", job_logs(tmp_path)
    mined = run_dir / "checkpoints" / "final" / "hard_negatives" / "test"
    summary = json.loads((mined / "mine.json").read_text())
    assert summary["k"] == 2 and len((mined / "txt2img.jsonl").read_text().splitlines()) == summary["num_captions"]
    assert "launch: rank 1/2" in (tmp_path / "logs" / f"ldot-eval-{job3}" / "eval.1.log").read_text()
    from ldot.eval.__main__ import main as eval_main

    assert eval_main(["mine", "--checkpoint", str(run_dir / "checkpoints" / "final"), "--data",
                      str(tiny_shards / "test"), "--k", "2", "--out", str(tmp_path / "one")]) == 0
    for name in ("txt2img.jsonl", "img2txt.jsonl"):
        two = [json.loads(x)["negatives"] for x in (mined / name).read_text().splitlines()]
        assert two == [json.loads(x)["negatives"] for x in (tmp_path / "one" / name).read_text().splitlines()]


def test_failure_after_training_marks_the_run_failed(slurm_cluster, tmp_path, tiny_shards, demo_overrides, job_logs):
    """Recall fails after training (an evaluation set whose manifest is there but whose shards are not, so
    the first seconds' check passes): the job fails and its MLflow run says FAILED, not FINISHED."""
    broken = tmp_path / "no-shards"
    broken.mkdir()
    shutil.copy(tiny_shards / "test" / "manifest.json", broken)
    env = slurm_cluster.env(tmp_path)
    job, rc = slurm_cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/finetune.sbatch", "--eval", str(broken),
                                   "train/configs/demo.yaml", *demo_overrides, "optim.max_steps=2",
                                   "tracking.experiment=slurm-fail-late", env=env, wait=True)
    (rec,) = slurm_cluster.wait(job)
    assert rc != 0 and rec["JobState"] == "FAILED" and rec["Restarts"] == "0", job_logs(tmp_path)
    assert (tmp_path / f"ldot-finetune-{job}" / "checkpoints" / "final").is_dir()  # training did finish
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-fail-late").experiment_id])
    assert run.info.status == "FAILED"
    job_log = (tmp_path / "logs" / f"ldot-finetune-{job}" / "job.log").read_text()
    assert "evaluation failed" in job_log and f"MLflow run {run.info.run_id} marked FAILED" in job_log, job_log
