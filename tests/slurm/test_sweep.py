"""slurm/sweep.sbatch on a real Slurm: a 2-task array gives two runs in one experiment, each with its entry.

Submitted through slurm/submit with a site.env, so the site settings, ${LDOT_DATA_ROOT} expansion, the
automatic --array=1-N and the parent run made once at submission are covered too; then with plain
sbatch, where the array's first task makes the parent."""
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient


def test_sweep_array_runs_each_entry_in_one_experiment(slurm_cluster, tmp_path, tiny_shards, demo_overrides,
                                                       job_logs):
    sweep = tmp_path / "lr.txt"
    sweep.write_text("# two learning rates\noptim.lr=1e-5\n\noptim.lr=3e-5  optim.warmup_ratio=0.5   # a second key\n")
    site = tmp_path / "site.env"
    site.write_text(f"LDOT_PARTITION=local\nLDOT_DATA_ROOT={tiny_shards}\nLDOT_SBATCH_ARGS='--ntasks-per-node=1'\n"
                    f"LDOT_OUTPUT_ROOT=/nonexistent/the/environment/wins\n")
    env = slurm_cluster.env(tmp_path, LDOT_SITE_ENV=str(site))
    overrides = [o for o in demo_overrides if not o.startswith("data.train=")] + ["data.train=${LDOT_DATA_ROOT}/train"]
    job, _ = slurm_cluster.sbatch_via_submit("slurm/sweep.sbatch", str(sweep), "train/configs/demo.yaml", *overrides,
                                             "optim.max_steps=3", "tracking.experiment=slurm-sweep", env=env)
    recs = slurm_cluster.wait(job)  # polls each second; `sbatch --wait` polls every 10 s
    assert sorted(r["JobState"] for r in recs) == ["COMPLETED", "COMPLETED"], job_logs(tmp_path)
    assert {r["Partition"] for r in recs} == {"local"}
    assert (tmp_path / "logs" / f"ldot-sweep-{job}_2.out").is_file()  # slurm/submit's --output

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slurm-sweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == f"lr-{job}"]  # LDOT_SWEEP's default
    # made once, by slurm/submit, before the tasks started: no task made one of its own and deleted it
    assert parent.data.tags["slurm.array_job_id"] == job and parent.data.tags["ldot.sweep_parent"] == f"lr-{job}"
    assert len(client.search_runs([parent.info.experiment_id], run_view_type=ViewType.ALL)) == 3
    assert parent.info.status == "FINISHED"
    for task in ("1", "2"):
        job_log = (tmp_path / "logs" / f"ldot-sweep-{job}_{task}" / "job.log").read_text()
        assert f"parent run {parent.info.run_id}" in job_log
    by_task = {r.data.tags["slurm.array_task_id"]: r for r in runs if r is not parent}
    assert sorted(by_task) == ["1", "2"], [r.data.tags for r in runs]
    assert {r.data.tags["slurm.array_job_id"] for r in by_task.values()} == {job}
    assert float(by_task["1"].data.params["optim.lr"]) == 1e-5
    assert float(by_task["2"].data.params["optim.lr"]) == 3e-5
    assert float(by_task["1"].data.params["optim.warmup_ratio"]) == 0.1  # demo.yaml's
    assert float(by_task["2"].data.params["optim.warmup_ratio"]) == 0.5
    for task, run in by_task.items():
        assert run.data.tags["mlflow.runName"] == f"ldot-sweep-{job}_{task}"
        assert run.data.params["data.train"] == f"{tiny_shards}/train"
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (tmp_path / f"ldot-sweep-{job}_{task}" / "checkpoints" / "final").is_dir()


def test_plain_sbatch_sweep_makes_its_parent_in_the_first_task(slurm_cluster, tmp_path, tiny_shards, demo_overrides,
                                                             job_logs):
    """Without slurm/submit nothing makes the parent beforehand: the task nests under the parent named
    LDOT_SWEEP's default, made race-safely by the trainer (one task here: --array=2)."""
    sweep = tmp_path / "wd.txt"
    sweep.write_text("optim.lr=1e-5\noptim.weight_decay=0.5\n")
    env = slurm_cluster.env(tmp_path)
    job, _ = slurm_cluster.sbatch("--array=2", f"--output={tmp_path}/%x-%A_%a.out", "slurm/sweep.sbatch", str(sweep),
                                  "train/configs/demo.yaml", *demo_overrides, "optim.max_steps=2",
                                  "tracking.experiment=slurm-sweep-plain", env=env)
    (rec,) = slurm_cluster.wait(job)
    assert rec["JobState"] == "COMPLETED", job_logs(tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slurm-sweep-plain").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.runName") == f"wd-{job}"]
    (child,) = [r for r in runs if r is not parent]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert float(child.data.params["optim.weight_decay"]) == 0.5
