"""VMLM and SMRM masking as optional loader stages: 15% of words (80% [MASK], 10% random, 10% kept), 15% of regions.

Randomness comes from a generator the loader seeds per (seed, epoch, image), so masks are reproducible
and survive a resume. At least one word and one region is always masked, as in UNITER/LightningDOT.
"""

from __future__ import annotations

import random

import numpy as np

MASK_PROB = 0.15
IGNORE_INDEX = -100  # label of positions that are not predicted (torch cross-entropy's default ignore_index)


class WordMasker:
    """BERT-style masking of a tokenized caption; special tokens ([CLS], [SEP], [PAD]) are never masked."""

    def __init__(self, tokenizer, prob: float = MASK_PROB):
        self.prob = prob
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            raise ValueError("the tokenizer has no [MASK] token")
        self.special = set(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)

    def _random_word(self, rng: random.Random) -> int:
        while True:
            i = rng.randrange(self.vocab_size)
            if i not in self.special:
                return i

    def __call__(self, ids: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
        """(masked ids, labels): labels hold the original id where a prediction is due, IGNORE_INDEX elsewhere."""
        candidates = [i for i, t in enumerate(ids) if t not in self.special]
        chosen = [i for i in candidates if rng.random() < self.prob]
        if not chosen and candidates:
            chosen = [rng.choice(candidates)]
        masked, labels = list(ids), [IGNORE_INDEX] * len(ids)
        for i in chosen:
            labels[i] = ids[i]
            r = rng.random()
            if r < 0.8:
                masked[i] = self.mask_id
            elif r < 0.9:
                masked[i] = self._random_word(rng)
            # else: kept as it is, still predicted
        return masked, labels


def mask_regions(n: int, rng: random.Random, prob: float = MASK_PROB) -> np.ndarray:
    """int64 [n], 1 = region masked (the model zeroes its feature and predicts it: MRFR / MRC-kl)."""
    mask = np.array([rng.random() < prob for _ in range(n)], dtype=np.int64)
    if n and not mask.any():
        mask[rng.randrange(n)] = 1
    return mask
