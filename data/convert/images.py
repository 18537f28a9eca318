"""Raw images → features: a folder of images or img2dataset shards (``.jpg/.txt/.json``), through a backbone."""

from __future__ import annotations

import collections
import glob
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, UnidentifiedImageError

from ldot.data.convert.captions import CaptionRecord, normalize_caption, read_lines
from ldot.data.convert.join import Item
from ldot.data.errors import DataError
from ldot.data.features import GridBackbone, thumbnail_jpeg
from ldot.data.reader import ErrorPolicy, read_shard

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _opener(path: Path, key: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        if not path.is_file():
            raise DataError("image file not found", shard=str(path), key=key, reason="missing_image")
        try:
            img = Image.open(path)
            img.load()
            return img
        except (UnidentifiedImageError, OSError, ValueError) as exn:
            raise DataError(f"image does not decode ({type(exn).__name__}: {exn})", shard=str(path), key=key,
                            reason="undecodable") from None
    return load


def _bytes_opener(data: bytes, shard: str, key: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            return img
        except (UnidentifiedImageError, OSError, ValueError) as exn:
            raise DataError(f"image does not decode ({type(exn).__name__}: {exn})", shard=shard, key=key,
                            reason="undecodable") from None
    return load


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("image folder not found", shard=str(folder), reason="missing_member")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_items(folder: str | Path, *, split: str, policy: ErrorPolicy) -> Iterator[tuple[CaptionRecord, Callable]]:
    """Every image of a folder (sorted), captions from a sidecar ``NAME.txt`` (one per line)."""
    for i, path in enumerate(image_files(folder)):
        sidecar = path.with_suffix(".txt")
        caps = [normalize_caption(c) for c in read_lines(sidecar)] if sidecar.is_file() else []
        caps = [c for c in caps if c]
        if not caps:
            policy(DataError("no captions (no NAME.txt beside the image, or it is empty; or give --captions-format)",
                             shard=str(path), key=path.name, reason="empty_caption"))
            continue
        yield CaptionRecord(path.name, path.name, caps, split, i), _opener(path, path.name)


def captioned_folder_items(folder: str | Path, records: list[CaptionRecord]) -> Iterator[tuple[CaptionRecord, Callable]]:
    """Caption records whose image is in the folder (records of other images are simply not this input)."""
    present = {p.name for p in image_files(folder)}
    for r in records:
        if Path(r.filename).name in present:
            yield r, _opener(Path(folder) / Path(r.filename).name, r.image_id)


def record_items(image_dir: str | Path, records: list[CaptionRecord]) -> Iterator[tuple[CaptionRecord, Callable]]:
    """Every caption record with its image from ``image_dir``; a missing image is bad input."""
    for r in records:
        yield r, _opener(Path(image_dir) / r.filename, r.image_id)


def shard_list(spec: str) -> list[str]:
    """img2dataset shards: a folder of .tar files, a glob, or a brace pattern."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    import braceexpand

    return sorted(p for pattern in braceexpand.braceexpand(spec) for p in glob.glob(pattern))


def img2dataset_items(spec: str, *, split: str, policy: ErrorPolicy) -> Iterator[tuple[CaptionRecord, Callable]]:
    """Samples of img2dataset-layout shards: image in ``jpg`` (or png/webp), caption in ``txt``, ids in ``json``."""
    shards = shard_list(spec)
    if not shards:
        raise DataError("no .tar shards found", shard=spec, reason="missing_member")
    index = 0
    for shard in shards:
        for raw in read_shard(shard, policy):
            key = raw["__key__"]
            image = next((raw[e] for e in ("jpg", "jpeg", "png", "webp") if e in raw), None)
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
            except json.JSONDecodeError as exn:
                policy(DataError(f"json does not parse ({exn})", shard=shard, key=key, reason="invalid_json"))
                continue
            caption = normalize_caption(raw["txt"].decode("utf-8", "replace")) if "txt" in raw else ""
            caption = caption or normalize_caption(str(meta.get("caption") or ""))
            if image is None:
                policy(DataError("no image member (jpg/png/webp)", shard=shard, key=key, reason="missing_member"))
                continue
            if not caption:
                policy(DataError("empty caption", shard=shard, key=key, reason="empty_caption"))
                continue
            image_id = str(meta.get("key") or key)
            yield CaptionRecord(image_id, image_id, [caption], split, index), _bytes_opener(image, shard, key)
            index += 1


class ImageFeatures:
    """Loads each item's image (``item.load``), runs the backbone in batches, adds a ~96 px JPEG thumbnail."""

    def __init__(self, backbone: GridBackbone, *, thumbnails: bool = True):
        self.backbone, self.thumbnails = backbone, thumbnails
        self.name = backbone.name
        self.feature_dim = backbone.feature_dim
        self.class_dim = backbone.class_dim if backbone.with_cls else None
        self.boxes_note = f"grid cells of {backbone.name}"

    def features(self, items: Iterator[Item], policy: ErrorPolicy):
        pending: collections.deque = collections.deque()

        def images():
            for item in items:
                try:
                    img = item.load()
                except DataError as err:
                    policy(err)
                    continue
                pending.append((item, thumbnail_jpeg(img) if self.thumbnails else None))
                yield img

        # The converter's own bar shows progress; the backbone's would be a second one.
        for feat, box, cls in self.backbone.extract(images(), progress=False):
            item, thumb = pending.popleft()
            yield item, feat, box, cls, thumb
