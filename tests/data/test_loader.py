"""data/loader.py: batch contract, rank split, infinite streams, the eval split."""

import itertools
import re

import numpy as np
import pytest
import torch

from datafixtures import BAD_SAMPLES, good_members, truncate, write_raw_dataset
from ldot.data import DataError, schema
from ldot.data.loader import EpochPlan, TrainLoader, load_eval_split

KEYS = {"input_ids", "attention_mask", "img_feat", "img_pos", "img_mask", "group_ids", "caption_index", "image_id"}


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def caption_image(tokenizer, ids):
    """'image 17 caption 2' → 17 (the test datasets' captions name their image)."""
    return int(re.match(r"image (\d+) caption \d", tokenizer.decode(ids, skip_special_tokens=True)).group(1))


def stored_samples(data_dir) -> dict[str, dict]:
    """Every decoded sample of a dataset, by image_id, read straight from its shards."""
    from ldot.data.reader import ErrorPolicy, read_shard

    paths = schema.shard_paths(data_dir, schema.read_manifest(data_dir))
    samples = (schema.decode_sample(raw) for path in paths for raw in read_shard(path, ErrorPolicy()))
    return {s[schema.META]["image_id"]: s for s in samples}


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
    # caption_index: which of its image's captions a row holds (hard-negative mining names captions by it)
    assert b["caption_index"].dtype == torch.int64
    for ids, index in zip(b["input_ids"], b["caption_index"].tolist()):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert int(re.match(r"image \d+ caption (\d)", text).group(1)) == index, (text, index)
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
    assert len(set(b["group_ids"].tolist())) == 6
    # Each image's regions are the stored ones: as many (the mask's real regions come first), the same
    # features and boxes. Random region counts of 3..6 could pass the range check above with a wrong mask.
    stored = stored_samples(small_dataset)
    for i, image_id in enumerate(b["image_id"]):
        feat, box = stored[image_id][schema.FEAT], stored[image_id][schema.BOX]
        r = feat.shape[0]
        assert int(b["img_mask"][i].sum()) == r and b["img_mask"][i, :r].all(), (image_id, b["img_mask"][i], r)
        assert torch.equal(b["img_feat"][i, :r], torch.from_numpy(feat.astype(np.float32)))
        assert torch.allclose(b["img_pos"][i, :r, :4], torch.from_numpy(box.astype(np.float32)))


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
    first = stored_samples(synth_dir / "test")[ev.image_ids[0]]
    assert torch.equal(batches[0]["img_feat"][0], torch.from_numpy(first[schema.FEAT].astype(np.float32)))


def fingerprint(batch):
    return (batch["group_ids"].tolist(), batch["input_ids"].tolist(), float(batch["img_feat"].sum()))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(small_dataset, tokenizer, num_workers):
    kw = dict(batch_size=5, seed=4, rank=1, world_size=2, num_workers=num_workers)
    full = [fingerprint(b) for b in take(TrainLoader(small_dataset, tokenizer, **kw), 13)]  # ~5 epochs of this rank
    for cut in (1, 4, 7):  # mid-epoch and on/after epoch boundaries, each worker's turn
        first = TrainLoader(small_dataset, tokenizer, **kw)
        head = [fingerprint(b) for b in take(first, cut)]
        state = first.state_dict()
        resumed = TrainLoader(small_dataset, tokenizer, **kw)
        resumed.load_state_dict(state)
        tail = [fingerprint(b) for b in take(resumed, 13 - cut)]
        assert head + tail == full, f"resume after {cut} batches diverged"
        assert resumed.state_dict()["batches"] == 13


def test_resume_refuses_a_different_layout(small_dataset, tokenizer):
    a = TrainLoader(small_dataset, tokenizer, batch_size=5, world_size=2)
    take(a, 2)
    b = TrainLoader(small_dataset, tokenizer, batch_size=5, world_size=2, num_workers=2)
    with pytest.raises(DataError, match="num_workers 0 .this loader: 2."):
        b.load_state_dict(a.state_dict())


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(small_dataset, tokenizer):
    # batch_size 1: batch i of a rank comes from worker i % 2, so each worker's first `share` batches are its
    # epoch-0 share; across 2 ranks × 2 workers they must be the 47 samples, each once. Then epoch 1 again.
    seen = {0: [], 1: []}
    for rank in range(2):
        loader = TrainLoader(small_dataset, tokenizer, batch_size=1, rank=rank, world_size=2, num_workers=2, seed=7)
        batches = take(loader, 2 * 12 * 2 + 2)
        for worker in range(2):
            share = loader.plan.slot_size(rank * 2 + worker)  # 11 or 12
            mine = [int(b["group_ids"]) for b in batches[worker::2]]
            seen[0] += mine[:share]
            seen[1] += mine[share:2 * share]
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(47)), f"epoch {epoch}"
    assert seen[0] != seen[1]  # reshuffled


