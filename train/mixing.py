"""Pretraining on a mix of training sets, each with its own task ratios (the original's MetaLoader).

The original pools every (set, task) pair `ratio` times and draws one pair per optimizer step
(uniter_model/data/loader.py, with the pair broadcast from rank 0 so that every rank trains the same).
Here the draw is a pure function of (seed, step), as the single-set task sampler's: every rank draws the
same pair without a broadcast, and a resumed run draws what the uninterrupted run drew. Weights are the
ratios themselves, so COCO/SBU at 16:8:4:4 and VG/CC at 16:12:6:6 are drawn in proportion 32 : 40.
"""
from __future__ import annotations

import numpy as np

from ldot.train.objectives import TASKS


class MixSampler:
    """One (training set index, task) per step, with weight = that set's ratio of that task."""

    def __init__(self, set_ratios: list[dict[str, float]], seed: int):
        self.pairs = [(i, t) for i, ratios in enumerate(set_ratios) for t in TASKS if ratios.get(t, 0) > 0]
        if not self.pairs:
            raise ValueError("at least one task of one training set needs a positive ratio")
        w = np.array([set_ratios[i][t] for i, t in self.pairs], dtype=np.float64)
        self.p, self.seed = w / w.sum(), seed

    def draw(self, step: int) -> tuple[int, str]:
        return self.pairs[int(np.random.default_rng([self.seed, step]).choice(len(self.pairs), p=self.p))]

    def task_for(self, step: int) -> str:
        return self.draw(step)[1]
