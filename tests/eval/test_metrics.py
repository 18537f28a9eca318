"""eval.metrics.retrieval_recall against a brute-force ranking written independently (argsort per query)."""
import numpy as np
import pytest
import torch

from eval.metrics import chance_recall, retrieval_recall


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
