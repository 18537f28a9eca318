"""data/writer.py: shards + manifest written through webdataset's ShardWriter, validated in and verified out."""

import hashlib

import numpy as np
import pytest

from datafixtures import write_random_dataset
from ldot.data import DataError, schema
from ldot.data.writer import DatasetWriter


def test_shards_and_manifest(tmp_path):
    out = write_random_dataset(tmp_path / "ds", 23, shard_size=10, captions=2)
    m = schema.read_manifest(out)
    assert [s.name for s in m.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.samples for s in m.shards] == [10, 10, 3] and m.num_captions == 46
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s.name for s in m.shards]
    assert m.source == "test" and m.command == "pytest" and m.feature_dim == 8 and 3 <= m.min_regions <= m.max_regions <= 6


def test_same_input_gives_identical_bytes(tmp_path):
    a = write_random_dataset(tmp_path / "a", 12, seed=5)
    b = write_random_dataset(tmp_path / "b", 12, seed=5)
    def digest(d):
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.tar"))]

    assert digest(a) == digest(b)


def test_bad_sample_is_refused_before_writing(tmp_path):
    w = DatasetWriter(tmp_path / "ds", feature_dim=8, source="t", command="c")
    feat = np.zeros((2, 8), np.float16)
    box = np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5]], np.float32)
    w.write(feat, box, {"image_id": "a", "captions": ["x"], "split": "s", "source": "t"})
    with pytest.raises(DataError, match="feature dim 7, the manifest says 8"):
        w.write(np.zeros((2, 7), np.float16), box, {"image_id": "b", "captions": ["x"], "split": "s", "source": "t"})
    with pytest.raises(DataError, match="empty"):
        w.write(feat, box, {"image_id": "b", "captions": [""], "split": "s", "source": "t"})
    with pytest.raises(DataError, match="duplicate sample key"):
        w.write(feat, box, {"image_id": "b", "captions": ["x"], "split": "s", "source": "t"}, key="00000000")
    m = w.close()
    assert m.num_samples == 1


def test_existing_dataset_needs_overwrite(tmp_path):
    out = write_random_dataset(tmp_path / "ds", 3)
    with pytest.raises(DataError, match="already holds a dataset"):
        DatasetWriter(out, feature_dim=8, source="t")
    write_random_dataset(tmp_path / "other", 2)
    w = DatasetWriter(out, feature_dim=8, source="t", overwrite=True)
    with pytest.raises(DataError, match="no samples were written"):
        w.close()


def test_failed_write_leaves_no_manifest(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds", feature_dim=8, source="t") as w:
            w.write(np.zeros((1, 8), np.float16), np.array([[0, 0, 1, 1]], np.float32),
                    {"image_id": "a", "captions": ["x"], "split": "s", "source": "t"})
            raise RuntimeError("converter crashed")
    assert not (tmp_path / "ds" / schema.MANIFEST).exists()
