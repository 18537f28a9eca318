"""data/loader.py: batch contract, rank split, infinite streams, the eval split."""

import itertools
import re

import numpy as np
import pytest
import torch

from data import DataError, schema
from data.loader import EpochPlan, TrainLoader, load_eval_split

KEYS = {"input_ids", "attention_mask", "img_feat", "img_pos", "img_mask", "group_ids", "image_id"}


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def caption_image(tokenizer, ids):
    """'image 17 caption 2' → 17 (the test datasets' captions name their image)."""
    return int(re.match(r"image (\d+) caption \d", tokenizer.decode(ids, skip_special_tokens=True)).group(1))


def test_batch_contract(small_dataset, tokenizer):
    (b,) = take(TrainLoader(small_dataset, tokenizer, batch_size=6), 1)
    assert set(b) == KEYS
    B, N = b["img_feat"].shape[:2]
    assert B == 6 and b["img_feat"].shape[2] == 8 and b["img_feat"].dtype == torch.float32
    assert b["img_pos"].shape == (6, N, 7) and b["img_pos"].dtype == torch.float32
    assert b["img_mask"].shape == (6, N) and b["img_mask"].dtype == torch.int64
    assert b["input_ids"].dtype == b["attention_mask"].dtype == b["group_ids"].dtype == torch.int64
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 32
    assert len(b["image_id"]) == 6
    # Masks: regions 3..6 per image, padding is zero; attention covers exactly the non-pad tokens.
    regions = b["img_mask"].sum(1)
    assert ((regions >= 3) & (regions <= 6)).all() and N == regions.max()
    pad = b["img_mask"] == 0
    assert (b["img_feat"][pad] == 0).all() and (b["img_pos"][pad] == 0).all()
    assert torch.equal(b["attention_mask"], (b["input_ids"] != tokenizer.pad_token_id).long())
    # Positions: w, h, area follow the box.
    real = b["img_pos"][~pad]
    assert torch.allclose(real[:, 4], real[:, 2] - real[:, 0]) and torch.allclose(real[:, 6], real[:, 4] * real[:, 5])
    # Caption, group id and image id all belong to the same image.
    for i in range(6):
        k = int(b["group_ids"][i])
        assert b["image_id"][i] == f"img{k}" and caption_image(tokenizer, b["input_ids"][i]) == k
        # the features were written as random normals; region count must match what was stored
    assert len(set(b["group_ids"].tolist())) == 6


def test_every_rank_streams_forever_with_disjoint_epoch_shares(small_dataset, tokenizer):
    per_rank = []
    for rank in range(3):
        loader = TrainLoader(small_dataset, tokenizer, batch_size=4, rank=rank, world_size=3, seed=1)
        assert loader.batches_per_epoch in (3, 4)  # 47 samples / 3 ranks = 15 or 16 each
        batches = take(loader, 40)  # ~10 epochs: never runs dry
        assert len(batches) == 40 and all(len(b["image_id"]) == 4 for b in batches)
        assert loader.epoch >= 9
        ids = torch.cat([b["group_ids"] for b in batches]).tolist()
        per_rank.append(ids)
    # Each rank's first 15 samples are its epoch-0 share: disjoint across ranks, 45 of the 47 images.
    firsts = [set(ids[:15]) for ids in per_rank]
    assert sum(len(s) for s in firsts) == 45 and len(set.union(*firsts)) == 45


def test_epochs_reshuffle_and_cover_everything(small_dataset, tokenizer):
    loader = TrainLoader(small_dataset, tokenizer, batch_size=47)
    e0, e1 = take(loader, 2)
    assert sorted(e0["group_ids"].tolist()) == sorted(e1["group_ids"].tolist()) == list(range(47))
    assert e0["group_ids"].tolist() != e1["group_ids"].tolist()
    same = TrainLoader(small_dataset, tokenizer, batch_size=47)
    assert torch.equal(take(same, 1)[0]["group_ids"], e0["group_ids"])  # seeded: reproducible
    other = TrainLoader(small_dataset, tokenizer, batch_size=47, seed=9)
    assert not torch.equal(take(other, 1)[0]["group_ids"], e0["group_ids"])


def test_epoch_plan_splits_at_sample_granularity():
    plan = EpochPlan([f"s{i}" for i in range(3)], [10, 10, 3], seed=0, num_slots=4)
    for epoch in range(3):
        seen = []
        for slot in range(4):
            pieces = plan.pieces(epoch, slot)
            assert sum(b - a for _, a, b in pieces) == plan.slot_size(slot) in (5, 6)
            seen += [plan.bases[s] + i for s, a, b in pieces for i in range(a, b)]
        assert sorted(seen) == list(range(23))
    with pytest.raises(DataError, match="fewer than the 30 readers"):
        EpochPlan(["s0"], [23], seed=0, num_slots=30)


def test_synth_batches(synth_dir, tokenizer):
    (b,) = take(TrainLoader(synth_dir / "train", tokenizer, batch_size=8, world_size=2, rank=1), 1)
    assert b["img_feat"].shape == (8, 49, 1280) and b["img_mask"].all()
    assert torch.allclose(b["img_pos"][0, 0], torch.tensor([0, 0, 1 / 7, 1 / 7, 1 / 7, 1 / 7, 1 / 49]))
    text = tokenizer.decode(b["input_ids"][0], skip_special_tokens=True)
    assert any(color in text for color in ("red", "green", "blue", "yellow", "purple", "orange"))


def test_eval_split(synth_dir, tokenizer):
    ev = load_eval_split(synth_dir / "test")
    assert ev.num_images == 20 and len(ev.image_ids) == 20 and len(ev.captions) == 100
    assert ev.feature_dim == 1280 and ev.caption_image.dtype == np.int64
    assert ev.caption_image.tolist() == [i for i in range(20) for _ in range(5)]
    assert ev.image_ids == [f"synth-test-{i:06d}" for i in range(20)]
    batches = list(ev.image_batches(8))
    assert [b["img_feat"].shape[0] for b in batches] == [8, 8, 4]
    assert all(set(b) == {"img_feat", "img_pos", "img_mask"} for b in batches)
    texts = list(ev.text_batches(tokenizer, 64, max_text_len=32))
    assert [t["input_ids"].shape[0] for t in texts] == [64, 36]
    assert tokenizer.decode(texts[1]["input_ids"][-1], skip_special_tokens=True) == ev.captions[-1].lower()
    # Same features as the shards hold, in the same order.
    path = schema.shard_paths(synth_dir / "test", schema.read_manifest(synth_dir / "test"))[0]
    from data.reader import ErrorPolicy, read_shard

    first = schema.decode_sample(next(read_shard(path, ErrorPolicy())))
    assert torch.equal(batches[0]["img_feat"][0], torch.from_numpy(first["feat.npy"].astype(np.float32)))
