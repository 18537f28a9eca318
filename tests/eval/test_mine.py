"""eval/hard_negatives.py against a brute force over the dense score matrix (a second implementation)."""
import numpy as np
import pytest

from ldot.eval.hard_negatives import (mine, positive_ranks, same_text_fractions, shared_texts, skip_depth,
                                      text_keys)
from ldot.eval.recall import topk_from_embeddings


def _brute_force(text, image, cap_img, k):
    s = text @ image.T  # [captions, images]
    t2i = []
    for c, row in enumerate(s):
        order = [int(i) for i in np.argsort(-row, kind="stable") if i != cap_img[c]]
        t2i.append(order[:k])
    i2t = []
    for r, col in enumerate(s.T):
        order = [int(c) for c in np.argsort(-col, kind="stable") if cap_img[c] != r]
        i2t.append(order[:k])
    return t2i, i2t, s


@pytest.mark.parametrize("k", [1, 5])
def test_mined_negatives_equal_the_brute_force(k):
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 6, size=40)  # 1-5 captions per image, as real splits vary
    cap_img = np.repeat(np.arange(40), counts)
    image = rng.standard_normal((40, 16)).astype(np.float32)
    # captions near their image, so that the own image often ranks first and must be passed over
    text = (image[cap_img] + 0.8 * rng.standard_normal((len(cap_img), 16))).astype(np.float32)
    top = topk_from_embeddings(text, image, cap_img, k)
    got = mine(top, cap_img, k)
    t2i, i2t, s = _brute_force(text, image, cap_img, k)
    assert got["txt2img_ids"].tolist() == t2i
    assert got["img2txt_ids"].tolist() == i2t
    np.testing.assert_allclose(got["txt2img_scores"], np.take_along_axis(s, np.array(t2i), 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["img2txt_scores"], np.take_along_axis(s.T, np.array(i2t), 1), rtol=1e-5, atol=1e-5)
    ranks = positive_ranks(top, cap_img)
    depth = top.ir_ids.shape[1]  # k + 1: an image ranked below that is reported as 0
    expect = [1 + int(np.sum(s[c] > s[c, cap_img[c]])) for c in range(len(cap_img))]
    assert ranks.tolist() == [r if r <= depth else 0 for r in expect]
    assert (ranks == 1).any() and (ranks > 1).any()  # both cases exercised


def test_rows_shorter_than_k_are_padded():
    cap_img = np.array([0, 0, 1, 2])
    rng = np.random.default_rng(1)
    text, image = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    got = mine(topk_from_embeddings(text, image, cap_img, 5), cap_img, 5)
    assert ((got["txt2img_ids"] >= 0).sum(1) == 2).all()  # 3 images, one is the caption's own
    assert np.isnan(got["txt2img_scores"][:, 2:]).all() and (got["txt2img_ids"][:, 2:] == -1).all()
    assert (got["img2txt_ids"] >= 0).sum(1).tolist() == [2, 3, 3]  # image 0 owns two of the four captions
    with pytest.raises(ValueError, match="k must be positive"):
        mine(topk_from_embeddings(text, image, cap_img, 1), cap_img, 0)


def test_same_text_matches_are_not_mined_and_the_depth_leaves_k():
    """With text_key, a caption's negatives skip every image holding a caption of its text, and an image's skip
    every caption whose text it holds (a brute force over the dense scores with the texts compared as strings);
    skip_depth is the most any row passes over."""
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 4, size=30)
    cap_img = np.repeat(np.arange(30), counts)
    generic = ["a red circle", "A  red circle ", "two shapes", "a blue square on grey"]
    words = [generic[rng.integers(4)] if rng.random() < 0.4 else f"caption {c}" for c in range(len(cap_img))]
    image = rng.standard_normal((30, 16)).astype(np.float32)
    text = (image[cap_img] + 0.8 * rng.standard_normal((len(cap_img), 16))).astype(np.float32)
    k = 4
    keys = text_keys(words)
    norm = [" ".join(w.lower().split()) for w in words]
    assert len(set(keys.tolist())) == len(set(norm)) and text_keys(["A  red circle ", "a red circle"]).tolist() == [0, 0]
    holds = [{norm[c] for c in np.flatnonzero(cap_img == i)} for i in range(30)]
    s = text @ image.T
    t2i = [[int(i) for i in np.argsort(-s[c], kind="stable") if i != cap_img[c] and norm[c] not in holds[i]][:k]
           for c in range(len(cap_img))]
    i2t = [[int(c) for c in np.argsort(-s[:, r], kind="stable") if cap_img[c] != r and norm[c] not in holds[r]][:k]
           for r in range(30)]
    brute_depth = max(max(sum(int(np.sum(cap_img == i)) for i in range(30) if norm[c] in holds[i]) for c in range(len(cap_img))),
                      max(sum(1 for c in range(len(cap_img)) if norm[c] in holds[r]) for r in range(30)))
    depth = skip_depth(cap_img, np.arange(30), keys)
    assert depth == brute_depth
    assert skip_depth(cap_img, np.arange(30)) == counts.max()  # without texts: the own image's captions
    got = mine(topk_from_embeddings(text, image, cap_img, k + depth), cap_img, k, text_key=keys)
    assert got["txt2img_ids"].tolist() == t2i and got["img2txt_ids"].tolist() == i2t
    assert (got["txt2img_ids"] >= 0).all() and (got["img2txt_ids"] >= 0).all()  # deep enough: k left in every row
    # the rule bites: without it some generic caption's top k holds an image that says its very words
    plain = mine(topk_from_embeddings(text, image, cap_img, k + depth), cap_img, k)
    assert any(norm[c] in holds[i] for c, row in enumerate(plain["txt2img_ids"]) for i in row)
    # how many such matches plain mining holds, both ways (what `ldot eval mine` reports); none once excluded
    said_t2i = np.mean([norm[c] in holds[i] for c, row in enumerate(plain["txt2img_ids"]) for i in row])
    said_i2t = np.mean([norm[c] in holds[r] for r, row in enumerate(plain["img2txt_ids"]) for c in row])
    assert same_text_fractions(plain, keys, cap_img) == pytest.approx((said_t2i, said_i2t)) and said_i2t > 0
    assert same_text_fractions(got, keys, cap_img) == (0.0, 0.0)
    shared = shared_texts(keys, cap_img)
    assert shared.tolist() == [sum(norm[c] in h for h in holds) > 1 for c in range(len(cap_img))] and shared.any()
