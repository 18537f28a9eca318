"""The training job's MLflow run: rank 0 starts (or continues) it with what defines the job, and the
other ranks attach for their system metrics."""
from __future__ import annotations

import getpass
import json
import os
import socket
from pathlib import Path
from typing import Any

from ldot.tracking import RUN_FILE, Tracker, git_state, resolve_tracking_uri, slurm_tags, sweep_of
from ldot.tracking.outbox import OUTBOX_DIR, writer_name
from ldot.tracking.tracker import SLURM_PARAMS, file_sha256


def job_params(cfg, world_size: int, ds_config: dict, manifest) -> dict[str, Any]:
    """What defines a training job: the resolved config, the DeepSpeed config, the world, the code,
    the data (manifest hashes), the Slurm ids."""
    from ldot.data.schema import MANIFEST
    from ldot.train.config import flatten, to_dict

    params: dict[str, Any] = flatten(to_dict(cfg))
    params.update({"world_size": world_size, "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
                   "data.train.images": manifest.num_samples})
    params.update({f"deepspeed.{k}": v for k, v in flatten(ds_config).items()})
    params.update(git_state())
    for split in ("train", "val"):
        directory = getattr(cfg.data, split, None)
        if directory and (Path(directory) / MANIFEST).is_file():
            params[f"data.{split}.manifest_sha256"] = file_sha256(Path(directory) / MANIFEST)
    params.update({tag: os.environ[var] for var, tag in SLURM_PARAMS.items() if os.environ.get(var)})
    return params


def start_job_tracking(cfg, out: str | Path, dist, ds_config: dict, manifest, resuming: bool) -> Tracker:
    """Start (or, resuming, continue) the job's run on rank 0 and share it with every rank; returns
    this rank's Tracker. Rank 0 also writes config.yaml and mlflow_run.json into `out`."""
    from ldot.train.config import dump_config

    out, tc = Path(out), cfg.tracking
    outbox = out / OUTBOX_DIR
    autoflush = not cfg.checkpoint.every_steps
    tracker = None
    if dist.is_main:
        run_file = out / RUN_FILE
        if resuming and run_file.is_file():
            tracker = Tracker.attach(json.loads(run_file.read_text()), autoflush=autoflush, outbox=outbox,
                                     writer=writer_name(0), timeout_s=tc.timeout_s)
            tracker.set_status("RUNNING")
            tracker.set_tags(slurm_tags())
        else:
            tracker = _start_run(cfg, out, dist, ds_config, manifest, outbox, autoflush)
        dump_config(cfg, out / "config.yaml")
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


def _start_run(cfg, out: Path, dist, ds_config: dict, manifest, outbox: Path, autoflush: bool) -> Tracker:
    tc = cfg.tracking
    tracker = Tracker(resolve_tracking_uri(tc.tracking_uri, out), tc.experiment, autoflush=autoflush,
                      outbox=outbox, writer=writer_name(0), timeout_s=tc.timeout_s)
    sweep, parent = sweep_of(tc)
    name = tc.run_name
    if name is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        name = f"task-{os.environ['SLURM_ARRAY_TASK_ID']}"
    git = git_state()
    tags = {**slurm_tags(), "ldot.task": cfg.task, "ldot.output_dir": str(out.resolve()),
            "mlflow.source.name": "ldot train", "mlflow.user": _user()}
    if git:
        tags["mlflow.source.git.commit"] = git["git.commit"]
    tracker.start(name, tags=tags, sweep=sweep, parent_run_id=parent)
    tracker.log_params(job_params(cfg, dist.world_size, ds_config, manifest))
    tracker.log_text(json.dumps(ds_config, indent=2, default=str), "config/deepspeed.json")
    source = Path(cfg.engine.deepspeed_config)
    if source.is_file():
        tracker.log_artifact(source, "config/deepspeed_source")
    from ldot.data.schema import MANIFEST

    for split in ("train", "val"):
        directory = getattr(cfg.data, split, None)
        if directory and (Path(directory) / MANIFEST).is_file():
            tracker.log_artifact(Path(directory) / MANIFEST, f"data/{split}")
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
