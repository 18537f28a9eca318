"""eval.metrics.retrieval_recall against a brute-force ranking written independently (argsort per query)."""
from math import comb

import numpy as np
import pytest
import torch

from ldot.eval.metrics import chance_recall, retrieval_recall


def brute_force(scores: np.ndarray, caption_image: np.ndarray, ks):
    n_cap, n_img = scores.shape
    out = {}
    ir_ranks = []
    for c in range(n_cap):
        order = np.argsort(-scores[c], kind="stable")
        ir_ranks.append(int(np.where(order == caption_image[c])[0][0]))
    tr_ranks = []
    for i in range(n_img):
        own = np.where(caption_image == i)[0]
        if len(own) == 0:
            continue
        order = np.argsort(-scores[:, i], kind="stable")
        tr_ranks.append(min(int(np.where(order == c)[0][0]) for c in own))
    for k in ks:
        out[f"tr_r{k}"] = float(np.mean(np.array(tr_ranks) < k))
    for k in ks:
        out[f"ir_r{k}"] = float(np.mean(np.array(ir_ranks) < k))
    out["ar"] = float(np.mean([v for v in out.values()]))
    return out


@pytest.mark.parametrize("n_img,caps,seed", [(7, 5, 0), (40, 5, 1), (33, 3, 2), (12, 1, 3)])
def test_matches_brute_force(n_img, caps, seed):
    rng = np.random.default_rng(seed)
    cap_img = np.repeat(np.arange(n_img), caps)
    rng.shuffle(cap_img)
    # mix signal and noise so recall lands strictly between 0 and 1
    scores = rng.normal(size=(len(cap_img), n_img)).astype(np.float32)
    scores[np.arange(len(cap_img)), cap_img] += rng.uniform(0, 2.5, size=len(cap_img))
    ks = (1, 5, 10)
    got = retrieval_recall(torch.from_numpy(scores), cap_img, ks)
    want = brute_force(scores, cap_img, ks)
    assert set(got) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "ar"}
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    assert 0 < got["ar"] < 1


def test_perfect_and_collapsed():
    cap_img = np.repeat(np.arange(30), 5)
    perfect = -np.ones((150, 30), np.float32)
    perfect[np.arange(150), cap_img] = 1
    assert retrieval_recall(perfect, cap_img)["ar"] == 1.0
    # ties count against the ground truth: a constant scorer is not rewarded
    assert retrieval_recall(np.zeros((150, 30), np.float32), cap_img)["ar"] == 0.0


def test_images_without_captions_are_not_counted_in_tr():
    cap_img = np.array([0, 0, 1])
    scores = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], np.float32)  # image 2 has no caption
    r = retrieval_recall(scores, cap_img, ks=(1,))
    assert r["tr_r1"] == 1.0 and r["ir_r1"] == 1.0