def bad_dataset(root):
    """Shard 0: 8 good samples with the six bad-sample cases in between; shard 1: 10 good, truncated."""
    first = []
    for k in range(14):
        m = good_members(k)
        first.append(BAD_SAMPLES[(k - 1) // 2][1](m) if k % 2 == 1 and k < 13 else m)
    out = write_raw_dataset(root, [first, [good_members(k) for k in range(14, 24)]])
    truncate(out / "shard-000001.tar", 0.55)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_counts_every_bad_sample(tmp_path, tokenizer, num_workers):
    data = bad_dataset(tmp_path / "bad")
    loader = TrainLoader(data, tokenizer, batch_size=1, num_workers=num_workers, on_error="skip")
    bad = {1, 3, 5, 7, 9, 11}
    if num_workers:
        ids = [int(b["group_ids"]) for b in take(loader, 40)]
        assert ids and not set(ids) & bad
        assert set(loader.skipped) >= {"missing_member", "nonfinite", "empty_caption", "corrupt_tar"}
        return
    valid = []
    for batch in loader:
        if loader.state_dict()["slots"][0]["epoch"] == 1:  # first batch of epoch 1: epoch 0 is complete
            break
        valid.append(int(batch["group_ids"]))
    epoch_skips = loader.state_dict()["slots"][0]["epoch_skipped"]  # every skip of epoch 0
    for reason in ("missing_member", "wrong_dim", "nonfinite", "empty_caption", "invalid_json", "undecodable",
                   "corrupt_tar"):
        assert epoch_skips.get(reason, 0) >= 1, (reason, epoch_skips)
    # Nothing vanishes: every sample of the epoch was either yielded or counted.
    assert len(valid) + sum(epoch_skips.values()) == 24
    assert set(valid) >= {0, 2, 4, 6, 8, 10, 12, 13, 14} and not set(valid) & bad


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name, corrupt, reason", BAD_SAMPLES, ids=[b[0] for b in BAD_SAMPLES])
def test_error_policy_names_shard_key_and_problem(tmp_path, tokenizer, num_workers, name, corrupt, reason):
    samples = [good_members(k) for k in range(6)]
    samples[4] = corrupt(samples[4])
    data = write_raw_dataset(tmp_path / "ds", [samples[:3], samples[3:]])
    loader = TrainLoader(data, tokenizer, batch_size=2, num_workers=num_workers, on_error="error")
    with pytest.raises(DataError) as info:
        take(loader, 10)
    err = info.value
    assert (err.shard.endswith("shard-000001.tar"), err.key, err.reason) == (True, "00000004", reason)
    assert "Traceback" not in str(err)


@pytest.mark.timeout(120)
def test_error_policy_on_a_truncated_tar(tmp_path, tokenizer):
    data = write_raw_dataset(tmp_path / "ds", [[good_members(k) for k in range(6)]])
    truncate(data / "shard-000000.tar", 0.5)
    with pytest.raises(DataError, match=r"shard-000000.tar: (unreadable tar|shard ends after \d+ samples, the manifest says 6)") as info:
        take(TrainLoader(data, tokenizer, batch_size=2, on_error="error"), 10)
    assert info.value.reason == "corrupt_tar"


@pytest.mark.timeout(120)
def test_all_bad_data_raises_instead_of_hanging(tmp_path, tokenizer):
    data = write_raw_dataset(tmp_path / "ds", [[BAD_SAMPLES[2][1](good_members(k)) for k in range(4)]])
    with pytest.raises(DataError, match="every sample of rank 0 worker 0's share of epoch 0 was bad"):
        take(TrainLoader(data, tokenizer, batch_size=2, on_error="skip"), 1)


def test_resume_keeps_skip_counts_exact(tmp_path, tokenizer):
    data = bad_dataset(tmp_path / "bad")
    kw = dict(batch_size=3, seed=2)
    ref = TrainLoader(data, tokenizer, **kw)
    full = [fingerprint(b) for b in take(ref, 9)]
    first = TrainLoader(data, tokenizer, **kw)
    head = [fingerprint(b) for b in take(first, 4)]
    resumed = TrainLoader(data, tokenizer, **kw)
    resumed.load_state_dict(first.state_dict())
    assert resumed.skipped == first.skipped
    assert head + [fingerprint(b) for b in take(resumed, 5)] == full
    assert resumed.skipped == ref.skipped


def test_finite_epochs_are_equal_on_every_rank(small_dataset, tokenizer):
    counts = []
    for rank in range(3):
        loader = TrainLoader(small_dataset, tokenizer, batch_size=4, rank=rank, world_size=3, epochs=2)
        assert loader.batches_per_epoch == 3  # shares of 15, 16, 16 samples: the smallest decides
        counts.append(len(list(loader)))
        assert len(list(loader)) == 0  # exhausted; a resumed loader would continue the count
    assert counts == [6, 6, 6]
    with pytest.raises(ValueError, match="finite epochs need a fixed batch_size"):
        TrainLoader(small_dataset, tokenizer, batch_size=None, token_budget=100, epochs=1)


def test_resampled_mode_draws_shards_with_replacement(small_dataset, tokenizer):
    plan = EpochPlan([f"s{i}" for i in range(5)], [10, 10, 10, 10, 7], seed=0, num_slots=2, resample=True)
    orders = [plan.shard_order(e) for e in range(20)]
    assert any(len(set(o)) < 5 for o in orders)  # some shard drawn twice in an epoch
    assert orders == [plan.shard_order(e) for e in range(20)]  # seeded
    for e in range(5):
        sizes = [sum(b - a for _, a, b in plan.pieces(e, s)) for s in range(2)]
        assert abs(sizes[0] - sizes[1]) <= 1  # equal shares still
    loaders = [TrainLoader(small_dataset, tokenizer, batch_size=4, rank=r, world_size=2, resample=True, seed=3)
               for r in range(2)]
    for loader in loaders:
        assert len(take(loader, 30)) == 30  # streams forever
