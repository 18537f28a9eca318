"""Preemption of a real 2-rank pretraining run, twice: SIGUSR1 to rank 1, then (after `--resume auto`)
SIGTERM to rank 0. Each time every rank checkpoints at the next step boundary and the job exits 75; the
third start finishes the planned steps. Each step is recorded once, and every step's loss is the
uninterrupted run's: with dropout on and VMLM/MRFR masking words and regions, that holds only if the
checkpoints carry each rank's RNG streams and the masks are drawn from (seed, step, rank), not from a
stream that restarts with the process."""
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
STEPS, EVERY = 40, 5
pytestmark = pytest.mark.torchrun


def _cmd(out, data, text_encoder, *extra):
    # MRC-kl needs class distributions, which tiny_shards has not: CMR, VMLM and MRFR, one a step
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "ldot.train",
            "--config", "train/configs/demo.yaml", f"output_dir={out}", f"data.train={data}",
            f"model.text_encoder={text_encoder}", "model.image_layers=1", "model.dropout=0.1", "data.batch_size=4",
            "task=pretrain", "pretrain.cmr=1", "pretrain.vmlm=1", "pretrain.mrfr=1", "pretrain.mrckl=0",
            f"optim.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "tracking.experiment=preempt-test",
            "tracking.system_metrics_every_s=0", *extra]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _complete(out: Path) -> list[int]:
    ckpts = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "COMPLETE").exists()) \
        if ckpts.is_dir() else []


def _preempt(cmd, out: Path, sig: signal.Signals, rank: int, after: int) -> int:
    """Starts `cmd`; once it has written a checkpoint past step `after`, sends `sig` to rank `rank` only
    (the other rank learns of it through the ranks' agreement); returns the step it stopped at."""
    from ldot.errors import EXIT_REQUEUE

    job = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not [s for s in _complete(out) if s > after] and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(job.pid).children(recursive=True)
             if "ldot.train" in " ".join(p.cmdline())}
    assert sorted(ranks) == [0, 1], (ranks, job.poll())
    os.kill(ranks[rank].pid, sig)
    output, _ = job.communicate(timeout=300)
    # Each rank exits EXIT_REQUEUE (srun passes that on as the job step's code); torchrun reports any
    # non-zero worker exit as its own failure, naming the workers' code.
    assert job.returncode != 0 and f"exitcode  : {EXIT_REQUEUE}" in output, output[-3000:]
    assert f"exit {EXIT_REQUEUE} (requeue with --resume auto)" in output, output[-3000:]
    assert f"received {sig.name}: checkpointing at the next step boundary" in output
    stopped = _complete(out)[-1]
    assert after < stopped < STEPS, (after, stopped)
    assert not (out / "checkpoints" / "final").exists()
    return stopped


def _losses(out: Path) -> dict[int, list[tuple[str, float]]]:
    """Every step's recorded losses, as (task, value), across the job's restarts."""
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    steps: dict[int, list[tuple[str, float]]] = {}
    for task in ("cmr", "vmlm", "mrfr"):
        for m in client.get_metric_history(info["run_id"], f"loss/{task}"):
            steps.setdefault(m.step, []).append((task, m.value))
    return steps


def test_sigusr1_and_sigterm_checkpoint_exit_75_and_resume_exactly(tmp_path, tiny_shards, tiny_text_encoder):
    data = tiny_shards / "train"
    straight = tmp_path / "straight"
    proc = subprocess.run(_cmd(straight, data, tiny_text_encoder), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "run"
    first = _preempt(_cmd(out, data, tiny_text_encoder), out, signal.SIGUSR1, rank=1, after=0)
    second = _preempt(_cmd(out, data, tiny_text_encoder, "--resume", "auto"), out, signal.SIGTERM, rank=0,
                      after=first)
    done = subprocess.run(_cmd(out, data, tiny_text_encoder, "--resume", "auto"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{second:08d}'} at step {second}" in done.stderr

    want, got = _losses(straight), _losses(out)
    assert sorted(want) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in want.values())
    assert {task for v in want.values() for task, _ in v} == {"cmr", "vmlm", "mrfr"}
    assert all(len(v) == 1 for v in got.values()), f"a step was recorded twice: {got}"
    assert sorted(got) == sorted(want), "each step recorded exactly once across the preemptions"
    for step, [(task, value)] in want.items():
        assert got[step][0][0] == task
        assert got[step][0][1] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, task, want, got)
    assert (out / "checkpoints" / "final" / "ldot.json").is_file()