def test_chance_matches_random_scores():
    rng = np.random.default_rng(0)
    cap_img = np.repeat(np.arange(30), 5)
    runs = [retrieval_recall(rng.normal(size=(150, 30)), cap_img) for _ in range(200)]
    mean = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
    chance = chance_recall(cap_img, 30)
    for k in chance:
        assert mean[k] == pytest.approx(chance[k], abs=0.02), k


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="caption_image"):
        retrieval_recall(np.zeros((4, 3)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_recall(np.zeros((2, 3)), np.array([0, 3]))


# ---------------------------------------------------------------- the top-k path (no dense matrix)

def _embeddings(seed, n_img, caps_per_image, d=8, quantize=False):
    """Captions near their image; quantized to a coarse grid, scores tie often (exact in float32)."""
    rng = np.random.default_rng(seed)
    cap_img = np.concatenate([np.full(c, i) for i, c in enumerate(caps_per_image)]).astype(np.int64)
    img = rng.normal(size=(n_img, d)).astype(np.float32)
    txt = (img[cap_img] + rng.normal(scale=1.2, size=(len(cap_img), d))).astype(np.float32)
    if quantize:
        img, txt = np.round(img).clip(-2, 2), np.round(txt).clip(-2, 2)
    return txt.astype(np.float32), img.astype(np.float32), cap_img


def _topk_by_argsort(txt, img, cap_img, depth_ir, depth_tr, qc=None, qi=None):
    """TopK built without FAISS (numpy argsort), so the metric's top-k logic is checked on its own."""
    from ldot.eval.metrics import TopK

    s = txt @ img.T
    qc = np.arange(len(txt)) if qc is None else qc
    qi = np.arange(len(img)) if qi is None else qi
    ir = np.argsort(-s[qc], axis=1, kind="stable")[:, :depth_ir]
    tr = np.argsort(-s.T[qi], axis=1, kind="stable")[:, :depth_tr]
    return TopK(ir, np.take_along_axis(s[qc], ir, 1), tr, np.take_along_axis(s.T[qi], tr, 1),
                num_images=len(img), num_captions=len(txt), ir_query=qc, tr_query=qi)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_path_equals_dense_path(seed, quantize):
    """Variable captions per image (0..5), ties (quantized) or not: both paths give the same recall."""
    from ldot.eval.recall import topk_from_embeddings

    rng = np.random.default_rng(100 + seed)
    caps = rng.integers(0, 6, size=30)
    caps[0] = 5
    txt, img, cap_img = _embeddings(seed, 30, caps, quantize=quantize)
    ks = (1, 5, 10)
    dense = retrieval_recall(txt @ img.T, cap_img, ks)
    faiss_top = retrieval_recall(topk_from_embeddings(txt, img, cap_img, max(ks)), cap_img, ks)
    m = int(np.bincount(cap_img).max())
    numpy_top = retrieval_recall(_topk_by_argsort(txt, img, cap_img, 11, 10 + m), cap_img, ks)
    assert 0 < dense["ar"] < 1
    assert faiss_top == dense
    assert numpy_top == dense
    if not quantize:  # brute_force's stable argsort lets ties favour the ground truth
        assert dense == pytest.approx(brute_force(txt @ img.T, cap_img, ks), abs=1e-12)


def test_ties_in_topk_count_against_ground_truth():
    """Ground truth tied with the K-th candidate and with candidates beyond the rows: still a miss at K."""
    from ldot.eval.metrics import TopK

    # one caption query; 4 images all scoring 1.0, its own image (2) listed last of a 2-deep row
    cap_img = np.array([2, 0, 1, 3])
    top = TopK(ir_ids=np.array([[0, 2]]), ir_scores=np.array([[1.0, 1.0]]),
               tr_ids=np.zeros((0, 2), np.int64), tr_scores=np.zeros((0, 2)), num_images=4, num_captions=4,
               ir_query=np.array([0]), tr_query=np.zeros(0, np.int64))
    assert retrieval_recall(top, cap_img, ks=(1,))["ir_r1"] == 0.0


def test_topk_rows_too_shallow_raise():
    from ldot.eval.recall import topk_from_embeddings

    txt, img, cap_img = _embeddings(0, 30, [5] * 30)
    top = topk_from_embeddings(txt, img, cap_img, 5)
    with pytest.raises(ValueError, match="deep"):
        retrieval_recall(top, cap_img, ks=(1, 5, 10))


def test_query_subset_with_distractors_matches_brute_force():
    """The paper's full setting: test queries ranked against a pool that also holds other images/captions."""
    from ldot.eval.recall import topk_from_embeddings

    txt, img, cap_img = _embeddings(3, 60, [3] * 20 + [5] * 40)
    qi = np.arange(20)                               # the "test" images ...
    qc = np.flatnonzero(cap_img < 20)                # ... and their captions
    ks = (5, 10, 20)
    got = retrieval_recall(topk_from_embeddings(txt, img, cap_img, 20, query_captions=qc, query_images=qi),
                           cap_img, ks)
    s = txt @ img.T
    ir = [int(np.sum(np.delete(s[c], cap_img[c]) >= s[c, cap_img[c]])) for c in qc]
    tr = []
    for i in qi:
        own = cap_img == i
        tr.append(int(np.sum(s[~own, i] >= s[own, i].max())))
    for k in ks:
        assert got[f"ir_r{k}"] == pytest.approx(np.mean(np.array(ir) < k), abs=1e-12)
        assert got[f"tr_r{k}"] == pytest.approx(np.mean(np.array(tr) < k), abs=1e-12)
    assert 0 < got["ir_r5"] < got["ir_r20"] < 1
    ch = chance_recall(cap_img, 60, ks, query_images=qi)
    assert ch["ir_r5"] == pytest.approx(5 / 60)
    assert ch["tr_r5"] == pytest.approx(1 - comb(len(cap_img) - 3, 5) / comb(len(cap_img), 5))


def test_recall_curve_agrees_with_table():
    from ldot.eval.metrics import recall_curve

    txt, img, cap_img = _embeddings(4, 40, [5] * 40)
    curve = recall_curve(txt @ img.T, cap_img, 20)
    table = retrieval_recall(txt @ img.T, cap_img, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert curve["ir"][k - 1] == table[f"ir_r{k}"] and curve["tr"][k - 1] == table[f"tr_r{k}"]
    assert np.all(np.diff(curve["ir"]) >= 0) and curve["ir"][-1] < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_clip_benchmark_recall_at_k(seed):
    """A second, independent implementation: LAION's clip_benchmark (installed with --no-deps).

    Its torch.topk breaks ties arbitrarily, so the scores here are continuous (tie-free)."""
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    txt, img, cap_img = _embeddings(10 + seed, 50, [5] * 50, d=16)
    scores = torch.from_numpy(txt @ img.T)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(cap_img)), torch.from_numpy(cap_img)] = True
    ks = (1, 5, 10)
    ours = retrieval_recall(scores, cap_img, ks)
    for k in ks:
        ir = (zr.recall_at_k(scores, positive, k) > 0).float().mean().item()
        tr = (zr.recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
        assert ours[f"ir_r{k}"] == pytest.approx(ir, abs=1e-6), k
        assert ours[f"tr_r{k}"] == pytest.approx(tr, abs=1e-6), k
    assert 0 < ours["ar"] < 1
