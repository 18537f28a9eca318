"""FAISS indexes over image embeddings: exact inner product now; IVF/HNSW and persistence grow here."""
from __future__ import annotations

import faiss
import numpy as np


def _f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def build_exact_index(embeddings) -> faiss.Index:
    """IndexFlatIP: exact maximum inner product, the paper's similarity <z_0, h_0>."""
    emb = _f32(embeddings)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    return index


def search(index: faiss.Index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query, best first."""
    return index.search(_f32(queries), min(k, index.ntotal))


def dense_scores(index: faiss.Index, queries) -> np.ndarray:
    """Every query against every indexed vector, as a [n_queries, ntotal] matrix, via an exhaustive search."""
    scores, ids = search(index, queries, index.ntotal)
    out = np.empty_like(scores)
    np.put_along_axis(out, ids, scores, axis=1)
    return out
