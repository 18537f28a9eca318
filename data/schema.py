"""The shard schema of DESIGN.md: member names, the manifest, per-sample decoding and validation.

One sample per image. Members of sample ``{key}``:
  ``feat.npy`` float16 [N, D] region/patch features · ``box.npy`` float32 [N, 4] normalized x1,y1,x2,y2 ·
  ``cls.npy`` optional float16 [N, C] soft class distribution · ``json`` {"image_id", "captions",
  "split", "source", ...} · ``jpg`` optional small thumbnail (~96 px) for picture grids.
A dataset directory holds ``shard-%06d.tar`` and ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from ldot.data.errors import DataError

SCHEMA_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-*.tar"
MANIFEST = "manifest.json"

FEAT, BOX, CLS, META, THUMB = "feat.npy", "box.npy", "cls.npy", "json", "jpg"
REQUIRED_MEMBERS = (FEAT, BOX, META)
OPTIONAL_MEMBERS = (CLS, THUMB)
DECODED_MEMBERS = (FEAT, BOX, CLS, META)  # the thumbnail stays JPEG bytes
# Detector boxes are sometimes a hair outside the image after normalization.
BOX_TOLERANCE = 1e-3
# A sample key is the tar member name up to the first dot (webdataset's grouping rule).
_KEY_RE = re.compile(r"^[^./][^.]*$")

# Skip reasons, the vocabulary of TrainLoader.skipped and of inspect's report.
REASONS = (
    "missing_member",  # a required member is absent
    "unexpected_member",  # a member the schema does not know
    "undecodable",  # npy / jpg bytes that do not decode
    "invalid_json",  # json member that does not parse or lacks a field
    "empty_caption",  # no captions, or an empty one
    "wrong_dim",  # shape or feature/class dim differs from the manifest
    "wrong_dtype",
    "nonfinite",  # NaN or inf in features, boxes or classes
    "bad_box",  # box outside [0, 1] or with x2 < x1 / y2 < y1
    "corrupt_tar",  # a shard that cannot be read (truncated, not a tar); counts the samples lost
    "missing_image",  # converters: a caption record whose image file / LMDB entry is absent
)


# --------------------------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class ShardInfo:
    name: str  # file name inside the dataset directory
    samples: int
    captions: int


@dataclasses.dataclass
class Manifest:
    """What a dataset directory holds and how it was made (``manifest.json``)."""

    feature_dim: int
    shards: list[ShardInfo]
    class_dim: int | None = None
    source: str = ""
    command: str = ""
    split: str | None = None
    has_thumbnails: bool = False
    min_regions: int | None = None
    max_regions: int | None = None
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # producer-specific facts

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_captions(self) -> int:
        return sum(s.captions for s in self.shards)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_samples"] = self.num_samples
        d["num_captions"] = self.num_captions
        return d


def write_manifest(data_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (a crash never leaves half a manifest)."""
    if not manifest.created:
        manifest.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path = Path(data_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str | os.PathLike) -> Manifest:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} (is this a dataset directory made by `ldot data`?)", shard=str(data_dir))
    try:
        raw = json.loads(path.read_text())
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(f"schema version {version}, this code reads {SCHEMA_VERSION}", shard=str(path))
        shards = [ShardInfo(name=s["name"], samples=int(s["samples"]), captions=int(s["captions"])) for s in raw["shards"]]
        fields = {f.name for f in dataclasses.fields(Manifest)} - {"shards"}
        kwargs = {k: v for k, v in raw.items() if k in fields}
        manifest = Manifest(shards=shards, **kwargs)
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exn:
        raise DataError(f"unreadable manifest: {exn!r}", shard=str(path)) from None
    for key, value in (("num_samples", manifest.num_samples), ("num_captions", manifest.num_captions)):
        if key in raw and raw[key] != value:
            raise DataError(f"manifest {key}={raw[key]} but its shards sum to {value}", shard=str(path))
    if not isinstance(manifest.feature_dim, int) or manifest.feature_dim < 1:
        raise DataError(f"manifest feature_dim {manifest.feature_dim!r} is not a positive integer", shard=str(path))
    return manifest


