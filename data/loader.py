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

STATE_VERSION = 1


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
    """The batches of one (rank, worker) slot, forever. Built inside the worker that runs it."""

    def __init__(self, cfg: _SlotConfig, tokenizer, starts: list[dict], rotation: int):
        super().__init__()
        self.cfg, self.tokenizer, self.starts, self.rotation = cfg, tokenizer, starts, rotation

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
        slot = cfg.rank * nw + worker
        plan = EpochPlan(cfg.paths, cfg.counts, cfg.seed, cfg.world_size * nw, cfg.resample)
        start = self.starts[worker]
        where = f"rank {cfg.rank} worker {worker}"
        # Counts restart from the epoch's start: the replay below re-meets the same bad samples.
        policy = ErrorPolicy(cfg.on_error, where=where, counts=start["epoch_skipped"])
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

        pad_id = self.tokenizer.pad_token_id

        def prepare(sample: dict) -> dict:
            """Caption choice and tokenization: functions of (seed, epoch, image), not of position or worker."""
            rng = random.Random(make_seed(cfg.seed, sample["__pos__"][0], sample["__index__"]))
            caps = sample[schema.META]["captions"]
            caption = caps[rng.randrange(len(caps))]
            sample["__ids__"] = self.tokenizer(caption, truncation=True, max_length=cfg.max_text_len)["input_ids"]
            return sample

        def fixed_batch(samples: list[dict]) -> dict:
            batch = collate_train(samples, pad_id, cfg.with_cls)
            batch["__state__"] = dict(samples[-1]["__state__"], emitted=0)
            return batch

        def budget_batch(item) -> dict:
            samples, first, last, j = item
            batch = collate_train(samples, pad_id, cfg.with_cls)
            epoch, pos, epoch_skipped = first["__pos__"]
            # Resume point: just before the buffer, plus how many of its batches are out.
            batch["__state__"] = {"epoch": epoch, "offset": pos - 1, "epoch_skipped": epoch_skipped, "emitted": j + 1,
                                  "skipped": last["__state__"]["skipped"]}
            return batch

        stages = [
            raw_samples,
            wds.map(schema.decode_sample, handler=policy),
            wds.map(validated, handler=policy),
            wds.select(not_replayed),
            wds.map(prepare),
        ]
        if cfg.token_budget is None:
            stages.append(wds.batched(cfg.batch_size, collation_fn=fixed_batch, partial=False))
        else:
            def rng_for(first: dict) -> random.Random:
                return random.Random(make_seed(cfg.seed, *first["__pos__"][:2], slot, 0xB0C))

            stages += [lambda src: bucketed(src, budget=cfg.token_budget, buffer=cfg.bucket_buffer, rng_for=rng_for,
                                            skip_first=start.get("emitted", 0)),
                       wds.map(budget_batch)]
        pipeline = wds.DataPipeline(*stages)
        yield from pipeline


# ------------------------------------------------------------------------------------------- train loader


class TrainLoader:
    """Infinite iterable of training batches for one rank; see the module docstring for the epoch plan.

    Batch (torch tensors): input_ids / attention_mask [B, L] int64 (one random caption per image per
    epoch), img_feat [B, N, D] float32, img_pos [B, N, 7] float32 (x1,y1,x2,y2,w,h,area), img_mask [B, N]
    int64 (1 = real region), group_ids [B] int64 (the image's index in the dataset), image_id list[str].
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
        self.plan = EpochPlan(self.cfg.paths, self.cfg.counts, seed, world_size * max(1, num_workers), resample)
        self._slots = [fresh_slot_state() for _ in range(max(1, num_workers))]
        self._batches = 0

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches per epoch, the same on every rank: the smallest rank share // batch_size (what a share has
        beyond that carries over into the next epoch, nothing is dropped). None with a token budget."""
        c = self.cfg
        if c.batch_size is None:
            return None
        nw = max(1, c.num_workers)
        return min(sum(self.plan.slot_size(r * nw + w) for w in range(nw)) for r in range(c.world_size)) // c.batch_size

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far (policy ``skip``), per reason, as of the last batch yielded."""
        total: dict[str, int] = {}
        for slot in self._slots:
            for reason, n in slot["skipped"].items():
                total[reason] = total.get(reason, 0) + n
        return {k: v for k, v in sorted(total.items()) if v}

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's slots is still in."""
        return min(s["epoch"] for s in self._slots)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        nw = self.cfg.num_workers
        stream = _SlotStream(self.cfg, self.tokenizer, copy.deepcopy(self._slots), rotation=self._batches % max(1, nw))
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
                self._slots[self._batches % max(1, nw)] = batch.pop("__state__")
                self._batches += 1
                yield batch
        finally:
            # Stop the workers now, not whenever the garbage collector meets an abandoned iterator: left to
            # the collector, its shutdown can wait 5 s per worker for workers that never got the stop signal.
            shutdown = getattr(workers, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict:
        """Position of this rank's stream after the last batch yielded; save it with the checkpoint."""
        return {"version": STATE_VERSION, "batches": self._batches, "slots": copy.deepcopy(self._slots),
                **self._layout()}

    def _layout(self) -> dict:
        """What must not change between save and resume for the batch sequence to be the same."""
        c = self.cfg
        return {"seed": c.seed, "rank": c.rank, "world_size": c.world_size, "num_workers": c.num_workers,
                "batch_size": c.batch_size, "token_budget": c.token_budget, "bucket_buffer": c.bucket_buffer,
                "shuffle_buffer": c.shuffle_buffer, "resample": c.resample, "num_samples": self.num_samples,
                "shards": [os.path.basename(p) for p in c.paths]}

    def load_state_dict(self, state: dict) -> None:
        mine = {"version": STATE_VERSION, **self._layout()}
        diff = [f"{k} {state.get(k)!r} (this loader: {v!r})" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise DataError("loader state does not fit this loader, exact resume impossible: " + "; ".join(diff),
                            shard=str(self.data_dir))
        self._slots = copy.deepcopy(state["slots"])
        self._batches = int(state["batches"])


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
