"""Caption files of the standard benchmarks → CaptionRecords: multi30k, flickr8k and karpathy layouts."""

from __future__ import annotations

import dataclasses
import gzip
import html
import json
import os
import re
from pathlib import Path

from ldot.data.errors import DataError
from ldot.data.reader import ErrorPolicy


@dataclasses.dataclass
class CaptionRecord:
    image_id: str  # kept as the source names it (e.g. "1000092795.jpg" or a COCO id)
    filename: str  # the image file, relative to an image folder
    captions: list[str]
    split: str
    index: int  # position in the caption source: row of an aligned feature array
    extra: dict | None = None  # more fields for the sample's json (e.g. the source's caption ids)


def normalize_caption(text: str) -> str:
    """HTML entities unescaped, whitespace collapsed, otherwise verbatim (case and punctuation kept)."""
    return " ".join(html.unescape(text).split())


def open_text(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", shard=str(path), reason="missing_member")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_lines(path) -> list[str]:
    with open_text(path) as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def _split_name(path: str | os.PathLike, default: str) -> str:
    return default or Path(str(path)).name.split(".")[0].split("_")[0]


def multi30k_files(prefix: str | os.PathLike, lang: str = "en") -> tuple[Path, list[Path]]:
    """``DIR/train`` → DIR/train_images.txt and DIR/train.{1..5}.en(.gz), the Multi30k task-2 layout."""
    prefix = Path(prefix)
    images = prefix.parent / f"{prefix.name}_images.txt"
    caps = []
    for i in range(1, 6):
        plain = prefix.parent / f"{prefix.name}.{i}.{lang}"
        caps.append(plain if plain.exists() else plain.with_name(plain.name + ".gz"))
    return images, caps


def read_multi30k(images_list, caption_files, *, split: str = "", policy: ErrorPolicy | None = None) -> list[CaptionRecord]:
    """An image list plus caption files, line i of each ↔ image i."""
    policy = policy or ErrorPolicy("error")
    names = read_lines(images_list)
    columns = [read_lines(f) for f in caption_files]
    for f, col in zip(caption_files, columns):
        if len(col) != len(names):
            raise DataError(f"{len(col)} lines, but the image list {images_list} has {len(names)}", shard=str(f),
                            reason="invalid_json")
    split = _split_name(images_list, split)
    records = []
    for i, name in enumerate(names):
        name = name.strip()
        caps = [normalize_caption(col[i]) for col in columns]
        if not name or not all(caps):
            policy(DataError(f"line {i + 1}: {'empty image name' if not name else 'empty caption'}",
                             shard=str(caption_files[[bool(c) for c in caps].index(False)] if name else images_list),
                             key=name or None, reason="empty_caption"))
            continue
        records.append(CaptionRecord(name, name, caps, split, i))
    return records


_FLICKR8K_LINE = re.compile(r"^(?P<name>[^#\t]+)#(?P<n>\d+)\t(?P<caption>.*)$")


def read_flickr8k(token_file, *, split_list=None, split: str = "", policy: ErrorPolicy | None = None) -> list[CaptionRecord]:
    """``NAME.jpg#i<TAB>caption`` lines; grouped per image in file order, or in ``split_list`` order."""
    policy = policy or ErrorPolicy("error")
    by_image: dict[str, list[str]] = {}
    for n, line in enumerate(read_lines(token_file), start=1):
        if not line.strip():
            continue
        m = _FLICKR8K_LINE.match(line)
        if not m:
            policy(DataError(f"line {n} is not NAME.jpg#i<TAB>caption: {line[:60]!r}", shard=str(token_file),
                             reason="invalid_json"))
            continue
        by_image.setdefault(m["name"], []).append(normalize_caption(m["caption"]))
    if split_list is not None:
        order = [x.strip() for x in read_lines(split_list) if x.strip()]
        m = re.search(r"\.(\w+?)Images\.txt$", str(split_list))  # Flickr_8k.trainImages.txt → train
        split = split or (m[1] if m else _split_name(split_list, ""))
    else:
        order = list(by_image)
        split = split or "all"
    records = []
    for i, name in enumerate(order):
        caps = by_image.get(name)
        if not caps:
            policy(DataError("listed in the split file but has no captions", shard=str(token_file), key=name,
                             reason="empty_caption"))
            continue
        if not all(caps):
            policy(DataError("empty caption", shard=str(token_file), key=name, reason="empty_caption"))
            continue
        records.append(CaptionRecord(name, name, caps, split, i))
    return records


def read_karpathy(json_file, *, splits: str = "", policy: ErrorPolicy | None = None) -> list[CaptionRecord]:
    """``dataset_{coco,flickr30k,flickr8k}.json``: images[].filename, sentences[].raw, split (comma list filter)."""
    policy = policy or ErrorPolicy("error")
    try:
        with open_text(json_file) as f:
            images = json.load(f)["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exn:
        raise DataError(f"not a Karpathy split file ({exn!r})", shard=str(json_file), reason="invalid_json") from None
    wanted = {s for s in splits.split(",") if s}
    records = []
    selected = -1  # position among the selected images: the row of a per-split feature array
    for im in images:
        if wanted and im.get("split") not in wanted:
            continue
        selected += 1
        i = selected
        try:
            name = im["filename"]
            caps = [normalize_caption(s["raw"]) for s in im["sentences"]]
        except (KeyError, TypeError) as exn:
            policy(DataError(f"image entry {i} lacks {exn}", shard=str(json_file), reason="invalid_json"))
            continue
        if not caps or not all(caps):
            policy(DataError("empty caption", shard=str(json_file), key=name, reason="empty_caption"))
            continue
        filename = f"{im['filepath']}/{name}" if im.get("filepath") else name
        records.append(CaptionRecord(str(im.get("cocoid", name)), filename, caps, im.get("split", ""), i))
    return records