def shard_paths(data_dir: str | os.PathLike, manifest: Manifest) -> list[str]:
    return [str(Path(data_dir) / s.name) for s in manifest.shards]


# --------------------------------------------------------------------------------------------- samples


def valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


# Only the schema's members are decoded: a stray .pyd/.pth member in a foreign shard must never be unpickled.
_DECODER = wds.autodecode.Decoder([], only=list(DECODED_MEMBERS))


def _where(raw: dict) -> dict:
    return {"shard": raw.get("__url__"), "key": raw.get("__key__")}


def decode_sample(raw: dict) -> dict:
    """Raw tar members (bytes) → arrays and dict, with webdataset's decoder. Raises DataError."""
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    if missing:
        raise DataError(f"missing member {', '.join(missing)}", reason="missing_member", **_where(raw))
    unknown = sorted(k for k in raw if not k.startswith("__") and k not in REQUIRED_MEMBERS + OPTIONAL_MEMBERS)
    if unknown:
        raise DataError(f"unexpected member {', '.join(unknown)}", reason="unexpected_member", **_where(raw))
    try:
        return _DECODER(raw)
    except wds.autodecode.DecodingError as exn:
        cause = exn.__cause__
        reason = "invalid_json" if exn.k == META else "undecodable"
        raise DataError(f"{exn.k} does not decode ({type(cause).__name__}: {cause})", reason=reason, **_where(raw)) from None


def _all_finite(arr: np.ndarray) -> bool:
    """np.isfinite(arr).all(), without numpy's float16 arithmetic (element by element through float32,
    ~10x slower than reading the exponent bits: it was most of a converter's time per sample)."""
    if arr.dtype == np.float16:
        return bool(((arr.view(np.uint16) & 0x7C00) != 0x7C00).all())  # exponent all ones: inf or NaN
    return bool(np.isfinite(arr).all())


def validate_sample(sample: dict, feature_dim: int | None = None, class_dim: int | None = None) -> list[tuple[str, str]]:
    """Problems of one decoded sample as (reason, sentence) pairs; empty when the sample is valid."""
    problems: list[tuple[str, str]] = []

    def bad(reason: str, text: str):
        problems.append((reason, text))

    feat, box, cls, meta = sample.get(FEAT), sample.get(BOX), sample.get(CLS), sample.get(META)
    for name, arr in ((FEAT, feat), (BOX, box)):
        if arr is None:
            bad("missing_member", f"missing member {name}")
        elif not isinstance(arr, np.ndarray):
            bad("undecodable", f"{name} is a {type(arr).__name__}, not an array")
    if problems:
        return problems

    if feat.dtype != np.float16:
        bad("wrong_dtype", f"{FEAT} has dtype {feat.dtype}, the schema says float16")
    if feat.ndim != 2 or feat.shape[0] < 1:
        bad("wrong_dim", f"{FEAT} has shape {feat.shape}, the schema says [N>=1, D]")
    elif feature_dim is not None and feat.shape[1] != feature_dim:
        bad("wrong_dim", f"{FEAT} has feature dim {feat.shape[1]}, the manifest says {feature_dim}")
    if box.dtype != np.float32:
        bad("wrong_dtype", f"{BOX} has dtype {box.dtype}, the schema says float32")
    if box.ndim != 2 or box.shape[1:] != (4,):
        bad("wrong_dim", f"{BOX} has shape {box.shape}, the schema says [N, 4]")
    elif feat.ndim == 2 and box.shape[0] != feat.shape[0]:
        bad("wrong_dim", f"{BOX} has {box.shape[0]} boxes for {feat.shape[0]} regions")
    if feat.dtype.kind == "f" and not _all_finite(feat):
        bad("nonfinite", f"{FEAT} holds NaN or inf")
    if box.dtype.kind == "f":
        if not np.isfinite(box).all():
            bad("nonfinite", f"{BOX} holds NaN or inf")
        elif box.ndim == 2 and box.shape[1:] == (4,) and box.size:
            if box.min() < -BOX_TOLERANCE or box.max() > 1 + BOX_TOLERANCE:
                bad("bad_box", f"{BOX} leaves [0, 1] (min {box.min():.4g}, max {box.max():.4g})")
            elif (box[:, 2] < box[:, 0]).any() or (box[:, 3] < box[:, 1]).any():
                bad("bad_box", f"{BOX} has a box with x2 < x1 or y2 < y1")

    if cls is not None:
        if not isinstance(cls, np.ndarray):
            bad("undecodable", f"{CLS} is a {type(cls).__name__}, not an array")
        else:
            if cls.dtype != np.float16:
                bad("wrong_dtype", f"{CLS} has dtype {cls.dtype}, the schema says float16")
            if cls.ndim != 2 or (feat.ndim == 2 and cls.shape[0] != feat.shape[0]):
                bad("wrong_dim", f"{CLS} has shape {cls.shape} for {feat.shape[0]} regions")
            elif class_dim is not None and cls.shape[1] != class_dim:
                bad("wrong_dim", f"{CLS} has class dim {cls.shape[1]}, the manifest says {class_dim}")
            if cls.dtype.kind == "f" and not _all_finite(cls):
                bad("nonfinite", f"{CLS} holds NaN or inf")
    elif class_dim is not None:
        bad("missing_member", f"missing member {CLS} (the manifest says class_dim {class_dim})")

    problems += validate_meta(meta)
    return problems


