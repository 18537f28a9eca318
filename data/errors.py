"""The data package's one error type: every bad-input report names the shard, the key and the problem."""

from __future__ import annotations

from ldot.errors import LdotError


class DataError(LdotError):
    """Bad input or a broken dataset, located as precisely as we know.

    ``shard`` is a shard file (or any source file), ``key`` the sample key inside it, ``reason`` a short
    machine-readable category (used to count skips), ``problem`` the human sentence.
    """

    def __init__(self, problem: str, *, shard: str | None = None, key: str | None = None, reason: str = "invalid"):
        self.problem = problem
        self.shard = shard
        self.key = key
        self.reason = reason
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.shard:
            where.append(str(self.shard))
        if self.key:
            where.append(f"key {self.key}")
        return (": ".join([" ".join(where), self.problem])) if where else self.problem

    def __reduce__(self):
        # Survives the trip from a DataLoader worker back to the main process.
        return (_rebuild, (self.problem, self.shard, self.key, self.reason))


def _rebuild(problem, shard, key, reason):
    return DataError(problem, shard=shard, key=key, reason=reason)
