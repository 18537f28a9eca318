"""Real 2-rank `ldot train` jobs against a real `mlflow server` on 127.0.0.1:
- one job is exactly one run (nested under its Slurm array's parent) with the params, per-step
  metrics, system metrics of both ranks, artifacts and checkpoint reference; eval recall adds test/*;
- the server is killed in the middle of a job: the job completes, and once the server is back
  `ldot eval sync` leaves every step recorded exactly once;
- `ldot eval compare` on the two runs prints the params that differ and writes the plot."""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.torchrun
STEPS_RECORDS, STEPS_OUTAGE = 8, 40


def _env(uri, **extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": uri, **extra}
    for k in list(env):
        if k.startswith("SLURM_") and k not in extra:
            env.pop(k)
    env.pop("LDOT_SWEEP", None)
    env.pop("LDOT_PARENT_RUN_ID", None)
    return env


def _train(out, data, text_encoder, steps, *extra):
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ldot.train",
            "--config", "train/configs/demo.yaml", f"output_dir={out}", f"data.train={data}",
            f"model.text_encoder={text_encoder}", "model.image_layers=1", "data.batch_size=4",
            f"optim.max_steps={steps}", "tracking.experiment=job-tracking", "tracking.system_metrics_every_s=0.5",
            "tracking.timeout_s=5", *extra]


