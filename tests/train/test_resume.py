"""Kill -9 in the middle of a real `ldot train` run, then `--resume auto`: the loss trace after
the restart is the uninterrupted run's, and no step is recorded twice (CPU, deterministic settings)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 30
pytestmark = pytest.mark.torchrun


def _cmd(out, data, text_encoder, *extra, main=("-m", "ldot.train")):
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *main,
            "--config", "train/configs/demo.yaml", f"output_dir={out}", f"data.train={data}",
            f"model.text_encoder={text_encoder}", "model.image_layers=1", "data.batch_size=4",
            f"optim.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "tracking.experiment=resume-test", *extra]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _trace(out: Path) -> dict[int, list[float]]:
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    history = MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], "loss/cmr")
    steps: dict[int, list[float]] = {}
    for m in history:
        steps.setdefault(m.step, []).append(m.value)
    return steps


def test_kill_9_then_resume_auto_continues_the_same_trace(tmp_path, tiny_shards, tiny_text_encoder, main_then_report):
    data = tiny_shards / "train"
    straight = tmp_path / "straight"
    proc = subprocess.run(_cmd(straight, data, tiny_text_encoder, main=(str(main_then_report), "ldot.train.__main__")),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # both ranks close their process group before they leave (see main_then_report)
    assert proc.stdout.count("process group left open: False") == 2, proc.stdout[-2000:]

    crashed = tmp_path / "crashed"
    victim = subprocess.Popen(_cmd(crashed, data, tiny_text_encoder), cwd=ROOT, env=_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = crashed / "checkpoints" / "step-00000004" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint at step 4 before the deadline"
    # torchrun and both ranks (which run in sessions of their own), with no chance to clean up
    tree = psutil.Process(victim.pid)
    procs = [tree, *tree.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)
    victim.wait()
    assert not (crashed / "checkpoints" / "final").exists()

    proc = subprocess.run(_cmd(crashed, data, tiny_text_encoder) + ["--resume", "auto"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", proc.stderr + proc.stdout)
    assert resumed, proc.stderr[-3000:]
    # the restart must retrain steps, or the comparison below proves nothing
    assert int(resumed.group(1)) <= STEPS - 4, f"the run got to step {resumed.group(1)} before the kill"

    want, got = _trace(straight), _trace(crashed)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in got.values()), f"a step was recorded twice: {got}"
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-6, abs=1e-7), (step, want, got)
    # one run for the job, continued across the restart
    assert json.loads((crashed / "mlflow_run.json").read_text())["run_id"]
    assert (crashed / "checkpoints" / "final" / "ldot.json").is_file()
