"""The SCAN/VSE++ precomp layout: ``{split}_caps.txt`` (5 lines per image) + ``{split}_ims.npy`` [N, R, D], memory-mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ldot.data.convert.captions import CaptionRecord, normalize_caption, read_lines
from ldot.data.convert.join import Item
from ldot.data.errors import DataError
from ldot.data.reader import ErrorPolicy

CAPTIONS_PER_IMAGE = 5


class PrecompFeatures:
    """Rows of an ``[N, R, D]`` array (never loaded whole: np.load with mmap), row = the record's index.

    Some releases repeat each image's row once per caption (N = 5 × images); then row = 5 × index. The
    layout has no boxes: give ``boxes`` ([N, R, >=4] normalized x1,y1,x2,y2...) or every region gets the
    whole-image box, which the manifest records.
    """

    def __init__(self, ims: str | Path, *, num_images: int | None = None, boxes: str | Path | None = None):
        self.path = str(ims)
        self.name = f"precomp:{Path(ims).name}"
        try:
            self.array = np.load(ims, mmap_mode="r")
        except (OSError, ValueError) as exn:
            raise DataError(f"not a readable .npy array ({exn})", shard=str(ims), reason="undecodable") from None
        if self.array.ndim != 3:
            raise DataError(f"shape {self.array.shape}, expected [images, regions, dim]", shard=str(ims), reason="wrong_dim")
        self.feature_dim = int(self.array.shape[2])
        self.class_dim = None
        self.stride = 1
        if num_images is not None and self.array.shape[0] == CAPTIONS_PER_IMAGE * num_images != num_images:
            self.stride = CAPTIONS_PER_IMAGE
        elif num_images is not None and self.array.shape[0] != num_images:
            raise DataError(f"{self.array.shape[0]} rows for {num_images} images", shard=str(ims), reason="wrong_dim")
        self.boxes = np.load(boxes, mmap_mode="r") if boxes is not None else None
        if self.boxes is not None and (self.boxes.shape[:2] != self.array.shape[:2] or self.boxes.shape[2] < 4):
            raise DataError(f"boxes shape {self.boxes.shape} does not fit features {self.array.shape}",
                            shard=str(boxes), reason="wrong_dim")
        self.boxes_note = f"from {Path(boxes).name}" if boxes is not None else "whole image (the precomp layout has none)"

    def features(self, items: Iterator[Item], policy: ErrorPolicy):
        whole = np.tile(np.array([[0, 0, 1, 1]], np.float32), (self.array.shape[1], 1))
        for item in items:
            row = item.record.index * self.stride
            if row >= self.array.shape[0]:
                policy(DataError(f"no feature row {row} (array has {self.array.shape[0]})", shard=self.path,
                                 key=item.record.image_id, reason="wrong_dim"))
                continue
            feat = np.asarray(self.array[row], dtype=np.float16)
            box = np.asarray(self.boxes[row, :, :4], dtype=np.float32) if self.boxes is not None else whole
            yield item, feat, box, None, None


def precomp_files(directory: str | Path, split: str) -> tuple[Path, Path, Path | None]:
    d = Path(directory)
    ids = d / f"{split}_ids.txt"
    return d / f"{split}_caps.txt", d / f"{split}_ims.npy", ids if ids.exists() else None


def read_precomp_captions(caps_file, *, split: str, ids_file=None, policy: ErrorPolicy) -> tuple[list[CaptionRecord], int]:
    """5 caption lines per image, in image order; image ids from ``ids_file`` (one per image) if given.
    Returns the records and the number of images the file describes."""
    lines = read_lines(caps_file)
    if len(lines) % CAPTIONS_PER_IMAGE:
        raise DataError(f"{len(lines)} lines is not {CAPTIONS_PER_IMAGE} per image", shard=str(caps_file),
                        reason="invalid_json")
    n = len(lines) // CAPTIONS_PER_IMAGE
    ids = [x.strip() for x in read_lines(ids_file)] if ids_file else [f"{split}-{i}" for i in range(n)]
    if len(ids) not in (n, CAPTIONS_PER_IMAGE * n):
        raise DataError(f"{len(ids)} ids for {n} images", shard=str(ids_file), reason="invalid_json")
    stride = len(ids) // n  # some releases list the id once per caption
    records = []
    for i in range(n):
        caps = [normalize_caption(c) for c in lines[i * CAPTIONS_PER_IMAGE:(i + 1) * CAPTIONS_PER_IMAGE]]
        if not all(caps):
            policy(DataError(f"empty caption on line {i * CAPTIONS_PER_IMAGE + caps.index('') + 1}", shard=str(caps_file),
                             key=ids[i * stride], reason="empty_caption"))
            continue
        records.append(CaptionRecord(ids[i * stride], ids[i * stride], caps, split, i))
    return records, n
