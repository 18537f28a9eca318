"""data/loader.py: resuming on a different number of ranks (the layout rule in the module doc).

The global batch of every step must be the uninterrupted run's: the same pairs, the same captions, in the
same order when the new ranks' batches are laid end to end in rank order."""
import itertools

import pytest

from ldot.data import DataError
from ldot.data.loader import TrainLoader


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def pairs(batch):
    """Each pair of a batch as (image index, caption tokens without padding, feature sum)."""
    return [(int(g), [t for t in ids.tolist() if t != 0], round(float(f.sum()), 4))
            for g, ids, f in zip(batch["group_ids"], batch["input_ids"], batch["img_feat"])]


def global_batches(loaders, n):
    """n global batches of ranks `loaders` (rank order): each rank's batch, end to end."""
    per_rank = [take(loader, n) for loader in loaders]
    return [sum((pairs(b) for b in step), []) for step in zip(*per_rank)]


def ranks(data, tokenizer, world, batch, **kw):
    return [TrainLoader(data, tokenizer, batch_size=batch, rank=r, world_size=world, seed=3, **kw) for r in range(world)]


def resumed(data, tokenizer, old, world, batch, **kw):
    state = TrainLoader.merge_states([loader.state_dict() for loader in old])
    new = ranks(data, tokenizer, world, batch, **kw)
    for loader in new:
        loader.load_state_dict(state)
    return new


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_to_one_and_one_to_two_continue_the_global_sample_sequence(small_dataset, tokenizer, num_workers):
    """47 samples, global batch 8, 14 steps (over 2 epochs): cut after 5 steps (mid-epoch), go on with another
    world size; then resize again, the layout kept: each global batch equals the uninterrupted run's."""
    kw = dict(num_workers=num_workers)
    for first, (world, batch) in [((2, 4), (1, 8)), ((1, 8), (2, 4))]:
        want = global_batches(ranks(small_dataset, tokenizer, *first, **kw), 14)
        old = ranks(small_dataset, tokenizer, *first, **kw)
        got = global_batches(old, 5)
        new = resumed(small_dataset, tokenizer, old, world, batch, **kw)
        got += global_batches(new, 5)
        again = resumed(small_dataset, tokenizer, new, 4, 2, **kw)  # and again, on 4 ranks
        assert all(loader.layout_world == first[0] for loader in again)
        got += global_batches(again, 4)
        assert got == want, f"{first} -> ({world}, {batch}) -> (4, 2)"
        # the steps' count goes on
        assert {loader.state_dict()["batches"] for loader in again} == {14}


def test_a_resized_run_refuses_what_would_change_its_batches(small_dataset, tokenizer):
    old = ranks(small_dataset, tokenizer, 2, 4)
    take(old[0], 2), take(old[1], 2)
    state = TrainLoader.merge_states([loader.state_dict() for loader in old])
    one = TrainLoader(small_dataset, tokenizer, batch_size=4, seed=3)  # data.batch_size left as it was
    with pytest.raises(DataError, match=r"global batch is 8 pairs \(2 ranks x data.batch_size=4\); 1 ranks x "
                                        r"data.batch_size=4 would change it: set data.batch_size=8 to keep it"):
        one.load_state_dict(state)
    three = TrainLoader(small_dataset, tokenizer, batch_size=3, world_size=3, seed=3)
    with pytest.raises(DataError, match="8 pairs cannot be split evenly over 3 ranks"):
        three.load_state_dict(state)
    # a rank's own state is for that rank of that world only
    with pytest.raises(DataError, match="merge every rank's state first"):
        TrainLoader(small_dataset, tokenizer, batch_size=8, seed=3).load_state_dict(old[1].state_dict())
    # token budgets are cut per rank: no other number of ranks
    budget = [TrainLoader(small_dataset, tokenizer, batch_size=None, token_budget=200, rank=r, world_size=2, seed=3)
              for r in range(2)]
    take(budget[0], 1), take(budget[1], 1)
    merged = TrainLoader.merge_states([loader.state_dict() for loader in budget])
    with pytest.raises(DataError, match="token-budget loader .* cannot continue on 1: resume on 2 ranks"):
        TrainLoader(small_dataset, tokenizer, batch_size=None, token_budget=200, seed=3).load_state_dict(merged)


def test_version_1_states_still_load(small_dataset, tokenizer):
    """Checkpoints written before the layout (slots as a list of this rank's workers) resume, on any world size."""
    old = ranks(small_dataset, tokenizer, 2, 4, num_workers=2)
    want = global_batches(ranks(small_dataset, tokenizer, 2, 4, num_workers=2), 7)
    got = global_batches(old, 3)
    v1 = []
    for loader in old:
        s = loader.state_dict()
        v1.append({"version": 1, "batches": s["batches"], "slots": [s["slots"][k] for k in sorted(s["slots"])],
                   "rank": s["rank"], "world_size": 2, "batch_size": 4, **{k: s[k] for k in (
                       "seed", "num_workers", "token_budget", "bucket_buffer", "shuffle_buffer", "resample",
                       "num_samples", "shards")}})
    same = ranks(small_dataset, tokenizer, 2, 4, num_workers=2)
    for loader, state in zip(same, v1):
        loader.load_state_dict(state)
    assert got + global_batches(same, 4) == want
    one = TrainLoader(small_dataset, tokenizer, batch_size=8, seed=3, num_workers=2)
    one.load_state_dict(TrainLoader.merge_states(v1))
    assert got + global_batches([one], 4) == want
