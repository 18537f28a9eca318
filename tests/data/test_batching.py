"""data/batching.py and the loader's token-budget mode: budget respected, coverage, exact resume, less padding."""

import itertools
import random

import numpy as np
import pytest
import torch

from datafixtures import write_random_dataset
from ldot.data.batching import budget_batches, pad
from ldot.data.loader import TrainLoader


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def padded_cost(batch):
    return batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] + batch["img_mask"].shape[1])


def real_cost(batch):
    return int(batch["attention_mask"].sum() + batch["img_mask"].sum())


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """Region counts 2..40 and captions of 3..20 words: lengths worth bucketing."""
    out = write_random_dataset(tmp_path_factory.mktemp("varied") / "ds", 120, shard_size=25, regions=(2, 40))
    return out


def test_pad():
    ids, mask = pad([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_budget_batches_respect_the_budget_and_sort():
    rng = random.Random(0)
    samples = [{"feat.npy": np.zeros((rng.randint(1, 30), 2)), "__ids__": [0] * rng.randint(2, 20)} for _ in range(200)]
    batches = budget_batches(samples, 200)
    assert sorted(id(s) for b in batches for s in b) == sorted(id(s) for s in samples)
    for b in batches:
        width = max(s["feat.npy"].shape[0] + len(s["__ids__"]) for s in b)
        assert len(b) * width <= 200 or len(b) == 1
    big = [{"feat.npy": np.zeros((300, 2)), "__ids__": [0, 0]}]
    assert budget_batches(big, 200) == [big]  # too big alone: a batch of one, never dropped


def test_token_budget_loader(varied, tokenizer):
    loader = TrainLoader(varied, tokenizer, batch_size=None, token_budget=400, bucket_buffer=40, seed=3)
    batches = take(loader, 40)
    assert loader.batches_per_epoch is None
    assert all(padded_cost(b) <= 400 or b["input_ids"].shape[0] == 1 for b in batches)
    assert len({b["input_ids"].shape[0] for b in batches}) > 2  # sizes adapt to lengths
    # The first 120 samples delivered are epoch 0: every image once.
    ids = torch.cat([b["group_ids"] for b in batches]).tolist()
    assert sorted(ids[:120]) == list(range(120))


def test_token_budget_pads_less_than_fixed_batches(varied, tokenizer):
    budget = TrainLoader(varied, tokenizer, batch_size=None, token_budget=600, bucket_buffer=120)
    tb = take(budget, 30)
    mean_size = round(np.mean([b["input_ids"].shape[0] for b in tb]))
    fixed = take(TrainLoader(varied, tokenizer, batch_size=mean_size), 30)
    def eff(bs):
        return sum(real_cost(b) for b in bs) / sum(padded_cost(b) for b in bs)

    assert eff(tb) > eff(fixed) + 0.1, (eff(tb), eff(fixed))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_token_budget_exact_resume(varied, tokenizer, num_workers):
    kw = dict(batch_size=None, token_budget=300, bucket_buffer=16, seed=5, num_workers=num_workers, world_size=2)
    def fp(b):
        return b["group_ids"].tolist(), b["input_ids"].tolist()

    full = [fp(b) for b in take(TrainLoader(varied, tokenizer, **kw), 30)]
    for cut in (3, 11, 17):
        first = TrainLoader(varied, tokenizer, **kw)
        head = [fp(b) for b in take(first, cut)]
        resumed = TrainLoader(varied, tokenizer, **kw)
        resumed.load_state_dict(first.state_dict())
        assert head + [fp(b) for b in take(resumed, 30 - cut)] == full, cut
