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


def _webdataset_shards(out, samples, shard_size, max_shard_bytes):
    """The same samples through webdataset's ShardWriter, as DatasetWriter wrote them before it wrote tar
    members itself: the golden its shards must equal byte for byte."""
    import webdataset as wds

    out.mkdir()
    with wds.ShardWriter(str(out / schema.SHARD_PATTERN), maxcount=shard_size, maxsize=max_shard_bytes, verbose=0,
                         mtime=0) as sink:
        for s in samples:
            sink.write(dict(s))
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_shards_equal_webdatasets_byte_for_byte(tmp_path):
    """Every member kind (feat, box, cls, json, jpg), shards cut by count and by bytes, arrays that are not
    C-contiguous, keys tar cannot put in a plain header (long, non-ASCII), member sizes around 512."""
    rng = np.random.default_rng(3)
    keys = ([f"{k:08d}" for k in range(9)] + ["k" * 120, "clé-été", "a-b_c"]
            + [f"{k:08d}" for k in range(20, 31)])
    samples = []
    for i, key in enumerate(keys):
        r = int(rng.integers(1, 40))
        dim = 8
        feat = rng.standard_normal((r, dim)).astype(np.float16)
        if i % 5 == 1:
            feat = np.asfortranarray(feat)
        xy = rng.uniform(0, 0.5, size=(r, 2)).astype(np.float32)
        box = np.concatenate([xy, xy + 0.25], 1).astype(np.float32)
        if i % 5 == 2:
            box = np.concatenate([box, box], 1)[:, ::2]  # a strided view
            box[:] = np.concatenate([xy, xy + 0.25], 1)
        meta = {"image_id": f"img{i}", "captions": [f"caption {j} of {i} é" for j in range(1 + i % 3)],
                "split": "train", "source": "test", "extra": {"n": i, "f": 0.1 * i}}
        s = {"__key__": key, schema.FEAT: feat, schema.BOX: box, schema.META: meta}
        s[schema.CLS] = rng.dirichlet(np.ones(4), size=r).astype(np.float16)[::-1]  # reversed: negative strides
        if i % 3 == 0:
            s[schema.THUMB] = bytes(rng.integers(0, 256, size=int(rng.integers(0, 1100)), dtype=np.uint8))
        samples.append(s)
    for shard_size, max_bytes in ((5, 1e9), (1000, 3000)):
        out = tmp_path / f"ds{shard_size}"
        with DatasetWriter(out, feature_dim=8, class_dim=4, source="test", command="pytest", shard_size=shard_size,
                           max_shard_bytes=max_bytes) as w:
            for s in samples:
                w.write(s[schema.FEAT], s[schema.BOX], s[schema.META], cls=s.get(schema.CLS),
                        thumb=s.get(schema.THUMB), key=s["__key__"])
        golden = _webdataset_shards(tmp_path / f"golden{shard_size}", samples, shard_size, max_bytes)
        got = {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}
        assert list(got) == list(golden) and len(golden) > 2
        for name in golden:
            assert got[name] == golden[name], name


def test_header_template_is_tarfiles_header():
    from ldot.data.tarshards import fast_header, member_header

    for name in ["a.json", "00000001.feat.npy", "x/y.box.npy", "k" * 95 + ".json", "k" * 101, "clé.json"]:
        for size in (0, 1, 511, 512, 513, 400_000, 8 ** 11 - 1, 8 ** 11):
            assert fast_header(name, size) == member_header(name, size), (name, size)


def _one_sample(w, key="a"):
    w.write(np.zeros((2, 8), np.float16), np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5]], np.float32),
            {"image_id": key, "captions": ["x"], "split": "s", "source": "t"}, key=key)


def test_a_shard_that_does_not_read_back_as_written_fails_the_write(tmp_path):
    w = DatasetWriter(tmp_path / "ds", feature_dim=8, source="t", command="c")
    _one_sample(w)
    _one_sample(w, "b")
    w._sink.file.flush()
    with open(w._sink.fname, "r+b") as f:  # another writer scribbles on the second member's header (feat.npy, after box.npy: 512 + 512)
        f.seek(1024 + 3)
        f.write(b"x")
    with pytest.raises(DataError, match="member header at byte 1024 does not read back"):
        w.close()


def test_an_npy_header_that_does_not_parse_back_is_refused_before_writing(tmp_path, monkeypatch):
    from ldot.data import tarshards

    real = tarshards.npy_format.header_data_from_array_1_0
    monkeypatch.setattr(tarshards, "_NPY_HEADERS", {})
    monkeypatch.setattr(tarshards.npy_format, "header_data_from_array_1_0",
                        lambda a: {**real(a), "shape": a.shape[::-1]})
    w = DatasetWriter(tmp_path / "ds", feature_dim=8, source="t", command="c")
    with pytest.raises(DataError, match="does not read back"):
        _one_sample(w)
    assert len(w) == 0 and w._sink.offset == 0
