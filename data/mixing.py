"""Several training sets' loaders side by side, for pretraining on a mix (the original's MetaLoader).

The trainer draws which set each step reads (with its task, from (seed, step): ldot.train.mixing) and
takes that step's micro-batches from that set's loader through ``select``. Every set keeps its own
stream, epoch plan and exactly resumable position; a set is read only on the steps drawn for it, so a
resumed run continues every set where the uninterrupted one would.
"""
from __future__ import annotations

from typing import Iterator

from ldot.data.errors import DataError


class MixedLoader:
    """``loaders`` (one TrainLoader per training set, the same rank and batch settings), in the config's order."""

    def __init__(self, loaders: list):
        self.loaders = list(loaders)

    def __iter__(self) -> "MixedBatches":
        return MixedBatches(self.loaders)

    @property
    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for loader in self.loaders:
            for reason, n in loader.skipped.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def state_dict(self) -> dict:
        return {"mix": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("mix")
        if parts is None or len(parts) != len(self.loaders):
            raise DataError(f"the loader state holds {'one training set' if parts is None else f'{len(parts)} training sets'}"
                            f", this run mixes {len(self.loaders)}: data.train changed", shard=str(self.loaders[0].data_dir))
        for loader, part in zip(self.loaders, parts):
            loader.load_state_dict(part)

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """Every rank's state (in rank order) joined set by set (TrainLoader.merge_states)."""
        from ldot.data.loader import TrainLoader

        return {"mix": [TrainLoader.merge_states([s["mix"][i] for s in states]) for i in range(len(states[0]["mix"]))]}


class MixedBatches:
    """The running streams of a MixedLoader: ``select(i)`` is set i's batch iterator, started on first use."""

    def __init__(self, loaders: list):
        self.loaders, self.streams = loaders, {}

    def __iter__(self) -> "MixedBatches":
        return self

    def __next__(self) -> dict:
        raise TypeError("a mix of training sets has no batch of its own: read set i's with select(i)")

    def select(self, i: int) -> Iterator[dict]:
        if i not in self.streams:
            self.streams[i] = iter(self.loaders[i])
        return self.streams[i]
