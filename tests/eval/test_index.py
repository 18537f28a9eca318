"""eval.index: FAISS exact search against matmul, IVF/HNSW against exact, the index directory's
save/load round trip and its refusals (wrong checkpoint, mixed files, missing files)."""
import json
import shutil

import numpy as np
import pytest

from ldot.eval.errors import EvalError
from ldot.eval.index import (build_exact_index, build_index, checkpoint_fingerprint, dense_scores, load_index,
                        overlap_at_k, save_index, search)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_dense_scores_equal_matmul():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(37, 16)).astype(np.float32), rng.normal(size=(11, 16)).astype(np.float32)
    index = build_exact_index(img)
    np.testing.assert_allclose(dense_scores(index, txt), txt @ img.T, rtol=1e-5, atol=1e-5)
    scores, ids = search(index, txt, 5)
    np.testing.assert_array_equal(ids, np.argsort(-(txt @ img.T), axis=1)[:, :5])


@pytest.mark.parametrize("kind,params,floor", [("ivf", {"nlist": 16, "nprobe": 16}, 1.0),  # every list: exact
                                               ("ivf", {"nlist": 32, "nprobe": 4}, 0.3),
                                               ("hnsw", {"hnsw_m": 16, "ef_search": 64}, 0.9)])
def test_approximate_indexes_against_exact(kind, params, floor):
    rng = np.random.default_rng(1)
    base, queries = _unit(rng, 2000, 32), _unit(rng, 100, 32)
    _, exact_ids = search(build_exact_index(base), queries, 10)
    index, got_params = build_index(base, kind, **params)
    _, ids = search(index, queries, 10)
    overlap = overlap_at_k(ids, exact_ids, 10)
    assert floor <= overlap <= 1.0
    if kind == "ivf" and params["nprobe"] < params["nlist"]:
        assert overlap < 1.0  # probing 4 of 32 lists of random vectors does miss neighbours
    assert got_params and all(v is not None for v in got_params.values())


def test_overlap_at_k_counts_shared_ids():
    assert overlap_at_k(np.array([[1, 2, 3]]), np.array([[3, 9, 1]]), 3) == pytest.approx(2 / 3)
    assert overlap_at_k(np.array([[1, -1]]), np.array([[1, 2]]), 2) == 0.5


def _items(n):
    return [{"image_id": f"img{i}", "key": f"{i:08d}", "captions": [f"caption {i}"]} for i in range(n)]


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, tiny_checkpoint, kind):
    rng = np.random.default_rng(2)
    base, q = _unit(rng, 300, 16), _unit(rng, 5, 16)
    index, params = build_index(base, kind, nlist=4, nprobe=2)
    want = search(index, q, 7)
    save_index(tmp_path / "idx", index, _items(300), kind=kind, params=params, checkpoint=tiny_checkpoint)
    loaded = load_index(tmp_path / "idx", checkpoint=tiny_checkpoint)
    got = search(loaded.index, q, 7)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert loaded.image_ids[:2] == ["img0", "img1"] and loaded.meta["type"] == kind
    assert loaded.meta["params"] == params


def test_load_refuses_what_does_not_belong_together(tmp_path, tiny_checkpoint, other_checkpoint):
    base = _unit(np.random.default_rng(3), 20, 16)
    index, _ = build_index(base)
    out = save_index(tmp_path / "a", index, _items(20), kind="exact", params={}, checkpoint=tiny_checkpoint)
    with pytest.raises(EvalError, match=r"index\.json: the index was built by the checkpoint .* not by"):
        load_index(out, checkpoint=other_checkpoint)
    # items.jsonl from another build
    save_index(tmp_path / "b", build_index(base[:10])[0], _items(10), kind="exact", params={},
               checkpoint=tiny_checkpoint)
    shutil.copy(tmp_path / "b" / "items.jsonl", out / "items.jsonl")
    with pytest.raises(EvalError, match=r"items\.jsonl: contents differ"):
        load_index(out)
    (out / "index.faiss").unlink()
    with pytest.raises(EvalError, match=r"index\.faiss: missing"):
        load_index(out)
    with pytest.raises(EvalError, match="no index.json"):
        load_index(tmp_path / "nowhere")
    (tmp_path / "b" / "index.json").write_text("{not json")
    with pytest.raises(EvalError, match="index.json: not JSON"):
        load_index(tmp_path / "b")
    with pytest.raises(EvalError, match="holds 20 vectors but 3 items"):
        save_index(tmp_path / "c", index, _items(3), kind="exact", params={}, checkpoint=tiny_checkpoint)


def test_fingerprint_follows_model_files_only(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    fp = checkpoint_fingerprint(ckpt)
    assert fp == checkpoint_fingerprint(tiny_checkpoint)  # same files elsewhere: same fingerprint
    (ckpt / "recall.json").write_text(json.dumps({"ar": 0.5}))  # an eval output: not part of the model
    assert checkpoint_fingerprint(ckpt) == fp
    with open(ckpt / "heads.pt", "ab") as f:
        f.write(b"\0")
    assert checkpoint_fingerprint(ckpt) != fp
    with pytest.raises(EvalError, match="not an exported ldot checkpoint"):
        checkpoint_fingerprint(tmp_path)