def _with_a_bad_sample(src: Path, dst: Path) -> Path:
    """A copy of the train split whose first sample has unreadable metadata (skipped: invalid_json)."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.suffix != ".tar" or f.name != "shard-000000.tar":
            (dst / f.name).write_bytes(f.read_bytes())
            continue
        with tarfile.open(f) as tin, tarfile.open(dst / f.name, "w") as tout:
            first = None
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name.endswith(".json") and first is None:
                    first, data = m.name, b"{not json"
                    m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
    return dst


def _steps(client, run_id, key):
    steps: dict[int, int] = {}
    for m in client.get_metric_history(run_id, key):
        steps[m.step] = steps.get(m.step, 0) + 1
    return steps


def _artifacts(client, run_id, path=None):
    for a in client.list_artifacts(run_id, path):
        yield from (_artifacts(client, run_id, a.path) if a.is_dir else [a.path])


@pytest.fixture(scope="module")
def jobs(mlflow_server, tmp_path_factory, tiny_shards, tiny_text_encoder):
    mlflow_server.ensure_up()
    root = tmp_path_factory.mktemp("jobs")
    data = _with_a_bad_sample(tiny_shards / "train", root / "train-with-a-bad-sample")

    # 1. a job inside a (pretend) Slurm array, server up throughout, then eval recall into its run
    rec = root / "records"
    env = _env(mlflow_server.uri, SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="777", SLURM_ARRAY_TASK_ID="3")
    proc = subprocess.run(_train(rec, data, tiny_text_encoder, STEPS_RECORDS, "data.on_error=skip",
                                 "checkpoint.every_steps=4"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recall = subprocess.run([sys.executable, "-m", "ldot.eval", "recall", "--checkpoint", str(rec / "checkpoints" / "final"),
                             "--data", str(tiny_shards / "test"), "--batch-size", "32"],
                            cwd=ROOT, env=_env(mlflow_server.uri), capture_output=True, text=True, timeout=600)
    assert recall.returncode == 0, recall.stderr[-4000:]

    # 2. the server is killed (SIGKILL) once the job has checkpointed step 4; it stays away to the end
    out = root / "outage"
    job = subprocess.Popen(_train(out, tiny_shards / "train", tiny_text_encoder, STEPS_OUTAGE,
                                  "checkpoint.every_steps=2", "optim.lr=3e-4"),
                           cwd=ROOT, env=_env(mlflow_server.uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    marker = out / "checkpoints" / "step-00000004" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    mlflow_server.kill()
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-4000:]
    # the server came back after the job: sync sends what is left
    mlflow_server.start()
    sync = subprocess.run([sys.executable, "-m", "ldot.eval", "sync", str(out)], cwd=ROOT, env=_env(mlflow_server.uri),
                          capture_output=True, text=True, timeout=300)
    return {"records": rec, "outage": out, "uri": mlflow_server.uri, "recall": recall.stdout,
            "outage_log": stderr + stdout, "sync": sync, "root": root, "data": data}


def test_a_two_rank_job_is_one_run_with_its_records(jobs):
    client = MlflowClient(jobs["uri"])
    info = json.loads((jobs["records"] / "mlflow_run.json").read_text())
    exp = client.get_experiment_by_name("job-tracking")
    members = client.search_runs([exp.experiment_id], "tags.`ldot.sweep` = 'slurm-array-777'")
    members = [r for r in members if "ldot.sweep_parent" not in r.data.tags]
    assert [r.info.run_id for r in members] == [info["run_id"]], "one run per job, never one per rank"
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "task-3"

    p = run.data.params
    assert p["world_size"] == "2" and p["optim.max_steps"] == str(STEPS_RECORDS) and p["data.on_error"] == "skip"
    assert p["deepspeed.zero_optimization.stage"] == "2" and p["deepspeed.train_micro_batch_size_per_gpu"] == "4"
    assert re.fullmatch(r"[0-9a-f]{40}", p["git.commit"]) and p["git.dirty"] in ("true", "false")
    manifest = jobs["data"] / "manifest.json"
    assert p["data.train.manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert p["slurm.job_id"] == "4242" and p["slurm.array_job_id"] == "777" and p["slurm.array_task_id"] == "3"

    rid = run.info.run_id
    for key in ("loss/cmr", "lr", "grad_norm", "loss_scale", "samples_per_s", "tokens_per_s"):
        assert _steps(client, rid, key) == {s: 1 for s in range(1, STEPS_RECORDS + 1)}, key
    assert run.data.metrics["skipped/invalid_json"] >= 1
    for rank in (0, 1):
        assert any(re.fullmatch(rf"system/.+-rank{rank}/cpu_utilization_percentage", k) for k in run.data.metrics), rank
    assert any(k.endswith("-rank1/process_memory_rss_megabytes") for k in run.data.metrics)
    for k in ("ar", "tr_r1", "ir_r1"):  # eval recall, into the training run
        assert 0.0 <= run.data.metrics[f"test/{k}"] <= 1.0
    assert f"recorded in MLflow run {rid}" in jobs["recall"]

    arts = set(_artifacts(client, rid))
    assert {"config/config.yaml", "config/deepspeed.json", "data/train/manifest.json",
            "recall/recall.md", "recall/recall.json"} <= arts, arts
    assert Path(run.data.tags["ldot.checkpoint"], "ldot.json").is_file()

    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "slurm-array-777" and parent.data.tags["ldot.sweep_parent"] == "slurm-array-777"
    assert not (jobs["records"] / "mlflow_outbox" / "rank0.jsonl").exists(), "delivered journals are removed"


def test_a_job_survives_the_server_dying_and_sync_sends_the_rest(jobs):
    log = jobs["outage_log"]
    assert "is not reachable" in log, log[-3000:]
    # rate-limited: one warning per process for the outage (two ranks), not one per record
    assert len(re.findall(r"is not reachable", log)) <= 4, log[-3000:]
    assert jobs["sync"].returncode == 0, jobs["sync"].stdout + jobs["sync"].stderr[-3000:]
    assert "sent" in jobs["sync"].stdout

    client = MlflowClient(jobs["uri"])
    info = json.loads((jobs["outage"] / "mlflow_run.json").read_text())
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("loss/cmr", "lr", "samples_per_s"):
        assert _steps(client, run.info.run_id, key) == {s: 1 for s in range(1, STEPS_OUTAGE + 1)}, key
    assert run.data.params["optim.lr"] == "0.0003"
    assert Path(run.data.tags["ldot.checkpoint"]).is_dir()
    exp = client.get_experiment_by_name("job-tracking")
    same_dir = client.search_runs([exp.experiment_id], f"tags.`ldot.output_dir` = '{jobs['outage'].resolve()}'")
    assert len(same_dir) == 1
    # sync again: nothing left, nothing doubled
    again = subprocess.run([sys.executable, "-m", "ldot.eval", "sync", str(jobs["outage"])], cwd=ROOT,
                           env=_env(jobs["uri"]), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to send" in again.stdout
    assert _steps(client, run.info.run_id, "loss/cmr") == {s: 1 for s in range(1, STEPS_OUTAGE + 1)}


def test_compare_the_two_jobs(jobs, capsys):
    from ldot.eval.__main__ import main

    ids = [json.loads((jobs[k] / "mlflow_run.json").read_text())["run_id"] for k in ("records", "outage")]
    png = jobs["root"] / "compare.png"
    assert main(["compare", "--tracking-uri", jobs["uri"], "--runs", *ids, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    for key, a, b in (("optim.lr", "0.0001", "0.0003"), ("optim.max_steps", str(STEPS_RECORDS), str(STEPS_OUTAGE))):
        row = next(line for line in out.splitlines() if line.startswith(f"| {key} |"))
        assert a in row and b in row, row
    assert "| test AR % |" in out and "samples/s" in out
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
