"""Re-ranking: a second, costlier scorer applied to the first stage's top M (the paper's M = 20 or 50).

A `Reranker` scores (caption text, image row) pairs. Two kinds, told apart by the export's ldot.json
(`load_reranker`): the cross-attention re-ranker the paper uses (CrossEncoderReranker: caption and
regions in one transformer, one pass per pair; trained with `task: rerank`), and a second dual encoder
(DualEncoderReranker: another checkpoint's own <text, image> product, no cross-attention).
`rerank_topk` re-orders the first M candidates of every row of a TopK by that score (optionally mixed
with the first-stage score) and leaves the rest where they were, below; the result is a TopK again, so
recall after re-ranking is computed by the same eval.metrics.retrieval_recall as before. The mixing weight
is a choice to make on a validation split (`choose_first_weight`, `ldot eval recall --rerank-val`): the
re-ranker's scores are computed once (`rerank_scores`) and every weight is applied to them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from ldot.eval.metrics import TopK


class Reranker(ABC):
    """Scores pairs: higher = better match. Implementations may cache per text and per image."""

    @abstractmethod
    def score_pairs(self, texts: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """scores[i] for (texts[i], image row rows[i])."""

    def score(self, query: str, candidates: Sequence[int]) -> np.ndarray:
        """One text query against candidate image rows."""
        return self.score_pairs([query] * len(candidates), np.asarray(candidates))

    def reset(self) -> None:
        """Forget anything cached (so a timed pass pays the full cost)."""


class DualEncoderReranker(Reranker):
    """Another dual encoder (a different checkpoint) scoring pairs by its own <text, image> product.

    Images are encoded on demand from their region features (an ImageStore) and cached."""

    def __init__(self, model, tokenizer, store, *, max_text_len: int = 32, device="cpu", batch_size: int = 64):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_text_len, self.device, self.batch_size = max_text_len, device, batch_size
        self._text: dict[str, torch.Tensor] = {}
        self._image: dict[int, torch.Tensor] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint, store, device="cpu", **kw) -> "DualEncoderReranker":
        from ldot.model import load_dual_encoder

        tokenizer, model, meta = load_dual_encoder(checkpoint, device=device)
        _check_features(checkpoint, meta, store)
        return cls(model, tokenizer, store, max_text_len=meta.get("max_text_len", 32), device=device, **kw)

    def reset(self) -> None:
        self._text.clear()
        self._image.clear()

    def _fill(self, texts: Sequence[str], rows: np.ndarray) -> None:
        from ldot.eval.recall import encode_images, encode_queries

        new_t = sorted({t for t in texts if t not in self._text})
        if new_t:
            emb = encode_queries(self.model, self.tokenizer, new_t, max_text_len=self.max_text_len,
                                 batch_size=self.batch_size, device=self.device)
            self._text.update(zip(new_t, torch.from_numpy(emb)))
        new_i = sorted({int(r) for r in rows if int(r) not in self._image})
        if new_i:
            batches = (self.store.batch(new_i[s:s + self.batch_size]) for s in range(0, len(new_i), self.batch_size))
            emb = encode_images(self.model, batches, device=self.device)
            self._image.update(zip(new_i, torch.from_numpy(emb)))

    def score_pairs(self, texts: Sequence[str], rows: np.ndarray) -> np.ndarray:
        self._fill(texts, rows)
        t = torch.stack([self._text[x] for x in texts])
        i = torch.stack([self._image[int(r)] for r in rows])
        return (t * i).sum(-1).numpy()


class CrossEncoderReranker(Reranker):
    """The cross-attention re-ranker (ldot.model.cross_encoder): caption and regions in one transformer,
    one ITM logit per pair. Pairs go through in forwards of `batch_size` (a query's M candidates in one
    forward whenever M <= batch_size; rerank_topk hands over whole rows, so a batch_size that is a
    multiple of M keeps every query's candidates together). Region features are read once per image and
    kept (reset() forgets them)."""

    def __init__(self, model, tokenizer, store, *, max_text_len: int = 32, device="cpu", batch_size: int = 100):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_text_len, self.device, self.batch_size = max_text_len, torch.device(device), batch_size
        self._regions: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint, store, device="cpu", **kw) -> "CrossEncoderReranker":
        from ldot.model import load_cross_encoder

        tokenizer, model, meta = load_cross_encoder(checkpoint, device=device)
        _check_features(checkpoint, meta, store)
        return cls(model, tokenizer, store, max_text_len=meta.get("max_text_len", 32), device=device, **kw)

    def reset(self) -> None:
        self._regions.clear()

    def _images(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        from ldot.data import schema
        from ldot.data.batching import collate_images

        for r in {int(r) for r in rows if int(r) not in self._regions}:
            self._regions[r] = self.store.regions(r)
        return collate_images([{schema.FEAT: self._regions[int(r)][0], schema.BOX: self._regions[int(r)][1]}
                               for r in rows])

    @torch.no_grad()
    def score_pairs(self, texts: Sequence[str], rows: np.ndarray) -> np.ndarray:
        from ldot.data.loader import tokenize

        dtype = next(self.model.parameters()).dtype
        out = []
        for s in range(0, len(texts), self.batch_size):
            text = tokenize(self.tokenizer, list(texts[s:s + self.batch_size]), self.max_text_len)
            img = self._images(np.asarray(rows[s:s + self.batch_size]))
            scores = self.model(text["input_ids"].to(self.device), text["attention_mask"].to(self.device),
                                img["img_feat"].to(self.device, dtype), img["img_pos"].to(self.device, dtype),
                                img["img_mask"].to(self.device))
            out.append(scores.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def _check_features(checkpoint, meta: dict, store) -> None:
    if meta.get("feature_dim") not in (None, store.feature_dim):
        from ldot.eval.errors import EvalError

        raise EvalError(f"{checkpoint}: re-ranker was trained on {meta['feature_dim']}-d features, "
                        f"{store.data_dir} has {store.feature_dim}")


def load_reranker(checkpoint, store, device="cpu", **kw) -> Reranker:
    """The re-ranker an export holds, by its ldot.json format: a cross-encoder, or a second dual encoder."""
    from ldot.model import read_export_meta
    from ldot.model.cross_encoder import CROSS_FORMAT

    if read_export_meta(checkpoint).get("format") == CROSS_FORMAT:
        return CrossEncoderReranker.from_checkpoint(checkpoint, store, device=device, **kw)
    return DualEncoderReranker.from_checkpoint(checkpoint, store, device=device, **kw)


def rerank_row(ids: np.ndarray, scores: np.ndarray, new: np.ndarray, m: int, first_weight: float = 0.0):
    """(ids, scores) of one row with its first m entries re-scored by `new` (length m, mixed with
    first_weight x the first-stage score) and re-sorted; entries after m keep their order and ties,
    shifted to score below every re-ranked one."""
    m = min(m, int((ids >= 0).sum()))
    head = new[:m] + first_weight * scores[:m]
    order = np.argsort(-head, kind="stable")
    out_ids, out_scores = ids.copy(), scores.astype(np.float64)
    out_ids[:m], out_scores[:m] = ids[:m][order], head[order]
    tail = out_scores[m:]
    if len(tail) and m:
        valid = ids[m:] >= 0
        if valid.any():
            tail[valid] = tail[valid] - tail[valid].max() + head.min() - 1.0
        tail[~valid] = -np.inf
    return out_ids, out_scores


def rerank_scores(top: TopK, captions: Sequence[str], reranker: Reranker, m: int,
                  directions: tuple[str, ...] = ("ir", "tr")) -> dict[str, np.ndarray]:
    """The re-ranker's score of the first m candidates of every row, [rows, m] a direction (0 where a row is
    padded with -1). ir rows: caption query -> image candidates; tr rows: image query -> caption candidates
    (captions[c] is caption id c's text). The costly half of re-ranking, kept apart so that several mixing
    weights can be tried on one pass (choose_first_weight)."""
    out = {}
    for name in directions:
        ids, queries = getattr(top, f"{name}_ids"), getattr(top, f"{name}_query")
        head = ids[:, :m]
        if name == "ir":
            texts = [captions[int(q)] for q in queries for _ in range(head.shape[1])]
            rows = head.ravel()
        else:
            texts = [captions[int(c)] if c >= 0 else "" for c in head.ravel()]
            rows = np.repeat(np.asarray(queries), head.shape[1])
        valid = head.ravel() >= 0  # -1 pads rows shorter than the pool
        new = np.zeros(len(rows))
        new[valid] = reranker.score_pairs([t for t, v in zip(texts, valid) if v], rows[valid])
        out[name] = new.reshape(head.shape)
    return out


def apply_rerank(top: TopK, new: dict[str, np.ndarray], m: int, first_weight: float = 0.0) -> TopK:
    """`top` with the first m candidates of every row re-ordered by the re-ranker's scores `new`
    (rerank_scores), mixed with first_weight x the first-stage score."""
    out = {}
    for name, scores_new in new.items():
        ids, scores = getattr(top, f"{name}_ids"), getattr(top, f"{name}_scores")
        res = [rerank_row(ids[q], scores[q], scores_new[q], m, first_weight) for q in range(len(ids))]
        out[f"{name}_ids"] = np.stack([r[0] for r in res]) if res else ids
        out[f"{name}_scores"] = np.stack([r[1] for r in res]) if res else scores
    return replace(top, **out)


def rerank_topk(top: TopK, captions: Sequence[str], reranker: Reranker, m: int, *, first_weight: float = 0.0,
                directions: tuple[str, ...] = ("ir", "tr")) -> TopK:
    """Re-rank the top m of every row (rerank_scores, then apply_rerank)."""
    return apply_rerank(top, rerank_scores(top, captions, reranker, m, directions), m, first_weight)


# The grid `ldot eval recall --rerank-val` tries (--rerank-weights sets another). With normalized embeddings
# (model.normalize, the demo's) the first-stage score is a cosine, |s| <= 1, and a re-ranker's logits span a few
# units to tens, so the useful weights run from the re-ranker alone (0) to the first stage with its near-ties
# broken by the re-ranker (100). On the synthetic scenes the best lay between 10 and 100 (benchmarks/RESULTS.md,
# "quality"). Unnormalized first stages (the original's) score on a larger scale and want smaller weights.
WEIGHT_GRID = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)


def choose_first_weight(top: TopK, new: dict[str, np.ndarray], caption_image: np.ndarray, m: int,
                        weights: Sequence[float] = WEIGHT_GRID, ks: Sequence[int] = (1, 5, 10)
                        ) -> tuple[float, dict[float, float]]:
    """The mixing weight whose re-ranked recall (AR, the mean of R@k both ways) is highest on a split, and
    every weight's AR. Meant for a validation split: choosing it on the test queries would report a tuned
    number. Ties go to the smaller weight (more of the re-ranker's own order)."""
    from ldot.eval.metrics import retrieval_recall

    ar = {float(w): retrieval_recall(apply_rerank(top, new, m, w), caption_image, tuple(ks))["ar"] for w in weights}
    best = max(ar.values())
    return min(w for w, a in ar.items() if a == best), ar
