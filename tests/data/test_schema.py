"""data/schema.py: sample validation, manifest round trip, box geometry, the error type."""

import json

import numpy as np
import pytest

from ldot.data import DataError, schema


def good_sample(n=4, d=8):
    xy = np.full((n, 2), 0.1, np.float32)
    return {
        "__key__": "00000001", "__url__": "shard-000000.tar",
        schema.FEAT: np.ones((n, d), np.float16),
        schema.BOX: np.concatenate([xy, xy + 0.5], 1),
        schema.META: {"image_id": "a", "captions": ["a cat", "a dog"], "split": "train", "source": "t"},
    }


def reasons(sample, **kw):
    return [r for r, _ in schema.validate_sample(sample, **kw)]


def test_good_sample_has_no_problems():
    assert schema.validate_sample(good_sample(), feature_dim=8) == []


@pytest.mark.parametrize("mutate, reason", [
    (lambda s: s.pop(schema.FEAT), "missing_member"),
    (lambda s: s.__setitem__(schema.FEAT, np.ones((4, 9), np.float16)), "wrong_dim"),
    (lambda s: s.__setitem__(schema.FEAT, np.ones((4, 8), np.float32)), "wrong_dtype"),
    (lambda s: s.__setitem__(schema.FEAT, np.ones((0, 8), np.float16)), "wrong_dim"),
    (lambda s: s[schema.FEAT].__setitem__((0, 0), np.nan), "nonfinite"),
    (lambda s: s[schema.FEAT].__setitem__((1, 2), np.inf), "nonfinite"),
    (lambda s: s.__setitem__(schema.BOX, s[schema.BOX][:3]), "wrong_dim"),
    (lambda s: s[schema.BOX].__setitem__((0, 2), 1.5), "bad_box"),
    (lambda s: s[schema.BOX].__setitem__((0, 2), 0.0), "bad_box"),  # x2 < x1
    (lambda s: s[schema.BOX].__setitem__((0, 0), np.nan), "nonfinite"),
    (lambda s: s[schema.META].__setitem__("captions", []), "empty_caption"),
    (lambda s: s[schema.META].__setitem__("captions", ["ok", "  "]), "empty_caption"),
    (lambda s: s[schema.META].__setitem__("captions", "a cat"), "invalid_json"),
    (lambda s: s[schema.META].pop("image_id"), "invalid_json"),
    (lambda s: s.__setitem__(schema.META, ["not", "a", "dict"]), "invalid_json"),
    (lambda s: s.__setitem__(schema.CLS, np.ones((4, 5), np.float16) / 5), "wrong_dim"),  # manifest says 3
])
def test_each_problem_is_found(mutate, reason):
    s = good_sample()
    s[schema.CLS] = np.ones((4, 3), np.float16) / 3
    assert reasons(s, feature_dim=8, class_dim=3) == []
    mutate(s)
    assert reason in reasons(s, feature_dim=8, class_dim=3)


def test_check_sample_raises_with_shard_key_and_reason():
    s = good_sample()
    s[schema.FEAT][0, 0] = np.nan
    with pytest.raises(DataError) as info:
        schema.check_sample(s, 8)
    err = info.value
    assert (err.shard, err.key, err.reason) == ("shard-000000.tar", "00000001", "nonfinite")
    assert str(err).startswith("shard-000000.tar key 00000001: feat.npy holds NaN")


def test_decode_sample_names_missing_and_undecodable_members():
    raw = {"__key__": "k", "__url__": "s.tar", "feat.npy": b"garbage", "box.npy": b"x", "json": b"{}"}
    with pytest.raises(DataError) as info:
        schema.decode_sample(raw)
    assert info.value.reason == "undecodable" and "feat.npy" in str(info.value)
    raw2 = {"__key__": "k", "__url__": "s.tar", "feat.npy": b"", "json": b"{}"}
    with pytest.raises(DataError, match="missing member box.npy"):
        schema.decode_sample(raw2)
    raw3 = {"__key__": "k", "__url__": "s.tar", "feat.npy": b"", "box.npy": b"", "json": b"{}", "pyd": b"x"}
    with pytest.raises(DataError, match="unexpected member pyd"):  # never unpickled
        schema.decode_sample(raw3)


def test_manifest_round_trip_and_checks(tmp_path):
    m = schema.Manifest(feature_dim=8, shards=[schema.ShardInfo("shard-000000.tar", 3, 15)], source="t", command="c")
    schema.write_manifest(tmp_path, m)
    back = schema.read_manifest(tmp_path)
    assert (back.feature_dim, back.num_samples, back.num_captions, back.schema_version) == (8, 3, 15, schema.SCHEMA_VERSION)
    raw = json.loads((tmp_path / schema.MANIFEST).read_text())
    raw["num_samples"] = 4
    (tmp_path / schema.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="num_samples=4 but its shards sum to 3"):
        schema.read_manifest(tmp_path)
    raw["num_samples"], raw["schema_version"] = 3, 99
    (tmp_path / schema.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="schema version 99"):
        schema.read_manifest(tmp_path)
    with pytest.raises(DataError, match="no manifest.json"):
        schema.read_manifest(tmp_path / "nowhere")


def test_grid_boxes_tile_the_image_and_positions_follow():
    box = schema.grid_boxes(7, 7)
    assert box.shape == (49, 4) and box.dtype == np.float32
    assert np.allclose(box[0], [0, 0, 1 / 7, 1 / 7]) and np.allclose(box[8], [1 / 7, 1 / 7, 2 / 7, 2 / 7])
    assert np.isclose(((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).sum(), 1.0)
    pos = schema.region_positions(np.array([[0.1, 0.2, 0.5, 0.6]], np.float32))
    assert np.allclose(pos, [[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]])
