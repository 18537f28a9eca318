"""The training job's MLflow run: rank 0 starts (or continues) it with what defines the job, and the
other ranks attach for their system metrics."""
from __future__ import annotations

import getpass
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldot.data.schema import MANIFEST
from ldot.tracking import RUN_FILE, Tracker, git_state, resolve_tracking_uri, slurm_tags, sweep_of
from ldot.tracking.outbox import OUTBOX_DIR, writer_name
from ldot.tracking.tracker import SLURM_PARAMS, file_sha256
from ldot.train.config import TrackingConfig, flatten


@dataclass
class JobRecord:
    """What the run records about a training job; the trainer assembles it from the config's sections."""
    config: dict                     # the resolved config as a plain nested dict (flattened into params)
    task: str                        # finetune | pretrain
    ds_config: dict                  # the DeepSpeed config as the engine received it
    deepspeed_source: Path           # the deepspeed_configs/*.json it came from
    datasets: dict[str, str]         # split -> dataset directory (manifests hashed and attached)
    num_train_images: int
    world_size: int


def job_params(job: JobRecord) -> dict[str, Any]:
    """What defines a training job: the resolved config, the DeepSpeed config, the world, the code,
    the data (manifest hashes), the Slurm ids."""
    params: dict[str, Any] = flatten(job.config)
    params.update({"world_size": job.world_size,
                   "zero_stage": job.ds_config.get("zero_optimization", {}).get("stage", 0),
                   "data.train.images": job.num_train_images})
    params.update({f"deepspeed.{k}": v for k, v in flatten(job.ds_config).items()})
    params.update(git_state())
    for split, manifest in _manifests(job).items():
        params[f"data.{split}.manifest_sha256"] = file_sha256(manifest)
    params.update({tag: os.environ[var] for var, tag in SLURM_PARAMS.items() if os.environ.get(var)})
    return params


def _manifests(job: JobRecord) -> dict[str, Path]:
    found = {split: Path(d) / MANIFEST for split, d in job.datasets.items() if d}
    return {split: m for split, m in found.items() if m.is_file()}


def start_job_tracking(tc: TrackingConfig, out: str | Path, dist, job: JobRecord, *, hold_metrics: bool,
                       resuming: bool) -> Tracker:
    """Start (or, resuming, continue) the job's run on rank 0 and share it with every rank; returns
    this rank's Tracker. Rank 0 also logs `out`/config.yaml (written by the trainer) and writes
    mlflow_run.json there. hold_metrics: step metrics wait for flush() (after each checkpoint)."""
    out = Path(out)
    outbox = out / OUTBOX_DIR
    autoflush = not hold_metrics
    tracker = None
    if dist.is_main:
        run_file = out / RUN_FILE
        if resuming and run_file.is_file():
            tracker = Tracker.attach(json.loads(run_file.read_text()), autoflush=autoflush, outbox=outbox,
                                     writer=writer_name(0), timeout_s=tc.timeout_s)
            tracker.set_status("RUNNING")
            tracker.set_tags(slurm_tags())
        else:
            tracker = _start_run(tc, out, job, outbox, autoflush)
        tracker.log_artifact(out / "config.yaml", "config")
        tracker.write_info(out)
        tracker.checkpoint_artifacts = tc.log_checkpoint
    info = _broadcast(tracker.info() if tracker else None, dist)
    if tracker is None:
        if tc.system_metrics_every_s > 0:
            tracker = Tracker.attach(info, autoflush=autoflush, outbox=outbox, writer=writer_name(dist.rank),
                                     timeout_s=tc.timeout_s, records=False)
        else:
            tracker = Tracker(info["tracking_uri"], info["experiment"], enabled=False)
    device = dist.device.index if getattr(dist.device, "type", "cpu") == "cuda" else None
    tracker.start_system_metrics(f"{socket.gethostname()}-rank{dist.rank}", tc.system_metrics_every_s, device)
    return tracker


def _start_run(tc: TrackingConfig, out: Path, job: JobRecord, outbox: Path, autoflush: bool) -> Tracker:
    tracker = Tracker(resolve_tracking_uri(tc.tracking_uri, out), tc.experiment, autoflush=autoflush,
                      outbox=outbox, writer=writer_name(0), timeout_s=tc.timeout_s)
    sweep, parent = sweep_of(tc)
    name = tc.run_name
    if name is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        name = f"task-{os.environ['SLURM_ARRAY_TASK_ID']}"
    git = git_state()
    tags = {**slurm_tags(), "ldot.task": job.task, "ldot.output_dir": str(out.resolve()),
            "mlflow.source.name": "ldot train", "mlflow.user": _user()}
    if git:
        tags["mlflow.source.git.commit"] = git["git.commit"]
    tracker.start(name, tags=tags, sweep=sweep, parent_run_id=parent)
    tracker.log_params(job_params(job))
    tracker.log_text(json.dumps(job.ds_config, indent=2, default=str), "config/deepspeed.json")
    if job.deepspeed_source.is_file():
        tracker.log_artifact(job.deepspeed_source, "config/deepspeed_source")
    for split, manifest in _manifests(job).items():
        tracker.log_artifact(manifest, f"data/{split}")
    return tracker


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _broadcast(info: dict | None, dist) -> dict:
    if dist.world_size == 1:
        return info
    import torch.distributed

    box = [info]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
