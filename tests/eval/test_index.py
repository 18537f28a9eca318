"""FAISS exact search against a numpy matmul on the same embeddings."""
import numpy as np

from eval.index import build_exact_index, dense_scores, search


def test_dense_scores_equal_matmul():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(37, 16)).astype(np.float32), rng.normal(size=(11, 16)).astype(np.float32)
    index = build_exact_index(img)
    np.testing.assert_allclose(dense_scores(index, txt), txt @ img.T, rtol=1e-5, atol=1e-5)
    scores, ids = search(index, txt, 5)
    np.testing.assert_array_equal(ids, np.argsort(-(txt @ img.T), axis=1)[:, :5])
