"""The streaming loader: TrainLoader (infinite, seeded, exactly resumable, equal per rank) and EvalSplit.

How a training epoch is shared out (the "epoch plan"):
  * The shard list is shuffled with a seed that includes the epoch; the samples of the shuffled shards,
    end to end, are cut into ``world_size × max(1, num_workers)`` contiguous *slots* of equal size (±1).
    Slot ``rank × W + worker`` is what that rank's worker reads: this is the split by node, then by
    worker, done at sample rather than shard granularity (webdataset's `split_by_node` is shard-granular
    and reads the rank from the environment), so every slot gets the same share whatever the number
    or size of the shards, and every sample is read exactly once per epoch across all slots. A slot
    starting mid-shard skips that shard's first samples (reads, never decodes them).
  * Each slot's share is shuffled with webdataset's buffer shuffle seeded by (seed, epoch, slot), and the
    slot moves straight on to its share of the next epoch: every rank and worker streams forever, so
    every rank yields the same number of batches per step and nobody waits at an epoch's end.
    Batches are fixed-size; a batch may straddle two epochs. ``epochs=E`` makes the stream finite:
    every rank stops after E × batches_per_epoch batches (the smallest rank share decides, so no rank
    waits). ``resample=True`` draws each epoch's shards with replacement instead of permuting them.
  * Position = (epoch, how many samples of the slot's shuffled share were consumed). Each batch carries
    it back from its worker; ``state_dict()`` holds it per slot. Resuming replays the current epoch's
    share from its start through the same shuffle and drops what was already consumed (cost: at most
    one epoch share of reading and decoding per worker, once), so the batch sequence, the captions
    chosen and the skip counts are identical to an uninterrupted run's.
  * DataLoader workers hand out batches round-robin; after ``k`` batches the next one comes from worker
    ``k mod W``, so a resumed loader rotates which slot each fresh worker plays.

Stages inside a slot (webdataset's own where they fit): epoch plan → tar read (`wds.tarfile_samples`) →
`wds.shuffle` → decode (`wds.autodecode.Decoder` via `wds.map`) → validate (`wds.map`, bad samples go to
the `error`/`skip` policy) → drop replayed (`wds.select`) → caption choice and tokenization
(`wds.map`; seeded by (seed, epoch, image)) → `wds.batched` for a fixed number of pairs,
or token-budget bucketing (data/batching.py) → collate (pad text and regions, masks).

With a token budget the resume point of a batch is the start of its bucket buffer plus how many of that
buffer's batches were delivered; the buffer is rebuilt on resume and those batches are passed over.

Resuming on a different number of ranks (the *layout* rule). A run's samples are laid out once, by the
world size W0 and per-rank batch B0 of its first job: W0 × num_workers slots, and global batch k = the
k-th B0-sample batch of slot (r0 × num_workers + k mod num_workers) for r0 = 0..W0-1, end to end
(G = W0 × B0 pairs). A job that resumes on W ranks keeps that layout and the global batch: W × B must
equal G (data.batch_size is per rank, so 2 ranks × 8 become 1 rank × 16 or 4 ranks × 4), and rank r
takes pairs [r × B, (r + 1) × B) of every global batch, reading the old slots that overlap them and
keeping its part. Every slot continues from its own saved position, so the global sample sequence is
the one the uninterrupted run would have seen: no sample of the epoch is repeated or skipped, and the
batches are the same pairs (in another order across ranks, which only changes float summation order).
Fewer ranks read several slots each (the same reading in all); more ranks than W0 share a slot, each
decoding all of its samples and keeping its part (reading grows by W / W0 for that run). The layout is
kept by every later resume of the run; num_workers must stay as it was. A token-budget loader
(data.token_budget) cuts its batches per rank by token count, so it cannot change its number of ranks.
"""

from __future__ import annotations

import copy
import itertools
import os
import random
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import make_seed

from ldot.data import schema
from ldot.data.batching import bucketed, collate_images, collate_train
from ldot.data.errors import DataError
from ldot.data.reader import ErrorPolicy, read_shard

