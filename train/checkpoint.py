"""Resumable checkpoints: DeepSpeed's save/load plus the loader state of every rank, the trainer's
own state and the resolved config; a checkpoint counts only once its COMPLETE marker exists.

A crash during a save leaves a tag directory without the marker, which `--resume auto` ignores and
the next save removes, so the newest complete checkpoint is never a broken one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from train.errors import ConfigError

log = logging.getLogger("ldot.checkpoint")

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int, rank: int):
        self.dir = Path(directory)
        self.keep_last, self.rank = keep_last, rank

    # -- discovery ---------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(tags)

    def resolve(self, resume: str | None) -> str | None:
        """None/'none' -> fresh start; 'auto' -> newest complete tag or None; else a tag or a path."""
        if resume in (None, "", "none"):
            return None
        if resume == "auto":
            tags = self.complete_tags()
            return tags[-1] if tags else None
        path = Path(resume)
        tag = path.name if path.is_dir() else resume
        if not (self.dir / tag / COMPLETE).is_file():
            raise ConfigError(f"--resume {resume}: no complete checkpoint {self.dir / tag}")
        return tag

    # -- save / load -------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any], loader_state: dict[str, Any]) -> Path:
        tag = tag_for(step)
        path = self.dir / tag
        if self.rank == 0 and path.exists():  # a leftover of a crashed save of this same step
            shutil.rmtree(path)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        _atomic_write(path / f"loader-rank{self.rank:05d}.json", json.dumps(loader_state))
        dist.barrier()  # every rank's files are on disk before the marker
        if self.rank == 0:
            _atomic_write(path / TRAINER_STATE, json.dumps(trainer_state, indent=2))
            _atomic_write(path / COMPLETE, "")
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s", path)
        return path

    def load(self, engine, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        path = self.dir / tag
        load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag)
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {path}")
        loader_file = path / f"loader-rank{self.rank:05d}.json"
        if not loader_file.is_file():
            raise ConfigError(f"{path} has no loader state for rank {self.rank}: resume with the world size "
                              f"it was saved with")
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        return trainer_state, json.loads(loader_file.read_text())

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and incomplete leftovers."""
        complete = self.complete_tags()
        newest = complete[-1] if complete else ""
        for p in self.dir.iterdir():
            if not _TAG.match(p.name):
                continue
            stale = p.name in complete[:-self.keep_last] if self.keep_last > 0 else False
            broken = not (p / COMPLETE).is_file() and p.name < newest
            if stale or broken:
                shutil.rmtree(p, ignore_errors=True)
