"""data/mixing.py: several training sets' loaders side by side, one read per step as the trainer draws it;
every set resumes where it was, on the same or another number of ranks."""
import pytest

from ldot.data import DataError
from ldot.data.loader import TrainLoader
from ldot.data.mixing import MixedLoader

from datafixtures import write_random_dataset

PLAN = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]  # which set each step reads


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return write_random_dataset(root / "a", 23, seed=1), write_random_dataset(root / "b", 17, seed=2, captions=2)


def mixed(sets, tokenizer, world=1, rank=0, batch=4):
    return MixedLoader([TrainLoader(d, tokenizer, batch_size=batch, seed=5, rank=rank, world_size=world) for d in sets])


def reads(batches, plan):
    return [(i, batches.select(i).__next__()["image_id"]) for i in plan]


def test_each_step_reads_the_set_drawn_for_it(two_sets, tokenizer):
    got = reads(iter(mixed(two_sets, tokenizer)), PLAN)
    assert all(all(x.startswith("img") for x in ids) for _, ids in got)
    # set b's stream is b's own: the same batches whatever set a did in between
    only_b = [ids for i, ids in reads(iter(mixed(two_sets, tokenizer)), [1] * PLAN.count(1))]
    assert [ids for i, ids in got if i == 1] == only_b
    alone = TrainLoader(two_sets[1], tokenizer, batch_size=4, seed=5)
    assert [b["image_id"] for b, _ in zip(alone, range(len(only_b)))] == only_b


@pytest.mark.parametrize("world", [1, 2])
def test_resume_continues_every_set(two_sets, tokenizer, world):
    """After 4 steps, a checkpoint; the resumed mix (on 1 rank, from 1 or 2 ranks' states) reads what the
    uninterrupted one reads, set by set."""
    def ranks():
        return [mixed(two_sets, tokenizer, world, r, batch=8 // world) for r in range(world)]

    per_rank = [reads(iter(m), PLAN) for m in ranks()]  # the uninterrupted run: each global batch end to end
    straight = [(i, sum((r[k][1] for r in per_rank), [])) for k, i in enumerate(PLAN)]
    old = ranks()
    streams = [iter(m) for m in old]
    for i in PLAN[:4]:
        for s in streams:
            next(s.select(i))
    state = MixedLoader.merge_states([m.state_dict() for m in old]) if world > 1 else old[0].state_dict()
    again = mixed(two_sets, tokenizer, batch=8)
    again.load_state_dict(state)
    assert reads(iter(again), PLAN[4:]) == straight[4:]


def test_a_state_of_another_mix_is_refused(two_sets, tokenizer):
    one = TrainLoader(two_sets[0], tokenizer, batch_size=4, seed=5)
    with pytest.raises(DataError, match="holds one training set, this run mixes 2"):
        mixed(two_sets, tokenizer).load_state_dict(one.state_dict())
