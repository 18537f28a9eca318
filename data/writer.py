"""Writing a dataset directory: webdataset's ShardWriter for `shard-%06d.tar`, then the manifest, then a full re-check."""

from __future__ import annotations

import collections
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import webdataset as wds

from data import schema
from data.errors import DataError


def command_line() -> str:
    """How this process was started, for the manifest's ``command``."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0:1] = ["python", "-m", Path(argv[0]).parent.name]
    return shlex.join(argv)


class DatasetWriter:
    """Validated samples in, shards + manifest out; verified by reading everything back on close.

    Keys are the running sample index (``%08d``) unless given. A sample that breaks the schema raises
    DataError before anything of it is written.
    """

    def __init__(self, out_dir: str | os.PathLike, *, feature_dim: int, class_dim: int | None = None,
                 source: str, split: str | None = None, command: str | None = None, shard_size: int = 1000,
                 max_shard_bytes: float = 1e9, extra: dict | None = None, overwrite: bool = False, verify: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(schema.SHARD_GLOB)) + sorted(self.out_dir.glob(schema.MANIFEST))
        if existing:
            if not overwrite:
                raise DataError(f"already holds a dataset ({existing[0].name}); pass overwrite to replace it",
                                shard=str(self.out_dir))
            for p in existing:
                p.unlink()
        self.manifest = schema.Manifest(feature_dim=feature_dim, class_dim=class_dim, shards=[], source=source,
                                        split=split, command=command if command is not None else command_line(),
                                        extra=dict(extra or {}))
        self.verify = verify
        self._samples: collections.Counter[str] = collections.Counter()
        self._captions: collections.Counter[str] = collections.Counter()
        self._thumbs = 0
        self._regions: list[int] = []
        self._keys: set[str] = set()
        # mtime fixed so the same input gives byte-identical shards.
        self._sink = wds.ShardWriter(str(self.out_dir / schema.SHARD_PATTERN), maxcount=shard_size,
                                     maxsize=max_shard_bytes, verbose=0, mtime=0)
        self._closed = False

    def __len__(self) -> int:
        return sum(self._samples.values())

    def write(self, feat: np.ndarray, box: np.ndarray, meta: dict, *, cls: np.ndarray | None = None,
              thumb: bytes | None = None, key: str | None = None) -> str:
        key = key if key is not None else f"{len(self):08d}"
        if not schema.valid_key(key) or key in self._keys:
            raise DataError(f"invalid or duplicate sample key {key!r}", shard=str(self.out_dir), key=key)
        sample = {"__key__": key, schema.FEAT: feat, schema.BOX: box, schema.META: meta}
        if cls is not None:
            sample[schema.CLS] = cls
        problems = schema.validate_sample(sample, self.manifest.feature_dim, self.manifest.class_dim)
        if problems:
            raise DataError("; ".join(p for _, p in problems), shard=str(self.out_dir), key=key, reason=problems[0][0])
        if thumb is not None:
            sample[schema.THUMB] = bytes(thumb)  # already JPEG
        self._sink.write(sample)
        name = Path(self._sink.fname).name
        self._samples[name] += 1
        self._captions[name] += len(meta["captions"])
        self._thumbs += thumb is not None
        self._regions.append(int(feat.shape[0]))
        self._keys.add(key)
        return key

    def close(self) -> schema.Manifest:
        """Finish the last shard, write the manifest and verify every sample against it."""
        if self._closed:
            return self.manifest
        self._sink.close()
        self._closed = True
        if not len(self):
            raise DataError("no samples were written", shard=str(self.out_dir))
        m = self.manifest
        m.shards = [schema.ShardInfo(name, self._samples[name], self._captions[name]) for name in sorted(self._samples)]
        m.has_thumbnails = self._thumbs == len(self)
        m.min_regions, m.max_regions = min(self._regions), max(self._regions)
        schema.write_manifest(self.out_dir, m)
        if self.verify:
            from data.validate import check_dataset  # late: validate imports this module's siblings only

            report = check_dataset(self.out_dir)
            if not report.ok:
                raise report.first_error()
        return m

    def abort(self) -> None:
        """Close without a manifest: the directory is then visibly not a dataset."""
        if not self._closed:
            self._sink.close()
            self._closed = True

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
