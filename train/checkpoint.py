"""Resumable checkpoints: DeepSpeed's save/load plus the loader state of every rank, the trainer's
own state and the resolved config; a checkpoint counts only once its COMPLETE marker exists.

A crash during a save leaves a tag directory without the marker, which `--resume auto` ignores and
the next save removes, so the newest complete checkpoint is never a broken one.

Resuming on another number of ranks (a requeued job that came back with fewer or more GPUs): the
checkpoint is written as always, by the ranks of its job; `load` on a different world size converts it
once with DeepSpeed's universal checkpoint (`ds_to_universal`, into `<tag>/universal/`: every
parameter's fp32 weights and Adam moments whole, world-size free) and loads that (`load_universal`), so
weights, optimizer state, step count and lr schedule continue exactly under ZeRO-1, -2 and -3 (ZeRO-0
keeps its whole optimizer state in one file and loads as it is). The loader continues from every old
rank's position (ldot.data.loader: the run's sample layout is kept, the global batch must be too). The
old ranks' RNG streams cannot be split or joined: each rank's generators are seeded from (seed, step,
rank) instead, so dropout draws after such a resume are new ones (with dropout off the run continues as
the uninterrupted one does, to float summation order).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
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
UNIVERSAL = "universal"  # <tag>/universal: the world-size-free form, made on the first resume elsewhere
_TAG = re.compile(r"^step-(\d{8})$")
_RANK_FILE = re.compile(r"^rank(\d{5})\.pt$")
# How long the other ranks wait for rank 0's conversion to a universal checkpoint (minutes for a large
# model: longer than the process group's timeout, so it gets a group of its own).
CONVERT_TIMEOUT = datetime.timedelta(hours=2)


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


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Fresh generators for a rank that has no saved stream of its own (a resume on another world size)."""
    digest = hashlib.sha256(f"ldot-rng/{seed}/{step}/{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))  # CUDA's generators too


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
    def save(self, engine, step: int, trainer_state: dict[str, Any], loader_state: dict[str, Any],
             files: dict[str, bytes] | None = None) -> Path:
        """All ranks call this. Rank-local state (loader position, RNG streams) goes into one file per rank;
        `files` (name -> content, the same on every rank, e.g. the mined hard negatives) are written by rank 0."""
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
            for name, content in (files or {}).items():
                write_atomic(path / name, content)
            write_atomic(path / TRAINER_STATE, json.dumps(trainer_state, indent=2))
            write_atomic(path / COMPLETE, "")
            self._prune()
        dist.barrier()
        log.info("saved checkpoint %s", path)
        return path

    def saved_world_size(self, tag: str) -> int:
        """How many ranks wrote checkpoint `tag` (one state file each; COMPLETE means all are there)."""
        ranks = sorted(int(m.group(1)) for p in (self.dir / tag).iterdir() if (m := _RANK_FILE.match(p.name)))
        if not ranks or ranks != list(range(len(ranks))):
            raise ConfigError(f"{self.dir / tag}: rank state files missing or out of order ({len(ranks)} found)")
        return len(ranks)

    def load(self, engine, tag: str, loader=None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores the engine (weights, optimizer, schedule) and this rank's RNG streams; returns
        (trainer state, the loader state to load). With `loader`, the loader state is loaded into it first,
        so that a checkpoint it cannot continue is refused before the engine's (possibly long) load.

        On the world size that wrote it: DeepSpeed's own load and this rank's own loader state and RNG
        streams. On another one: the universal form (module doc), every rank's loader state merged
        (TrainLoader.merge_states) and generators seeded from (seed, step, rank)."""
        path = self.dir / tag
        world = dist.get_world_size() if dist.is_initialized() else 1
        saved_world = self.saved_world_size(tag)
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        if saved_world == world:
            rank_state = torch.load(path / f"rank{self.rank:05d}.pt", weights_only=False)
            loader_state = rank_state["loader"]
            if loader is not None:
                loader.load_state_dict(loader_state)
            load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag)
            if load_path is None:
                raise ConfigError(f"DeepSpeed could not load checkpoint {path}")
            set_rng_state(rank_state["rng"])
            return trainer_state, loader_state

        from ldot.data.loader import TrainLoader

        loader_state = TrainLoader.merge_states(
            [torch.load(path / f"rank{r:05d}.pt", weights_only=False)["loader"] for r in range(saved_world)])
        if loader is not None:
            loader.load_state_dict(loader_state)
        log.warning("checkpoint %s was written by %d ranks, this job has %d: resuming through its universal form "
                    "(weights and optimizer state whole, the data layout and global batch kept)", path, saved_world,
                    world)
        if engine.zero_optimization_stage() == 0:  # the whole optimizer state is in the one model file
            load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag)
        else:
            universal = self._universal(tag)
            engine._config.load_universal_checkpoint = True  # what DeepSpeed's checkpoint.load_universal sets
            try:
                load_path, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL)
            finally:
                engine._config.load_universal_checkpoint = False
            if load_path is not None:
                _repair_universal_load(engine, universal)
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {path} on {world} ranks")
        seed_rng(int(trainer_state.get("config", {}).get("seed", 0)), int(trainer_state["step"]), self.rank)
        return trainer_state, loader_state

    def _universal(self, tag: str) -> Path:
        """`<tag>/universal`, made by rank 0 with DeepSpeed's ds_to_universal if it is not there yet; the
        other ranks wait for it on a group of their own (CONVERT_TIMEOUT, not the process group's)."""
        path = self.dir / tag
        out = path / UNIVERSAL
        group = dist.new_group(backend="gloo", timeout=CONVERT_TIMEOUT) if dist.is_initialized() else None
        failure = [None]
        if self.rank == 0 and not (out / COMPLETE).is_file():
            try:
                convert_to_universal(path, out)
            except Exception as exc:  # every rank must hear of it, or the others wait for ever
                failure[0] = f"could not convert {path} to a universal checkpoint: {exc}"
        if group is not None:
            dist.broadcast_object_list(failure, src=0, group=group)
            dist.destroy_process_group(group)
        if failure[0]:
            raise ConfigError(failure[0])
        return out

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


def convert_to_universal(path: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process: `path` (one tag's ZeRO checkpoint) -> `out`, with a
    COMPLETE marker last. Its progress output goes to the log at debug level; a failure keeps its tail."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # written before this code asked for the universal info: DeepSpeed's own default
                              inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal(args)
    except Exception as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc} ({chatter.getvalue()[-500:].strip()!r})") from exc
    log.debug("ds_to_universal %s:\n%s", path, chatter.getvalue())
    (out.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; tags are named here
    write_atomic(out / COMPLETE, "")
    log.info("converted %s to a universal checkpoint in %s", path, out)


def _repair_universal_load(engine, universal: Path) -> None:
    """Two things DeepSpeed 0.19.8's universal load gets wrong under ZeRO-3, put right (the ZeRO-1/2 load is
    left as it is): it copies the first parameter group's hyperparameters onto every group (no weight decay
    would become 0.01 for biases and norms), and it gives every group's Adam state one shared `step`
    tensor, which torch's AdamW then advances once per group and step (bias correction drifts)."""
    optimizer = getattr(engine.optimizer, "optimizer", None)
    if optimizer is None:
        return
    saved = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False).get("param_groups")
    if saved and len(saved) == len(optimizer.param_groups):
        for group, old in zip(optimizer.param_groups, saved):
            group.update({k: v for k, v in old.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
