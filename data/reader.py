"""Reading shards with webdataset's tar stages, and the bad-input policy (`error` or counted `skip`) they share."""

from __future__ import annotations

import collections
import logging
import tarfile
from typing import Callable, Iterator

import webdataset as wds

from ldot.data.errors import DataError

log = logging.getLogger("data")

POLICIES = ("error", "skip")


class ErrorPolicy:
    """What to do with bad input: ``error`` raises the DataError, ``skip`` counts it per reason and logs it.

    Usable directly as a webdataset ``handler=`` (returns True to continue). ``counts`` is what
    TrainLoader exposes as ``skipped``.
    """

    # Log every skip of the first few, then one in `log_every`, so a rotten dataset cannot flood the log.
    log_first, log_every = 20, 1000

    def __init__(self, on_error: str = "error", *, where: str = "", counts: dict[str, int] | None = None):
        if on_error not in POLICIES:
            raise ValueError(f"on_error must be one of {POLICIES}, not {on_error!r}")
        self.on_error = on_error
        self.where = where  # e.g. "rank 1 worker 0", prefixed to log lines
        self.counts: collections.Counter[str] = collections.Counter(counts or {})

    def __call__(self, exn: BaseException) -> bool:
        err = as_data_error(exn)
        if self.on_error == "error":
            raise err
        self.skip(err)
        return True

    def skip(self, err: DataError, n: int = 1) -> None:
        self.counts[err.reason] += n
        total = sum(self.counts.values())
        if total <= self.log_first or total % self.log_every == 0:
            prefix = f"[{self.where}] " if self.where else ""
            log.warning("%sskipped %d sample(s) (%s): %s  [skipped so far: %s]", prefix, n, err.reason, err, dict(self.counts))


def as_data_error(exn: BaseException, *, shard: str | None = None) -> DataError:
    if isinstance(exn, DataError):
        return exn
    if isinstance(exn, wds.autodecode.DecodingError):
        cause = exn.__cause__
        return DataError(f"{exn.k} does not decode ({type(cause).__name__}: {cause})", shard=exn.url, key=exn.key,
                         reason="invalid_json" if exn.k == "json" else "undecodable")
    if isinstance(exn, (tarfile.TarError, EOFError, OSError)):
        return DataError(f"unreadable tar ({type(exn).__name__}: {exn.args[0] if exn.args else exn})", shard=shard,
                         reason="corrupt_tar")
    return DataError(f"{type(exn).__name__}: {exn}", shard=shard, reason="undecodable")


def read_shard(path: str, policy: ErrorPolicy, *, start: int = 0, stop: int | None = None, expected: int | None = None,
               select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Raw samples (member name → bytes, plus ``__key__``/``__url__``) number ``start``..``stop`` of one shard.

    A tar that breaks off (truncated, corrupt) goes to the policy as ``corrupt_tar``. The samples it lost are
    counted against ``stop`` (or ``expected``, the manifest's count, when reading to the end), so nothing
    disappears silently; a shard shorter than promised is reported the same way.
    """
    failure: list[DataError] = []

    def on_tar_error(exn: BaseException) -> bool:
        err = as_data_error(exn, shard=path)
        err.shard = err.shard or path
        failure.append(err)
        if policy.on_error == "error":
            raise err
        return True  # counted below, once we know how many samples were lost

    got = 0
    for i, sample in enumerate(wds.tarfile_samples([{"url": path}], handler=on_tar_error, select_files=select_files)):
        if i < start:
            continue
        if stop is not None and i >= stop:
            return
        got += 1
        yield sample
    want = (stop if stop is not None else expected)
    want = None if want is None else want - start
    if want is not None and got < want:
        err = failure[0] if failure else DataError(f"shard ends after {start + got} samples, the manifest says "
                                                   f"{expected if expected is not None else stop}", shard=path,
                                                   reason="corrupt_tar")
        if policy.on_error == "error":
            raise err
        policy.skip(DataError(f"{err.problem}; {want - got} sample(s) lost", shard=path, reason="corrupt_tar"),
                    n=want - got)
    elif failure:  # broke off, but we cannot tell how many samples it took with it
        policy.skip(failure[0])
