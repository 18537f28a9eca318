"""SIGUSR1 to one rank of a real run: every rank checkpoints at the next step boundary, the job exits 75,
and `--resume auto` finishes the planned steps with each step recorded once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.torchrun


def test_sigusr1_checkpoints_exits_75_and_resumes(tmp_path, tiny_shards, tiny_text_encoder):
    from ldot.errors import EXIT_REQUEUE

    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ldot.train",
           "--config", "train/configs/demo.yaml", f"output_dir={out}", f"data.train={tiny_shards / 'train'}",
           f"model.text_encoder={tiny_text_encoder}", "model.image_layers=1", "data.batch_size=4",
           "optim.max_steps=150", "checkpoint.every_steps=50", "tracking.experiment=preempt-test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "mlflow_run.json").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # a few steps in
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if "train" in " ".join(p.cmdline())]
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1].pid, signal.SIGUSR1)  # one rank only: the others learn of it through the all-reduce
    output, _ = job.communicate(timeout=300)
    # Each rank exits EXIT_REQUEUE (srun passes that on as the job step's code); torchrun reports any
    # non-zero worker exit as its own failure, naming the workers' code.
    assert job.returncode != 0 and f"exitcode  : {EXIT_REQUEUE}" in output, output[-3000:]
    assert f"exit {EXIT_REQUEUE} (requeue with --resume auto)" in output
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert tags, output[-2000:]
    stopped_at = int(tags[-1].split("-")[1])
    assert 0 < stopped_at < 150

    done = subprocess.run(cmd + ["--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    steps = [m.step for m in MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], "loss/cmr")]
    assert sorted(steps) == list(range(1, 151)), "each step recorded exactly once across the preemption"
