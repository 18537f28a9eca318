"""data/masking.py and the loader's optional VMLM/SMRM stages: rates, 80/10/10, specials untouched, determinism."""

import itertools
import random

import numpy as np
import torch

from data.loader import TrainLoader
from data.masking import IGNORE_INDEX, WordMasker, mask_regions


def test_word_masking_rates(tokenizer):
    masker = WordMasker(tokenizer)
    rng = random.Random(0)
    ids = tokenizer("a small red circle at the top left and a large blue square on the right, gray background")["input_ids"]
    chosen = mask = rand = kept = 0
    for _ in range(3000):
        masked, labels = masker(ids, rng)
        assert masked[0] == ids[0] == tokenizer.cls_token_id and masked[-1] == ids[-1] == tokenizer.sep_token_id
        assert labels[0] == labels[-1] == IGNORE_INDEX
        for orig, new, lab in zip(ids, masked, labels):
            if lab == IGNORE_INDEX:
                assert new == orig
                continue
            assert lab == orig
            chosen += 1
            if new == tokenizer.mask_token_id:
                mask += 1
            elif new == orig:
                kept += 1
            else:
                rand += 1
                assert new not in tokenizer.all_special_ids
    words = 3000 * (len(ids) - 2)
    assert 0.14 < chosen / words < 0.17
    assert abs(mask / chosen - 0.8) < 0.02 and abs(rand / chosen - 0.1) < 0.015 and abs(kept / chosen - 0.1) < 0.015


def test_at_least_one_word_and_one_region(tokenizer):
    masker = WordMasker(tokenizer)
    rng = random.Random(1)
    ids = tokenizer("dog")["input_ids"]
    for _ in range(50):
        assert sum(l != IGNORE_INDEX for l in masker(ids, rng)[1]) == 1
        assert mask_regions(3, rng).sum() >= 1
    rates = np.mean([mask_regions(100, rng).mean() for _ in range(200)])
    assert 0.14 < rates < 0.16


def test_loader_masking_stages(small_dataset, tokenizer):
    kw = dict(batch_size=8, mask_words=True, mask_regions=True, seed=2)
    b = next(iter(TrainLoader(small_dataset, tokenizer, **kw)))
    assert b["mlm_input_ids"].shape == b["mlm_labels"].shape == b["input_ids"].shape
    assert b["mrm_mask"].shape == b["img_mask"].shape and b["mrm_mask"].dtype == torch.int64
    predicted = b["mlm_labels"] != IGNORE_INDEX
    assert predicted.any(1).all() and torch.equal(b["mlm_labels"][predicted], b["input_ids"][predicted])
    assert torch.equal(b["mlm_input_ids"][~predicted], b["input_ids"][~predicted])
    assert not (predicted & (b["attention_mask"] == 0)).any()  # padding is never a target
    assert (b["mrm_mask"].sum(1) >= 1).all() and not (b["mrm_mask"].bool() & (b["img_mask"] == 0)).any()
    plain = next(iter(TrainLoader(small_dataset, tokenizer, batch_size=8, seed=2)))
    assert torch.equal(plain["input_ids"], b["input_ids"])  # the caption choice does not depend on masking


def test_masks_do_not_depend_on_the_worker_layout(small_dataset, tokenizer):
    # Masks are a function of (seed, epoch, image): epoch 0 read by 1 or by 2 workers masks every image alike.
    kw = dict(batch_size=1, mask_words=True, mask_regions=True, seed=2)
    masks = lambda bs: {int(x["group_ids"]): (x["mlm_input_ids"].tolist(), x["mrm_mask"].tolist()) for x in bs}
    one = masks(itertools.islice(iter(TrainLoader(small_dataset, tokenizer, **kw)), 47))
    loader = TrainLoader(small_dataset, tokenizer, num_workers=2, **kw)
    batches = list(itertools.islice(iter(loader), 48))
    two = {}
    for w in range(2):
        two.update(masks(batches[w::2][:loader.plan.slot_size(w)]))
    assert len(one) == len(two) == 47 and one == two
