"""The converters' shared driver: caption records joined to a feature source, written resumably with the policy."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from ldot.data import schema
from ldot.data.convert.captions import CaptionRecord
from ldot.data.errors import DataError
from ldot.data.progress import progress_bar
from ldot.data.reader import ErrorPolicy
from ldot.data.writer import DatasetWriter

log = logging.getLogger("data")


@dataclasses.dataclass
class Item:
    """One record on its way through a converter: ``seq`` is its place in the stream (the resume position)."""

    seq: int
    record: CaptionRecord
    load: Callable | None = None  # how to get the raw input (an image) when the source needs one
    skipped_before: dict | None = None  # the policy's counts when this item was taken: what a resume restores


class FeatureSource(Protocol):
    name: str
    feature_dim: int
    class_dim: int | None
    boxes_note: str  # how boxes were obtained, recorded in the manifest

    def features(self, items: Iterator[Item], policy: ErrorPolicy) -> Iterator[tuple[Item, np.ndarray, np.ndarray,
                                                                                      np.ndarray | None, bytes | None]]:
        """(item, feat, box, cls, thumb) for every item it can resolve; the rest go to the policy."""


def convert(items: Iterable[Item], source: FeatureSource, out, *, split: str, source_name: str, policy: ErrorPolicy,
            shard_size: int = 1000, overwrite: bool = False, fingerprint: str = "", limit: int | None = None,
            extra: dict | None = None, total: int | None = None) -> schema.Manifest:
    """Write ``out`` from ``items``; an interrupted run with the same fingerprint resumes where it stopped."""
    writer = DatasetWriter(out, feature_dim=source.feature_dim, class_dim=source.class_dim, source=source_name,
                           split=split, shard_size=shard_size, overwrite=overwrite, resumable=True,
                           fingerprint=fingerprint,
                           extra={"features": source.name, "boxes": source.boxes_note, **(extra or {})})
    it = iter(items)
    start = 0
    if writer.resume_position is not None:
        start = writer.resume_position["seq"]
        collections.deque(itertools.islice(it, start), maxlen=0)  # items are lazy: passing them over is cheap
        # The pass re-met earlier bad input; the counts are those saved with the position instead.
        policy.counts.clear()
        policy.counts.update(writer.resume_position["skipped"])
        log.info("resuming %s: %d shards kept, continuing at record %d", out, len(writer._samples), start)
    def taken(stream: Iterator[Item]) -> Iterator[Item]:
        # Snapshot when the source pulls the item, not when it is written: batching sources read ahead.
        for item in stream:
            item.skipped_before = dict(policy.counts)
            yield item

    stream = taken(itertools.islice(it, None if limit is None else max(0, limit - start)))
    if total is not None:
        total = min(total, limit) if limit is not None else total
    bar = progress_bar(total=total, initial=start, desc=f"convert → {out}", unit="img")
    try:
        for item, feat, box, cls, thumb in source.features(stream, policy):
            bar.update(item.seq + 1 - bar.n)  # records the source skipped count as done too
            meta = {"image_id": item.record.image_id, "captions": item.record.captions, "split": item.record.split,
                    "source": source_name, **(item.record.extra or {})}
            try:
                writer.write(feat, box, meta, cls=cls, thumb=thumb,
                             position={"seq": item.seq, "skipped": item.skipped_before})
            except DataError as err:
                err.shard, err.key = source.name, item.record.image_id
                policy(err)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    writer.manifest.extra["skipped"] = dict(policy.counts)
    manifest = writer.close()
    if policy.counts:
        log.warning("%s: %d samples written, skipped %s", out, manifest.num_samples, dict(policy.counts))
    return manifest


def numbered(records: Iterable) -> Iterator[Item]:
    """Items from caption records, or from (record, image loader) pairs."""
    for seq, r in enumerate(records):
        yield Item(seq, r[0], r[1]) if isinstance(r, tuple) else Item(seq, r)
