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

import torch
import torch.distributed as dist

from ldot.files import write_atomic
from ldot.train.errors import ConfigError

log = logging.getLogger("ldot.checkpoint")

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Torch's CPU and CUDA generators: dropout draws from them, so an exact resume restores them."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int, rank: int, *, every_steps: int = 0,
                 max_steps: int | None = None):
        self.dir = Path(directory)
        self.keep_last, self.rank = keep_last, rank
        self.every_steps, self.max_steps = every_steps, max_steps

    def due(self, step: int) -> bool:
        """Every `checkpoint.every_steps` steps and at the last step; never when every_steps is 0."""
        return bool(self.every_steps) and (step % self.every_steps == 0 or step == self.max_steps)

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
        """All ranks call this. Rank-local state (loader position, RNG streams) goes into one file per rank."""
        tag = tag_for(step)
        path = self.dir / tag
        if self.rank == 0 and path.exists():  # a leftover of a crashed save of this same step
            shutil.rmtree(path)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        rank_file = path / f"rank{self.rank:05d}.pt"
        torch.save({"loader": loader_state, "rng": rng_state()}, rank_file.with_suffix(".tmp"))
        os.replace(rank_file.with_suffix(".tmp"), rank_file)
        dist.barrier()  # every rank's files are on disk before the marker
        if self.rank == 0:
            write_atomic(path / TRAINER_STATE, json.dumps(trainer_state, indent=2))
            write_atomic(path / COMPLETE, "")
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s", path)
        return path

    def load(self, engine, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores the engine (weights, optimizer, schedule) and this rank's RNG streams; returns
        (trainer state, this rank's loader state)."""
        path = self.dir / tag
        rank_file = path / f"rank{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise ConfigError(f"{path} has no state for rank {self.rank}: resume with the world size it was "
                              f"saved with")
        load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag)
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {path}")
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state["rng"])
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        return trainer_state, rank_state["loader"]

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
