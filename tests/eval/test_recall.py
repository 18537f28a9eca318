"""eval.recall: encoding paths agree, the top-k path equals the dense one on real encodings, and the
pool split across ranks (sliced encoding, sharded search merged) equals the single-process result."""
import numpy as np
import pytest

from ldot.eval.metrics import retrieval_recall
from ldot.eval.recall import (_image_batches_range, _merge_topk, encode_images, encode_queries, encode_split,
                         evaluate_split, recall_from_embeddings, topk_from_embeddings)


@pytest.fixture(scope="module")
def encoded(tiny_checkpoint, test_split_dir):
    from ldot.data.loader import load_eval_split
    from ldot.model import load_dual_encoder

    tok, model, _ = load_dual_encoder(tiny_checkpoint)
    split = load_eval_split(test_split_dir)
    txt, img = encode_split(model, split, tok, batch_size=16, progress=False)
    return tok, model, split, txt, img


def test_topk_and_dense_recall_agree_on_encodings(encoded):
    tok, model, split, txt, img = encoded
    assert txt.shape == (len(split.captions), model.embed_dim) and img.shape == (split.num_images, model.embed_dim)
    dense = recall_from_embeddings(txt, img, split.caption_image, dense=True)
    top = recall_from_embeddings(txt, img, split.caption_image)
    assert top == dense
    assert retrieval_recall(txt @ img.T, split.caption_image) == pytest.approx(dense, abs=1e-9)
    assert 0 < dense["ar"] < 1
    assert evaluate_split(model, split, tok, batch_size=16, progress=False) == top


def test_query_encoding_and_sliced_image_encoding_match_the_split(encoded):
    tok, model, split, txt, img = encoded
    q = encode_queries(model, tok, split.captions[:7], batch_size=3)
    np.testing.assert_allclose(q, txt[:7], atol=1e-5)
    n = split.num_images
    parts = [encode_images(model, _image_batches_range(split, lo, hi, 4)) for lo, hi in ((0, 5), (5, 5), (5, n))]
    np.testing.assert_allclose(np.concatenate([p for p in parts if p.size]), img, atol=1e-5)


def test_merged_shard_searches_equal_one_search():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(50, 8)).astype(np.float32)
    q = rng.normal(size=(9, 8)).astype(np.float32)
    from ldot.eval.index import build_exact_index, search

    want_s, want_i = search(build_exact_index(pool), q, 7)
    parts = []
    for lo, hi in ((0, 17), (17, 20), (20, 50)):
        s, i = search(build_exact_index(pool[lo:hi]), q, 7)
        parts.append((s, np.where(i >= 0, i + lo, -1)))
    got_s, got_i = _merge_topk(parts, 7)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-6)


def _sharded_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rng = np.random.default_rng(0)
    cap_img = np.repeat(np.arange(40), 3)
    img = rng.normal(size=(40, 8)).astype(np.float32)
    txt = (img[cap_img] + rng.normal(size=(120, 8))).astype(np.float32)
    top = topk_from_embeddings(txt, img, cap_img, 10, sharded=True)
    np.savez(f"{out_dir}/rank{rank}.npz", ir=top.ir_ids, tr=top.tr_ids, irs=top.ir_scores, trs=top.tr_scores)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch
def test_pool_split_across_two_real_ranks(tmp_path):
    """Two gloo processes each search half of both pools; the merged TopK is the single-process one."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rng = np.random.default_rng(0)
    cap_img = np.repeat(np.arange(40), 3)
    img = rng.normal(size=(40, 8)).astype(np.float32)
    txt = (img[cap_img] + rng.normal(size=(120, 8))).astype(np.float32)
    want = topk_from_embeddings(txt, img, cap_img, 10)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(got["ir"], want.ir_ids)
        np.testing.assert_array_equal(got["tr"], want.tr_ids)
        np.testing.assert_allclose(got["irs"], want.ir_scores, rtol=1e-6)
    r = retrieval_recall(want, cap_img)
    assert 0 < r["ar"] < 1

