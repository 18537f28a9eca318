"""Helpers of the data tests: small datasets written on the fly (valid or broken on purpose), the real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldot.data import schema
from ldot.data.writer import DatasetWriter

REAL_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def real_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = REAL_DATA.joinpath(*parts).resolve()
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the ../shared/data folder beside the checkout)")
    return path


def write_random_dataset(out: Path, n: int, *, shard_size: int = 10, dim: int = 8, regions=(3, 6), captions: int = 3,
                         seed: int = 0, class_dim: int | None = None) -> Path:
    """A small valid dataset with random features; caption i of image k reads 'image k caption i'."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, feature_dim=dim, class_dim=class_dim, source="test", split="train",
                       shard_size=shard_size, command="pytest") as w:
        for k in range(n):
            r = int(rng.integers(regions[0], regions[1] + 1))
            xy = rng.uniform(0, 0.5, size=(r, 2)).astype(np.float32)
            box = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, size=(r, 2)).astype(np.float32)], 1)
            cls = None
            if class_dim:
                cls = rng.dirichlet(np.ones(class_dim), size=r).astype(np.float16)
            meta = {"image_id": f"img{k}", "captions": [f"image {k} caption {i}" for i in range(captions)],
                    "split": "train", "source": "test"}
            w.write(rng.standard_normal((r, dim)).astype(np.float16), box, meta, cls=cls)
    return out


def good_members(k: int, dim: int = 8, regions: int = 3) -> dict:
    """Members of one valid sample, ready for corrupting (arrays and dict, encoded by webdataset)."""
    xy = np.full((regions, 2), 0.1, np.float32)
    return {"__key__": f"{k:08d}", schema.FEAT: np.full((regions, dim), k, np.float16),
            schema.BOX: np.concatenate([xy, xy + 0.5], 1),
            schema.META: {"image_id": f"img{k}", "captions": [f"image {k} caption {i}" for i in range(3)],
                          "split": "train", "source": "test"}}


def write_raw_dataset(out: Path, shards: list[list[dict]], dim: int = 8) -> Path:
    """Shards written as given, with no validation, and a manifest that believes in them: for bad-input tests."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, samples in enumerate(shards):
        name = schema.SHARD_PATTERN % i
        with wds.TarWriter(str(out / name)) as tw:
            for s in samples:
                tw.write(s)
        caps = sum(len(s[schema.META]["captions"]) for s in samples if isinstance(s.get(schema.META), dict))
        infos.append(schema.ShardInfo(name, len(samples), caps))
    schema.write_manifest(out, schema.Manifest(feature_dim=dim, shards=infos, source="test", command="pytest"))
    return out


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# Every bad-input case of issue 3 that lives inside a sample: (name, corrupt(members) -> members, reason).
def _set(key, value):
    def f(m):
        m[key] = value
        return m
    return f


def _nan(m):
    m[schema.FEAT] = m[schema.FEAT].copy()
    m[schema.FEAT][0, 0] = np.nan
    return m


BAD_SAMPLES = [
    ("missing_member", lambda m: {k: v for k, v in m.items() if k != schema.BOX}, "missing_member"),
    ("wrong_feature_dim", _set(schema.FEAT, np.zeros((3, 5), np.float16)), "wrong_dim"),
    ("nan_features", _nan, "nonfinite"),
    ("empty_caption", _set(schema.META, {"image_id": "x", "captions": [""], "split": "t", "source": "t"}), "empty_caption"),
    ("invalid_json", _set(schema.META, b"{\"image_id\": "), "invalid_json"),
    ("undecodable_npy", _set(schema.FEAT, b"\x93NUMPY garbage"), "undecodable"),
]