STATE_VERSION = 2  # 1: slots as a list of this rank's workers, no layout (still read)


# ------------------------------------------------------------------------------------------- epoch plan


class EpochPlan:
    """Which samples each slot reads in each epoch (pure function of seed, epoch and the manifest).

    ``resample``: each epoch draws its shards with replacement (open_clip's resampled mode) instead of
    permuting them; the draw is still cut into equal slot shares, so ranks stay equal.
    """

    def __init__(self, paths: list[str], counts: list[int], seed: int, num_slots: int, resample: bool = False):
        self.paths, self.counts, self.seed, self.num_slots, self.resample = paths, counts, seed, num_slots, resample
        self.num_samples = sum(counts)
        self.bases = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()  # global index of shard[0]
        if self.num_samples < num_slots or (resample and min(counts) * len(counts) < num_slots):
            raise DataError(f"dataset has {self.num_samples} samples, fewer than the {num_slots} readers "
                            "(world_size × num_workers) that would share it", shard=os.path.dirname(paths[0]))

    def bounds(self, slot: int, total: int | None = None) -> tuple[int, int]:
        n, s = self.num_samples if total is None else total, self.num_slots
        return slot * n // s, (slot + 1) * n // s

    def slot_size(self, slot: int) -> int:
        """Samples of the slot's share of an epoch (nominal in resampled mode)."""
        lo, hi = self.bounds(slot)
        return hi - lo

    def shard_order(self, epoch: int) -> list[int]:
        rng = random.Random(make_seed(self.seed, epoch, 0x5EED))
        if self.resample:
            return [rng.randrange(len(self.paths)) for _ in self.paths]
        order = list(range(len(self.paths)))
        rng.shuffle(order)
        return order

    def pieces(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """(shard index, start, stop) runs that make up the slot's share of the epoch."""
        order = self.shard_order(epoch)
        lo, hi = self.bounds(slot, sum(self.counts[i] for i in order))
        out, pos = [], 0
        for shard in order:
            n = self.counts[shard]
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((shard, a - pos, b - pos))
            pos += n
            if pos >= hi:
                break
        return out


# ------------------------------------------------------------------------------------------- collation


def tokenize(tokenizer, texts: list[str], max_text_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_text_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


# ------------------------------------------------------------------------------------------- one slot


@dataclass
class _SlotConfig:
    paths: list[str]
    counts: list[int]
    feature_dim: int
    class_dim: int | None
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    max_text_len: int
    shuffle_buffer: int
    on_error: str
    with_cls: bool
    token_budget: int | None
    bucket_buffer: int
    resample: bool


def fresh_slot_state() -> dict:
    # offset: samples of the epoch's share consumed (fixed batches) or passed before the current bucket buffer
    # (token budget), whose first `emitted` batches are delivered.
    return {"epoch": 0, "offset": 0, "skipped": {}, "epoch_skipped": {}, "emitted": 0}


class _SlotStream(torch.utils.data.IterableDataset):
    """The batches one (rank, worker) pair delivers, forever. Built inside the worker that runs it.

    ``parts[worker]``: the (slot, lo, hi) the worker reads, in global batch order: each batch is samples
    [lo, hi) of the slot's next layout batch (``layout_batch`` samples), for every part, end to end. Without
    a change of world size that is one part, (rank × W + worker, 0, batch_size). ``starts``: slot -> position."""

    def __init__(self, cfg: _SlotConfig, tokenizer, starts: dict[int, dict], rotation: int,
                 parts: list[list[tuple[int, int, int]]], layout_world: int, layout_batch: int | None):
        super().__init__()
        self.cfg, self.tokenizer, self.starts, self.rotation = cfg, tokenizer, starts, rotation
        self.parts, self.layout_world, self.layout_batch = parts, layout_world, layout_batch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        nw = max(1, self.cfg.num_workers)
        worker = (physical + self.rotation) % nw  # the logical worker (slot) this process plays, see module doc
        try:
            yield from self._batches(worker)
        except DataError as err:  # crosses the process boundary as data: the main process re-raises it cleanly
            yield {"__error__": (err.problem, err.shard, err.key, err.reason)}

    def _batches(self, worker: int) -> Iterator[dict]:
        cfg = self.cfg
        nw = max(1, cfg.num_workers)
        plan = EpochPlan(cfg.paths, cfg.counts, cfg.seed, self.layout_world * nw, cfg.resample)
        pad_id = self.tokenizer.pad_token_id
        parts = self.parts[worker]
        if cfg.token_budget is not None:
            ((slot, _, _),) = parts
            yield from self._budget_batches(slot, plan)
            return

        def lists(slot: int) -> Iterator[list[dict]]:
            return wds.batched(self.layout_batch, collation_fn=list, partial=False)(self._samples(slot, plan))

        for chunks in zip(*(lists(slot) for slot, _, _ in parts)):
            samples = [x for chunk, (_, lo, hi) in zip(chunks, parts) for x in chunk[lo:hi]]
            batch = collate_train(samples, pad_id, cfg.with_cls)
            batch["__state__"] = {slot: dict(chunk[-1]["__state__"], emitted=0)
                                  for chunk, (slot, _, _) in zip(chunks, parts)}
            yield batch

    def _budget_batches(self, slot: int, plan: EpochPlan) -> Iterator[dict]:
        cfg, start = self.cfg, self.starts[slot]
        pad_id = self.tokenizer.pad_token_id

        def budget_batch(item) -> dict:
            samples, first, last, j = item
            batch = collate_train(samples, pad_id, cfg.with_cls)
            epoch, pos, epoch_skipped = first["__pos__"]
            # Resume point: just before the buffer, plus how many of its batches are out.
            batch["__state__"] = {slot: {"epoch": epoch, "offset": pos - 1, "epoch_skipped": epoch_skipped,
                                         "emitted": j + 1, "skipped": last["__state__"]["skipped"]}}
            return batch

        def rng_for(first: dict) -> random.Random:
            return random.Random(make_seed(cfg.seed, *first["__pos__"][:2], slot, 0xB0C))

        yield from wds.DataPipeline(
            lambda: self._samples(slot, plan),
            lambda src: bucketed(src, budget=cfg.token_budget, buffer=cfg.bucket_buffer, rng_for=rng_for,
                                 skip_first=start.get("emitted", 0)),
            wds.map(budget_batch))

    def _samples(self, slot: int, plan: EpochPlan) -> Iterator[dict]:
        """The slot's valid, prepared samples after its start position, forever; each carries its
        ``__state__`` (the slot's position once it is consumed)."""
        cfg = self.cfg
        nw = max(1, cfg.num_workers)
        start = self.starts[slot]
        where = f"rank {slot // nw} worker {slot % nw}"
        # Counts restart from the epoch's start: the replay below re-meets the same bad samples.
        policy = ErrorPolicy(cfg.on_error, where=where, counts=dict(start["epoch_skipped"]))
        valid_in_epoch: dict[int, int] = {}

        def raw_samples() -> Iterator[dict]:
            for epoch in count(start["epoch"]):
                if epoch - 1 in valid_in_epoch and valid_in_epoch[epoch - 1] == 0:
                    raise DataError(f"every sample of {where}'s share of epoch {epoch - 1} was bad "
                                    f"(skipped so far: {dict(policy.counts)})", shard=os.path.dirname(cfg.paths[0]))
                valid_in_epoch[epoch] = 0
                epoch_skipped = dict(policy.counts)

                def stream():
                    for shard, a, b in plan.pieces(epoch, slot):
                        for i, raw in enumerate(read_shard(cfg.paths[shard], policy, start=a, stop=b,
                                                           expected=cfg.counts[shard])):
                            raw["__index__"] = plan.bases[shard] + a + i  # stable image id: its place in the dataset
                            yield raw

                rng = random.Random(make_seed(cfg.seed, epoch, slot, 0x5AFF))
                shuffled = wds.shuffle(bufsize=cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(stream())
                for pos, raw in enumerate(shuffled, start=1):
                    raw["__pos__"] = (epoch, pos, epoch_skipped)
                    yield raw

        def validated(sample: dict) -> dict:
            schema.check_sample(sample, cfg.feature_dim, cfg.class_dim if cfg.with_cls else None)
            epoch, pos, epoch_skipped = sample["__pos__"]
            valid_in_epoch[epoch] += 1
            sample["__state__"] = {"epoch": epoch, "offset": pos, "skipped": dict(policy.counts),
                                   "epoch_skipped": epoch_skipped}
            return sample

        def not_replayed(sample: dict) -> bool:
            epoch, pos, _ = sample["__pos__"]
            return (epoch, pos) > (start["epoch"], start["offset"])

        def prepare(sample: dict) -> dict:
            """Caption choice and tokenization: functions of (seed, epoch, image), not of position or worker."""
            rng = random.Random(make_seed(cfg.seed, sample["__pos__"][0], sample["__index__"]))
            caps = sample[schema.META]["captions"]
            sample["__caption__"] = rng.randrange(len(caps))  # which of the image's captions: its mined negatives
            caption = caps[sample["__caption__"]]
            sample["__ids__"] = self.tokenizer(caption, truncation=True, max_length=cfg.max_text_len)["input_ids"]
            return sample

        return iter(wds.DataPipeline(
            raw_samples,
            wds.map(schema.decode_sample, handler=policy),
            wds.map(validated, handler=policy),
            wds.select(not_replayed),
            wds.map(prepare),
        ))


# ------------------------------------------------------------------------------------------- train loader


class TrainLoader:
    """Infinite iterable of training batches for one rank; see the module docstring for the epoch plan.

    Batch (torch tensors): input_ids / attention_mask [B, L] int64 (one random caption per image per
    epoch), img_feat [B, N, D] float32, img_pos [B, N, 7] float32 (x1,y1,x2,y2,w,h,area), img_mask [B, N]
    int64 (1 = real region), group_ids [B] int64 (the image's index in the dataset), caption_index [B] int64
    (which of the image's captions), image_id list[str].
    Optional key: img_cls [B, N, C] float32 (``with_cls``). VMLM/SMRM masks are not drawn here: the
    trainer draws them on the device for the step's task only (train/objectives.py).

    Batching: ``batch_size`` pairs, or (``batch_size=None, token_budget=T``) as many as fit in T padded
    tokens + regions, length-bucketed over ``bucket_buffer`` samples; batch sizes then vary per step and
    per rank (the number of batches per step stays equal: one).
    """

    def __init__(self, data_dir, tokenizer, *, batch_size: int | None, max_text_len: int = 32, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, on_error: str = "skip",
                 shuffle_buffer: int = 256, with_cls: bool = False, token_budget: int | None = None,
                 bucket_buffer: int = 512,
                 resample: bool = False, epochs: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if (batch_size is None) == (token_budget is None):
            raise ValueError("give exactly one of batch_size and token_budget")
        if (batch_size or token_budget) < 1:
            raise ValueError(f"batch_size / token_budget must be positive, not {batch_size or token_budget}")
        if epochs is not None and batch_size is None:
            raise ValueError("finite epochs need a fixed batch_size (with a token budget the count is not known ahead)")
        self.data_dir = Path(data_dir)
        self.manifest = schema.read_manifest(self.data_dir)
        if with_cls and self.manifest.class_dim is None:
            raise DataError("with_cls asked for, but the dataset has no cls.npy (manifest class_dim is null)",
                            shard=str(self.data_dir))
        self.tokenizer = tokenizer
        self.cfg = _SlotConfig(
            paths=schema.shard_paths(self.data_dir, self.manifest), counts=[s.samples for s in self.manifest.shards],
            feature_dim=self.manifest.feature_dim, class_dim=self.manifest.class_dim, seed=seed, rank=rank,
            world_size=world_size, num_workers=num_workers, batch_size=batch_size, max_text_len=max_text_len,
            shuffle_buffer=shuffle_buffer, on_error=on_error, with_cls=with_cls, token_budget=token_budget,
            bucket_buffer=bucket_buffer, resample=resample)
        self.epochs = epochs
        ErrorPolicy(on_error)  # validates the policy name now, not in a worker
        self._set_layout(world_size, batch_size)
        self._slots = {slot: fresh_slot_state() for slot in self._my_slots()}
        self._batches = 0

    # -- layout: which slots this rank reads, and which part of each (module doc) --------------------------
    def _set_layout(self, world: int, batch: int | None) -> None:
        """The run's sample layout: the world size and per-rank batch its samples were laid out for."""
        c = self.cfg
        nw = max(1, c.num_workers)
        self.layout_world, self.layout_batch = world, batch
        self.plan = EpochPlan(c.paths, c.counts, c.seed, world * nw, c.resample)
        if batch is None:  # token budget: only ever this rank's own slots, whole
            self._parts = [[(c.rank * nw + w, 0, 0)] for w in range(nw)]
            return
        lo, hi = c.rank * c.batch_size, (c.rank + 1) * c.batch_size  # this rank's pairs of the global batch
        self._parts = [[(r0 * nw + w, max(lo, r0 * batch) - r0 * batch, min(hi, (r0 + 1) * batch) - r0 * batch)
                        for r0 in range(lo // batch, (hi - 1) // batch + 1)] for w in range(nw)]

    def _my_slots(self) -> list[int]:
        return [slot for parts in self._parts for slot, _, _ in parts]

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches per epoch, the same on every rank: the smallest share of a layout rank // its batch (what a
        share has beyond that carries over into the next epoch, nothing is dropped). None with a token budget."""
        c = self.cfg
        if c.batch_size is None:
            return None
        nw = max(1, c.num_workers)
        return min(sum(self.plan.slot_size(r * nw + w) for w in range(nw))
                   for r in range(self.layout_world)) // self.layout_batch

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far (policy ``skip``), per reason, as of the last batch yielded, in the slots
        whose first part this rank reads (a slot shared by several ranks is counted once)."""
        total: dict[str, int] = {}
        for parts in self._parts:
            for slot, lo, _ in parts:
                if lo == 0:
                    for reason, n in self._slots[slot]["skipped"].items():
                        total[reason] = total.get(reason, 0) + n
        return {k: v for k, v in sorted(total.items()) if v}

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's slots is still in."""
        return min(s["epoch"] for s in self._slots.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        nw = self.cfg.num_workers
        stream = _SlotStream(self.cfg, self.tokenizer, copy.deepcopy(self._slots), rotation=self._batches % max(1, nw),
                             parts=self._parts, layout_world=self.layout_world, layout_batch=self.layout_batch)
        if nw == 0:
            source = iter(stream)
        else:
            # Forked workers inherit a used Rust tokenizer; its own thread pool must stay off there.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            source = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=nw))
        workers = source if nw else None
        if self.epochs is not None:  # finite: every rank stops after the same number of batches
            source = itertools.islice(source, max(0, self.epochs * self.batches_per_epoch - self._batches))
        try:
            for batch in source:
                if "__error__" in batch:
                    problem, shard, key, reason = batch["__error__"]
                    raise DataError(problem, shard=shard, key=key, reason=reason)
                self._slots.update(batch.pop("__state__"))
                self._batches += 1
                yield batch
        finally:
            # Stop the workers now, not whenever the garbage collector meets an abandoned iterator: left to
            # the collector, its shutdown can wait 5 s per worker for workers that never got the stop signal.
            shutdown = getattr(workers, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position of this rank's stream after the last batch yielded (every slot it reads, by slot index, and
        the run's layout); save it with the checkpoint. ``merge_states`` of every rank's resumes on any
        number of ranks."""
        return {"version": STATE_VERSION, "batches": self._batches, "slots": copy.deepcopy(self._slots),
                "rank": self.cfg.rank, "world_size": self.cfg.world_size, "batch_size": self.cfg.batch_size,
                "layout": {"world_size": self.layout_world, "batch_size": self.layout_batch}, **self._identity()}

    def _identity(self) -> dict:
        """What must not change between save and resume, whatever the number of ranks, for the sample
        sequence to be the same."""
        c = self.cfg
        return {"seed": c.seed, "num_workers": c.num_workers, "token_budget": c.token_budget,
                "bucket_buffer": c.bucket_buffer, "shuffle_buffer": c.shuffle_buffer, "resample": c.resample,
                "num_samples": self.num_samples, "shards": [os.path.basename(p) for p in c.paths]}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state from every rank's (in rank order): the positions of all the run's slots. A loader on any
        number of ranks loads it (load_state_dict) and takes the slots it reads."""
        if "mix" in states[0]:  # several training sets (ldot.data.mixing): merged set by set
            from ldot.data.mixing import MixedLoader

            return MixedLoader.merge_states(states)
        states = [_upgrade(s) for s in states]
        first = states[0]
        for s in states[1:]:
            diff = [k for k in ("batches", "layout", "world_size", "version") if s.get(k) != first.get(k)]
            if diff:
                raise DataError(f"the ranks' loader states disagree on {', '.join(diff)}: not one run's checkpoint")
        slots: dict[int, dict] = {}
        for s in states:
            for slot, pos in s["slots"].items():
                slots.setdefault(int(slot), pos)  # ranks sharing a slot read it in step: equal positions
        return {**first, "slots": slots, "rank": None}

    def load_state_dict(self, state: dict) -> None:
        """This rank's own state (same world size), or ``merge_states`` of every rank's (any world size)."""
        state = _upgrade(state)
        c = self.cfg
        mine = {"version": STATE_VERSION, **self._identity()}
        diff = [f"{k} {state.get(k)!r} (this loader: {v!r})" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise DataError("loader state does not fit this loader, exact resume impossible: " + "; ".join(diff),
                            shard=str(self.data_dir))
        world0, batch0 = state["layout"]["world_size"], state["layout"]["batch_size"]
        saved_world, saved_batch = state["world_size"], state["batch_size"]
        if state["rank"] is not None and (state["rank"], saved_world) != (c.rank, c.world_size):
            raise DataError(f"loader state of rank {state['rank']} of {saved_world} given to rank {c.rank} of "
                            f"{c.world_size}: merge every rank's state first (TrainLoader.merge_states)",
                            shard=str(self.data_dir))
        if c.token_budget is not None and (world0, saved_world) != (c.world_size, c.world_size):
            raise DataError(f"data.token_budget: the checkpoint was written by {saved_world} ranks and a token-budget "
                            f"loader cuts its batches per rank by token count, so it cannot continue on "
                            f"{c.world_size}: resume on {saved_world} ranks (or use a fixed data.batch_size)",
                            shard=str(self.data_dir))
        if c.token_budget is None:
            g = world0 * batch0
            if c.world_size * c.batch_size != g:
                fix = (f"set data.batch_size={g // c.world_size} to keep it" if g % c.world_size == 0 else
                       f"{g} pairs cannot be split evenly over {c.world_size} ranks")
                raise DataError(f"the checkpoint's global batch is {g} pairs ({saved_world} ranks x data.batch_size="
                                f"{saved_batch}); {c.world_size} ranks x data.batch_size={c.batch_size} would change "
                                f"it: {fix}", shard=str(self.data_dir))
        self._set_layout(world0, batch0)
        missing = [slot for slot in self._my_slots() if slot not in state["slots"]]
        if missing:
            raise DataError(f"the loader state has no position for slots {missing} (rank states missing?)",
                            shard=str(self.data_dir))
        self._slots = {slot: copy.deepcopy(state["slots"][slot]) for slot in self._my_slots()}
        self._batches = int(state["batches"])


class LoaderAdapter:
    """Another loader's batches, each transformed by ``adapt``; that loader's state is the whole state, so the
    adapter checkpoints and resumes exactly as it does (the trainer's hard-negative and re-ranker batches)."""

    def __init__(self, loader):
        self.loader = loader

    @property
    def skipped(self) -> dict[str, int]:
        return self.loader.skipped

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        for batch in self.loader:
            yield self.adapt(batch)

    def adapt(self, batch: dict) -> dict:
        raise NotImplementedError


def _upgrade(state: dict) -> dict:
    """A version-1 state (this rank's workers' positions as a list, no layout) in today's form."""
    if state.get("version") != 1:
        return state
    nw = max(1, state["num_workers"])
    state = {k: v for k, v in state.items()}
    state["slots"] = {state["rank"] * nw + w: pos for w, pos in enumerate(state["slots"])}
    state["layout"] = {"world_size": state["world_size"], "batch_size": state["batch_size"]}
    state["version"] = STATE_VERSION
    return state


# ------------------------------------------------------------------------------------------- evaluation


class EvalSplit:
    """A whole split in shard order: every image once, every caption (for recall).

    Captions and ids are read up front (json members only); features stream from the shards on each
    ``image_batches`` call. Bad input is always an error here: a skipped image would shift every index.
    """

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.manifest = schema.read_manifest(self.data_dir)
        self.paths = schema.shard_paths(self.data_dir, self.manifest)
        self.feature_dim = self.manifest.feature_dim
        self.image_ids: list[str] = []
        self.keys: list[str] = []
        self.captions: list[str] = []
        owner: list[int] = []
        policy = ErrorPolicy("error")
        for path, info in zip(self.paths, self.manifest.shards):
            for raw in read_shard(path, policy, expected=info.samples, select_files=lambda f: f.endswith(".json")):
                try:
                    meta = schema._DECODER({"__key__": raw["__key__"], schema.META: raw[schema.META]})[schema.META]
                except (KeyError, wds.autodecode.DecodingError):
                    raise DataError("json member missing or not JSON", shard=path, key=raw.get("__key__"),
                                    reason="invalid_json") from None
                problems = schema.validate_meta(meta)
                if problems:
                    raise DataError(problems[0][1], shard=path, key=raw["__key__"], reason=problems[0][0])
                owner += [len(self.image_ids)] * len(meta["captions"])
                self.image_ids.append(meta["image_id"])
                self.keys.append(raw["__key__"])
                self.captions.extend(meta["captions"])
        self.caption_image = np.asarray(owner, dtype=np.int64)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def image_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """img_feat [b, N, D] float32, img_pos [b, N, 7], img_mask [b, N] int64, in image order."""
        policy = ErrorPolicy("error")
        batch: list[dict] = []
        i = 0
        for path, info in zip(self.paths, self.manifest.shards):
            for raw in read_shard(path, policy, expected=info.samples):
                sample = schema.check_sample(schema.decode_sample(raw), self.feature_dim)
                if raw["__key__"] != self.keys[i]:
                    raise DataError(f"sample {i} is key {raw['__key__']}, the caption pass saw {self.keys[i]}",
                                    shard=path, key=raw["__key__"])
                i += 1
                batch.append(sample)
                if len(batch) == batch_size:
                    yield collate_images(batch)
                    batch = []
        if batch:
            yield collate_images(batch)

    def text_batches(self, tokenizer, batch_size: int, max_text_len: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """input_ids / attention_mask [b, L] int64, in caption order (caption c belongs to caption_image[c])."""
        for i in range(0, len(self.captions), batch_size):
            yield tokenize(tokenizer, self.captions[i:i + batch_size], max_text_len)


def load_eval_split(data_dir) -> EvalSplit:
    return EvalSplit(data_dir)
