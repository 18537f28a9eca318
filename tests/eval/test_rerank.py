"""Re-ranking the top M: the row arithmetic, an oracle scorer, and a real second dual encoder checked
against re-ranking done by hand (argsort on each model's own score matrix)."""
import numpy as np
import pytest

from ldot.eval.metrics import retrieval_recall
from ldot.eval.rerank import (DualEncoderReranker, Reranker, choose_first_weight, rerank_row, rerank_scores,
                              rerank_topk)
from ldot.eval.recall import encode_split, topk_from_embeddings


def test_rerank_row_reorders_head_and_keeps_tail_below():
    ids = np.array([5, 3, 8, 1, 7, -1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.6, -np.inf])
    got_ids, got_scores = rerank_row(ids, scores, np.array([0.1, 0.5, 0.3]), m=3)
    np.testing.assert_array_equal(got_ids, [3, 8, 5, 1, 7, -1])
    np.testing.assert_allclose(got_scores[:3], [0.5, 0.3, 0.1])
    assert got_scores[3] == got_scores[4] < 0.1  # tail: order and ties kept, below every re-ranked score
    assert got_scores[5] == -np.inf
    ids2, sc2 = rerank_row(ids, scores, np.array([0.1, 0.5, 0.3]), m=3, first_weight=1.0)
    np.testing.assert_array_equal(ids2[:3], [3, 5, 8])  # 1.3, 1.0, 1.0: mixing changes the order
    np.testing.assert_allclose(sc2[:3], [1.3, 1.0, 1.0])


class Oracle(Reranker):
    """Knows the answer: 1 for a caption and its own image, 0 otherwise."""

    def __init__(self, captions, cap_img):
        self.owner = {}
        for c, i in zip(captions, cap_img):
            self.owner.setdefault(c, set()).add(int(i))

    def score_pairs(self, texts, rows):
        return np.array([float(int(r) in self.owner[t]) for t, r in zip(texts, rows)])


def test_oracle_reranker_finds_every_ground_truth_inside_m():
    rng = np.random.default_rng(0)
    cap_img = np.repeat(np.arange(30), 2)
    img = rng.normal(size=(30, 8)).astype(np.float32)
    txt = (img[cap_img] + rng.normal(scale=2.0, size=(60, 8))).astype(np.float32)
    captions = [f"caption {c}" for c in range(60)]
    top = topk_from_embeddings(txt, img, cap_img, 20)
    before = retrieval_recall(top, cap_img)
    m = 5
    after = retrieval_recall(rerank_topk(top, captions, Oracle(captions, cap_img), m), cap_img)
    s = txt @ img.T
    in_top_m = np.mean([cap_img[c] in np.argsort(-s[c])[:m] for c in range(60)])
    assert after["ir_r1"] == pytest.approx(in_top_m) and after["ir_r10"] == before["ir_r10"]
    assert before["ir_r1"] < after["ir_r1"]


def _by_hand(first: np.ndarray, second: np.ndarray, gt_sets: list[set], m: int, ks) -> dict:
    """Rows = queries. Top m by `first`, re-ordered by `second`; the rest in `first` order."""
    out = {}
    ranks = []
    for q in range(len(first)):
        order = np.argsort(-first[q], kind="stable")
        head = order[:m][np.argsort(-second[q, order[:m]], kind="stable")]
        final = np.concatenate([head, order[m:]])
        ranks.append(min(np.flatnonzero(np.isin(final, list(gt_sets[q])))))
    for k in ks:
        out[k] = float(np.mean(np.array(ranks) < k))
    return out


class SecondView(Reranker):
    """Scores a pair by another noisy view of the captions: informative, but not better than the first stage
    on its own, so a mix of the two scores beats either (the case a mixing weight is chosen for)."""

    def __init__(self, captions, txt, img):
        self.row = {c: i for i, c in enumerate(captions)}
        self.txt, self.img = txt, img

    def score_pairs(self, texts, rows):
        return np.array([self.txt[self.row[t]] @ self.img[int(r)] for t, r in zip(texts, rows)])


def test_mixing_weight_is_the_best_by_recall_computed_by_hand():
    rng = np.random.default_rng(0)
    cap_img = np.repeat(np.arange(40), 2)
    img = rng.normal(size=(40, 8)).astype(np.float32)
    first = (img[cap_img] + rng.normal(scale=2.0, size=(80, 8))).astype(np.float32)
    second = (img[cap_img] + rng.normal(scale=2.0, size=(80, 8))).astype(np.float32)
    captions = [f"caption {c}" for c in range(80)]
    m, ks, weights = 10, (1, 5, 10), (0.0, 0.25, 1.0, 4.0, 100.0)
    top = topk_from_embeddings(first, img, cap_img, m)
    new = rerank_scores(top, captions, SecondView(captions, second, img), m)
    chosen, ar = choose_first_weight(top, new, cap_img, m, weights, ks)

    s1, s2 = first @ img.T, second @ img.T
    by_hand = {}
    for w in weights:  # the head of each row ordered by (second + w x first), by hand
        ir = _by_hand(s1, s2 + w * s1, [{int(i)} for i in cap_img], m, ks)
        tr = _by_hand(s1.T, (s2 + w * s1).T, [set(np.flatnonzero(cap_img == i)) for i in range(40)], m, ks)
        by_hand[w] = np.mean([ir[k] for k in ks] + [tr[k] for k in ks])
    assert ar == pytest.approx(by_hand)
    assert chosen == max(weights, key=lambda w: (by_hand[w], -w))
    assert chosen not in (0.0, 100.0)  # the mix beats both the re-ranker alone and the first stage alone here

    # a re-ranker that repeats the first stage's score orders alike at every weight: ties go to the smallest
    echo = {k: getattr(top, f"{k}_scores")[:, :m] for k in new}
    chosen, ar = choose_first_weight(top, echo, cap_img, m, weights, ks)
    assert chosen == 0.0 and len(set(ar.values())) == 1


