"""Writing a dataset directory: `shard-%06d.tar` (tarshards: webdataset's ShardWriter's bytes), then the manifest."""

from __future__ import annotations

import collections
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from ldot.data import schema
from ldot.data.errors import DataError
from ldot.data.tarshards import TarShards, encode_sample


def command_line() -> str:
    """How this process was started, for the manifest's ``command``."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):  # python -m ldot.data ... is `ldot data ...`
        package = Path(argv[0]).parent.name
        argv[0:1] = ["ldot"] if package == "ldot" else ["ldot", package]
    elif argv and Path(argv[0]).name == "ldot":
        argv[0] = "ldot"
    return shlex.join(argv)


PROGRESS = "progress.json"


class DatasetWriter:
    """Validated samples in, shards + manifest out, verified on the way (``verify``).

    Verification: each sample is checked against the schema before anything of it is written, then its
    encoded members are checked to decode as the loader decodes them (tarshards.encode_sample), each
    finished shard is checked on disk (its size, every member header read back), and on close the
    manifest is read back. Shards kept from an interrupted run were written by another process: a resumed
    write reads the whole dataset back (validate.check_dataset, what ``ldot data inspect`` runs).

    Keys are the running sample index (``%08d``) unless given. A sample that breaks the schema raises
    DataError before anything of it is written.

    Resumable (``resumable=True``): each time a shard is complete, ``progress.json`` records the finished
    shards and the caller's position (``write(..., position=...)`` of the first sample not in them). A
    later writer on the same directory with the same ``fingerprint`` keeps those shards, drops the
    unfinished one and exposes ``resume_position`` so the caller continues from there.
    """

    def __init__(self, out_dir: str | os.PathLike, *, feature_dim: int, class_dim: int | None = None,
                 source: str, split: str | None = None, command: str | None = None, shard_size: int = 1000,
                 max_shard_bytes: float = 1e9, extra: dict | None = None, overwrite: bool = False, verify: bool = True,
                 resumable: bool = False, fingerprint: str = ""):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resumable, self.fingerprint = resumable, fingerprint
        self.resume_position = None  # the caller's position after the kept shards, when resuming
        kept: list[dict] = []
        progress_path = self.out_dir / PROGRESS
        if resumable and progress_path.is_file() and not (self.out_dir / schema.MANIFEST).exists() and not overwrite:
            progress = json.loads(progress_path.read_text())
            if progress.get("fingerprint") != fingerprint:
                raise DataError("holds an unfinished conversion with other options; rerun it with the same options to "
                                "resume, or pass overwrite to start again", shard=str(self.out_dir))
            kept = progress["shards"]
            self.resume_position = progress["position"]
        if (self.out_dir / schema.MANIFEST).exists() and not overwrite:
            raise DataError(f"already holds a dataset ({schema.MANIFEST}); pass overwrite to replace it",
                            shard=str(self.out_dir))
        # Shards without a manifest are an unfinished write: what progress.json does not vouch for is redone.
        keep = {k["name"] for k in kept}
        stale = [p for p in sorted(self.out_dir.glob(schema.SHARD_GLOB)) if p.name not in keep]
        stale += [p for p in (self.out_dir / schema.MANIFEST, progress_path) if p.exists() and not kept]
        for p in stale:
            p.unlink()
        self.manifest = schema.Manifest(feature_dim=feature_dim, class_dim=class_dim, shards=[], source=source,
                                        split=split, command=command if command is not None else command_line(),
                                        extra=dict(extra or {}))
        self.verify = verify
        self._samples: collections.Counter[str] = collections.Counter({k["name"]: k["samples"] for k in kept})
        self._captions: collections.Counter[str] = collections.Counter({k["name"]: k["captions"] for k in kept})
        self._thumbs = sum(k["thumbs"] for k in kept)
        self._shard_thumbs: collections.Counter[str] = collections.Counter({k["name"]: k["thumbs"] for k in kept})
        self._shard_regions: dict[str, list[int]] = {k["name"]: [k["min_regions"], k["max_regions"]] for k in kept}
        self._keys: set[str] = set()
        self._position = None
        self._kept = bool(kept)
        # The same input gives byte-identical shards (mtime 0).
        self._sink = TarShards(str(self.out_dir / schema.SHARD_PATTERN), maxcount=shard_size,
                               maxsize=max_shard_bytes, start_shard=len(kept),
                               post=self._shard_done if resumable else None, check=verify)
        self._closed = False

    def __len__(self) -> int:
        return sum(self._samples.values())

    def write(self, feat: np.ndarray, box: np.ndarray, meta: dict, *, cls: np.ndarray | None = None,
              thumb: bytes | None = None, key: str | None = None, position=None) -> str:
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
        members = encode_sample(sample, key, check=self.verify)
        self._position = position  # where the caller resumes if this sample starts a new shard
        self._sink.write(members)
        name = Path(self._sink.fname).name
        self._samples[name] += 1
        self._captions[name] += len(meta["captions"])
        self._thumbs += thumb is not None
        self._shard_thumbs[name] += thumb is not None
        r = self._shard_regions.setdefault(name, [int(feat.shape[0])] * 2)
        r[:] = [min(r[0], feat.shape[0]), max(r[1], feat.shape[0])]
        self._keys.add(key)
        return key

    def _shard_done(self, fname: str) -> None:
        """TarShards' post hook: a shard is complete, so it and the caller's position become durable."""
        if self._closed:
            return  # the last shard: the manifest takes over from the progress file
        done = [{"name": n, "samples": self._samples[n], "captions": self._captions[n], "thumbs": self._shard_thumbs[n],
                 "min_regions": self._shard_regions[n][0], "max_regions": self._shard_regions[n][1]}
                for n in sorted(self._samples)]
        progress = {"fingerprint": self.fingerprint, "shards": done, "position": self._position}
        tmp = self.out_dir / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, self.out_dir / PROGRESS)

    def close(self) -> schema.Manifest:
        """Finish the last shard, write the manifest and verify it (and, after a resume, every sample)."""
        if self._closed:
            return self.manifest
        self._closed = True
        self._sink.close()
        if not len(self):
            raise DataError("no samples were written", shard=str(self.out_dir))
        m = self.manifest
        m.shards = [schema.ShardInfo(name, self._samples[name], self._captions[name]) for name in sorted(self._samples)]
        m.has_thumbnails = self._thumbs == len(self)
        m.min_regions = min(r[0] for r in self._shard_regions.values())
        m.max_regions = max(r[1] for r in self._shard_regions.values())
        schema.write_manifest(self.out_dir, m)
        (self.out_dir / PROGRESS).unlink(missing_ok=True)
        if self.verify:
            if self._kept:
                from ldot.data.validate import check_dataset  # late: validate imports this module's siblings only

                report = check_dataset(self.out_dir)
                if not report.ok:
                    raise report.first_error()
            else:
                self._check_manifest(m)
        return m

    def _check_manifest(self, m: schema.Manifest) -> None:
        """The manifest reads back as written and names exactly the shard files in the directory."""
        back = schema.read_manifest(self.out_dir)
        if back.to_json() != json.loads(json.dumps(m.to_json())):
            raise DataError(f"{schema.MANIFEST} does not read back as written", shard=str(self.out_dir))
        on_disk = sorted(p.name for p in self.out_dir.glob(schema.SHARD_GLOB))
        if on_disk != [s.name for s in m.shards]:
            raise DataError(f"the directory holds shards {on_disk}, the manifest names {[s.name for s in m.shards]}",
                            shard=str(self.out_dir), reason="corrupt_tar")

    def abort(self) -> None:
        """Close without a manifest: the directory is then visibly not a dataset."""
        if not self._closed:
            self._closed = True  # the unfinished last shard stays out of progress.json
            self._sink.close(check=False)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