def validate_meta(meta: Any) -> list[tuple[str, str]]:
    """Problems of a decoded ``json`` member (image_id, captions, split, source)."""
    problems: list[tuple[str, str]] = []

    def bad(reason: str, text: str):
        problems.append((reason, text))

    if meta is None:
        bad("missing_member", f"missing member {META}")
    elif not isinstance(meta, dict):
        bad("invalid_json", f"{META} is a {type(meta).__name__}, not an object")
    else:
        for field in ("image_id", "split", "source"):
            if not isinstance(meta.get(field), str) or (field == "image_id" and not meta[field]):
                bad("invalid_json", f"{META} field {field!r} is missing or not a string: {meta.get(field)!r}")
        caps = meta.get("captions")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            bad("invalid_json", f"{META} field 'captions' is not a list of strings: {caps!r:.80}")
        elif not caps:
            bad("empty_caption", "no captions")
        elif any(not c.strip() for c in caps):
            bad("empty_caption", f"caption {[i for i, c in enumerate(caps) if not c.strip()][0]} is empty")
    return problems


def check_sample(sample: dict, feature_dim: int | None = None, class_dim: int | None = None) -> dict:
    """validate_sample, raising the first problem as a DataError; returns the sample for pipeline use."""
    problems = validate_sample(sample, feature_dim, class_dim)
    if problems:
        reason, text = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(text + more, reason=reason, **_where(sample))
    return sample


def region_positions(box: np.ndarray) -> np.ndarray:
    """[N, 4] x1,y1,x2,y2 → [N, 7] x1,y1,x2,y2,w,h,area: the paper's 7-d box position input."""
    box = box.astype(np.float32, copy=False)
    w = box[:, 2] - box[:, 0]
    h = box[:, 3] - box[:, 1]
    return np.concatenate([box, w[:, None], h[:, None], (w * h)[:, None]], axis=1)


def grid_boxes(rows: int, cols: int) -> np.ndarray:
    """Normalized boxes of a rows×cols grid, row-major (the order of a flattened CNN feature map)."""
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x1, y1 = xs.ravel() / cols, ys.ravel() / rows
    return np.stack([x1, y1, x1 + 1 / cols, y1 + 1 / rows], axis=1).astype(np.float32)