def test_second_dual_encoder_reranks_like_by_hand(tiny_checkpoint, other_checkpoint, test_split_dir):
    from ldot.data.loader import load_eval_split
    from ldot.eval.image_store import ImageStore
    from ldot.model import load_dual_encoder

    split = load_eval_split(test_split_dir)
    cap_img = split.caption_image
    tok_a, a, _ = load_dual_encoder(tiny_checkpoint)
    tok_b, b, _ = load_dual_encoder(other_checkpoint)
    txt_a, img_a = encode_split(a, split, tok_a, batch_size=32, progress=False)
    txt_b, img_b = encode_split(b, split, tok_b, batch_size=32, progress=False)
    m, ks = 8, (1, 5)
    top = topk_from_embeddings(txt_a, img_a, cap_img, m)
    reranker = DualEncoderReranker(b, tok_b, ImageStore(test_split_dir, split.keys))
    after = retrieval_recall(rerank_topk(top, split.captions, reranker, m), cap_img, ks)

    s_a, s_b = txt_a @ img_a.T, txt_b @ img_b.T
    ir = _by_hand(s_a, s_b, [{int(i)} for i in cap_img], m, ks)
    tr = _by_hand(s_a.T, s_b.T, [set(np.flatnonzero(cap_img == i)) for i in range(split.num_images)], m, ks)
    for k in ks:
        assert after[f"ir_r{k}"] == pytest.approx(ir[k]) and after[f"tr_r{k}"] == pytest.approx(tr[k])
    assert after != retrieval_recall(top, cap_img, ks)  # the second model does change the ranking
    # re-scoring with the first-stage model itself changes nothing
    same = DualEncoderReranker(a, tok_a, ImageStore(test_split_dir, split.keys))
    assert retrieval_recall(rerank_topk(top, split.captions, same, m), cap_img, ks) == pytest.approx(
        retrieval_recall(top, cap_img, ks))


class Recorder(Reranker):
    """Passes pairs on to a re-ranker and keeps each (caption, image row)'s score."""

    def __init__(self, inner):
        self.inner, self.seen = inner, {}

    def score_pairs(self, texts, rows):
        scores = self.inner.score_pairs(texts, rows)
        self.seen.update(zip(zip(texts, map(int, rows)), scores))
        return scores


def test_cross_encoder_scores_a_pair_alike_both_ways(tiny_checkpoint, cross_checkpoint, test_split_dir):
    """A (caption, image) pair met in a caption's image list (IR) and in an image's caption list (TR) gets
    one score: the same as scored alone, whatever else shares its forward (other captions' padding)."""
    from ldot.data.loader import load_eval_split
    from ldot.eval.image_store import ImageStore
    from ldot.eval.rerank import CrossEncoderReranker, load_reranker
    from ldot.model import load_dual_encoder

    split = load_eval_split(test_split_dir)
    store = ImageStore(test_split_dir, split.keys)
    assert isinstance(load_reranker(tiny_checkpoint, store), DualEncoderReranker)
    reranker = load_reranker(cross_checkpoint, store)
    assert isinstance(reranker, CrossEncoderReranker)
    tok, a, _ = load_dual_encoder(tiny_checkpoint)
    txt, img = encode_split(a, split, tok, batch_size=32, progress=False)
    top = topk_from_embeddings(txt, img, split.caption_image, 8)
    ways = {}
    for way in ("ir", "tr"):
        rec = Recorder(reranker)
        rerank_topk(top, split.captions, rec, 8, directions=(way,))
        ways[way] = rec.seen
    both = sorted(ways["ir"].keys() & ways["tr"].keys())
    assert len(both) >= 30, len(both)
    spread = float(np.ptp([ways["ir"][p] for p in both]))
    assert spread > 1e-3  # the scores differ between pairs, so agreeing means something
    for pair in both:
        assert ways["ir"][pair] == pytest.approx(ways["tr"][pair], abs=1e-5 * max(1.0, spread)), pair
    alone = reranker.score_pairs([both[0][0]], np.array([both[0][1]]))[0]
    assert alone == pytest.approx(ways["ir"][both[0]], abs=1e-5 * max(1.0, spread))
