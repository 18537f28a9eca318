"""Checks a training job's config on the batch node before any task starts, and readies its MLflow store.

Called by slurm/common.sh: `python slurm/prepare_run.py --config CONFIG [key=value ...]`.
A bad config or a missing dataset fails the job at once with the trainer's own one-line message (exit 2,
which the scripts never requeue) instead of once per task after minutes of start-up. The store is
opened under a file lock because the tasks of a sweep start together: with a fresh sqlite store each
would otherwise try to create its tables at the same moment.
Prints `key=value` lines for the script: output_dir, val, experiment, tracking_uri.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import sys
from pathlib import Path
from urllib.parse import urlparse



@contextlib.contextmanager
def _store_lock(tracking_uri: str):
    """An exclusive lock beside a local store (sqlite file, file: directory); a server needs none."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        lock = Path(tracking_uri[len("sqlite:///"):] + ".lock")
    elif parsed.scheme in ("", "file"):
        lock = Path(parsed.path or tracking_uri).with_suffix(".lock")
    else:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_store(tracking_uri: str) -> None:
    """Opens the store once, under the lock: a fresh sqlite store gets its tables here, not from every
    task of an array at the same moment. (The trainer creates the experiment itself, race-safely.)"""
    from mlflow.tracking import MlflowClient

    with _store_lock(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slurm/prepare_run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from ldot.train.config import load_config
    from ldot.train.errors import ConfigError
    from ldot.tracking import resolve_tracking_uri

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Only whether the datasets are there: the trainer validates them (and reading shards here would
    # cost the batch node torch's import time).
    for key, path in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if path and not (Path(path) / "manifest.json").is_file():
            print(f"error: {key}: no dataset at {path} (manifest.json missing)", file=sys.stderr)
            return 2
    out = Path(cfg.output_dir).resolve()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, out)
    ensure_store(uri)
    print(f"output_dir={out}")
    print(f"val={Path(cfg.data.val).resolve() if cfg.data.val else ''}")
    print(f"experiment={cfg.tracking.experiment}")
    print(f"tracking_uri={uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
