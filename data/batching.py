"""Batch formation and collation: a fixed number of pairs, or a token budget with length bucketing.

Token budget (the paper's 10,240 tokens + regions per GPU): a batch's cost is what it occupies once
padded, ``B × (max text length + max regions)``. Samples are gathered in a bucket buffer, sorted by
(regions, text length), cut greedily into batches under the budget, and the batches are emitted in a
seeded random order, so similar lengths share a batch and little is spent on padding.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

import numpy as np
import torch

from ldot.data import schema


def pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] int64 padded with ``value`` and its attention mask (1 = real token)."""
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), value, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)


def collate_images(samples: list[dict], with_cls: bool = False) -> dict[str, torch.Tensor]:
    """Pad decoded samples to the largest region count; img_mask marks real regions."""
    n = max(s[schema.FEAT].shape[0] for s in samples)
    d = samples[0][schema.FEAT].shape[1]
    b = len(samples)
    feat = np.zeros((b, n, d), np.float32)
    pos = np.zeros((b, n, 7), np.float32)
    mask = np.zeros((b, n), np.int64)
    cls = np.zeros((b, n, samples[0][schema.CLS].shape[1]), np.float32) if with_cls else None
    for i, s in enumerate(samples):
        k = s[schema.FEAT].shape[0]
        feat[i, :k] = s[schema.FEAT]
        pos[i, :k] = schema.region_positions(s[schema.BOX])
        mask[i, :k] = 1
        if with_cls:
            cls[i, :k] = s[schema.CLS]
    out = {"img_feat": torch.from_numpy(feat), "img_pos": torch.from_numpy(pos), "img_mask": torch.from_numpy(mask)}
    if with_cls:
        out["img_cls"] = torch.from_numpy(cls)
    return out


def collate_train(samples: list[dict], pad_id: int, with_cls: bool = False) -> dict:
    """Training samples (tokenized in ``__ids__``) → the batch dict."""
    ids, attention = pad([s["__ids__"] for s in samples], pad_id)
    batch = {"input_ids": ids, "attention_mask": attention}
    batch.update(collate_images(samples, with_cls))
    batch["group_ids"] = torch.tensor([s["__index__"] for s in samples], dtype=torch.int64)
    batch["caption_index"] = torch.tensor([s.get("__caption__", 0) for s in samples], dtype=torch.int64)
    batch["image_id"] = [s[schema.META]["image_id"] for s in samples]
    return batch


def cost(sample: dict) -> tuple[int, int]:
    return sample[schema.FEAT].shape[0], len(sample["__ids__"])


def budget_batches(samples: list[dict], budget: int) -> list[list[dict]]:
    """Sort by (regions, text length); cut greedily so that B × (max regions + max text length) ≤ budget.
    A sample that alone exceeds the budget becomes a batch of one."""
    ordered = sorted(samples, key=cost)
    batches, current, width = [], [], 0
    for s in ordered:
        w = sum(cost(s))
        if current and (len(current) + 1) * max(width, w) > budget:
            batches.append(current)
            current, width = [], 0
        current.append(s)
        width = max(width, w)
    if current:
        batches.append(current)
    return batches


def bucketed(data: Iterator[dict], *, budget: int, buffer: int, rng_for: Callable[[dict], random.Random],
             skip_first: int = 0) -> Iterator[tuple[list[dict], dict, dict, int]]:
    """(batch, the buffer's first and last samples, index of the batch in the buffer's order), endlessly.

    ``rng_for(first sample)`` orders each buffer's batches; ``skip_first`` drops batches of the first buffer
    that a resumed loader has already delivered.
    """
    while True:
        pool = [s for _, s in zip(range(buffer), data)]
        if not pool:
            return
        batches = budget_batches(pool, budget)
        rng_for(pool[0]).shuffle(batches)
        for j, batch in enumerate(batches):
            if j >= skip_first:
                yield batch, pool[0], pool[-1], j
        skip_first = 0
