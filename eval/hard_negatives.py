"""Hard negatives from a trained dual encoder's own top-k: the candidates it ranks highest that are not
a query's ground truth, in both directions.

LightningDOT mines them with FAISS to train the re-ranker (the slower model that re-orders the top M):
for a caption, the images it retrieves above or near its own; for an image, the captions of other
images it retrieves. They are taken from the same exact searches as recall (eval.metrics.TopK), whose
rows are deep enough (K + the query's positives) for K negatives to remain after the positives are
dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ldot.eval.metrics import TopK


def _first_k_not(ids: np.ndarray, scores: np.ndarray, positive: np.ndarray, k: int):
    """Per row, the first k entries whose id is neither padding (-1) nor marked positive."""
    keep = (ids >= 0) & ~positive
    # stable order of the kept entries first: their original rank order is preserved
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(ids, order, 1)
    out_scores = np.take_along_axis(scores, order, 1).astype(np.float32)
    kept = np.take_along_axis(keep, order, 1)
    return np.where(kept, out_ids, -1), np.where(kept, out_scores, np.nan)


def text_keys(captions) -> np.ndarray:
    """Per caption, one id per distinct text, case and spacing aside: captions of one key say the same."""
    norm = np.asarray([" ".join(str(t).lower().split()) for t in captions], dtype=object)
    return np.unique(norm, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _said(text_key, caption_image, key) -> tuple[np.ndarray, int]:
    """The (text, image key) pairs a split holds, each as one integer text * n + key; and n."""
    n = int(np.max(key)) + 1
    return np.unique(np.asarray(text_key, np.int64) * n + key[np.asarray(caption_image)]), n


def shared_texts(text_key, caption_image, image_key=None) -> np.ndarray:
    """Per caption, whether another image (another key) holds a caption of its text too."""
    cap_img = np.asarray(caption_image)
    key = np.arange(int(cap_img.max()) + 1) if image_key is None else np.asarray(image_key)
    said, n = _said(text_key, cap_img, key)
    return np.bincount(said // n)[np.asarray(text_key)] > 1


def skip_depth(caption_image, image_key, text_key=None) -> int:
    """The most entries mine() may pass over in one query's row: for a caption, the rows of every image that
    holds its text (its own image's samples at least); for an image, every caption of a text it holds (its
    own captions at least). A search that deep plus k leaves k negatives in every row."""
    cap_img, key = np.asarray(caption_image), np.asarray(image_key)
    texts = np.arange(len(cap_img)) if text_key is None else np.asarray(text_key, np.int64)
    said, n = _said(texts, cap_img, key)
    pair_text, pair_key = np.divmod(said, n)
    rows_per_key = np.bincount(key, minlength=n)
    captions_per_text = np.bincount(texts)
    caption_side = np.bincount(pair_text, weights=rows_per_key[pair_key]).max()
    image_side = np.bincount(pair_key, weights=captions_per_text[pair_text]).max()
    return int(max(caption_side, image_side))


def mine(top: TopK, caption_image, k: int, image_key=None, text_key=None) -> dict[str, np.ndarray]:
    """The k best-ranked non-positives of every query row of ``top``.

    ``image_key`` [num_images]: images of one key are one image (e.g. the first row of each image_id, so
    that a dataset's duplicate samples of an image are not each other's negatives); default: the row.
    ``text_key`` [num_captions] (text_keys): also count as positives, for a caption, every image that holds a
    caption of its text, and for an image, every caption whose text it holds (one of its own captions'
    words verbatim): a match as far as the text can tell. Default: the text is not looked at.

    Returns txt2img_ids / txt2img_scores [q_cap, k] (images per caption query) and img2txt_ids /
    img2txt_scores [q_img, k] (captions per image query); -1 / NaN pad a row whose pool has fewer
    than k negatives."""
    if k < 1:
        raise ValueError(f"k must be positive, not {k}")
    cap_img = np.asarray(caption_image)
    key = np.arange(top.num_images) if image_key is None else np.asarray(image_key)
    own_image = key[cap_img[top.ir_query]]
    ir_key = np.where(top.ir_ids >= 0, key[np.maximum(top.ir_ids, 0)], -1)  # -1: padding
    ir_pos = ir_key == own_image[:, None]
    owner = np.where(top.tr_ids >= 0, key[cap_img[np.maximum(top.tr_ids, 0)]], -1)
    tr_pos = owner == key[top.tr_query][:, None]
    if text_key is not None:
        texts = np.asarray(text_key, np.int64)
        said, n = _said(texts, cap_img, key)
        ir_pos |= (ir_key >= 0) & np.isin(texts[top.ir_query][:, None] * n + ir_key, said)
        tr_text = np.where(top.tr_ids >= 0, texts[np.maximum(top.tr_ids, 0)], -1)
        tr_pos |= (tr_text >= 0) & np.isin(tr_text * n + key[top.tr_query][:, None], said)
    t_ids, t_scores = _first_k_not(top.ir_ids, top.ir_scores, ir_pos, k)
    i_ids, i_scores = _first_k_not(top.tr_ids, top.tr_scores, tr_pos, k)
    return {"txt2img_ids": t_ids, "txt2img_scores": t_scores, "img2txt_ids": i_ids, "img2txt_scores": i_scores}


def same_text_fractions(mined: dict[str, np.ndarray], text_key, caption_image) -> tuple[float, float]:
    """Of mine()'s caption -> image negatives, the fraction whose image holds a caption of the query's text; of its
    image -> caption negatives, the fraction that say one of the query image's own captions verbatim (mined
    with text_key, both are 0). Every caption and every image a query, in order, as `ldot eval mine` has it."""
    cap_img, texts = np.asarray(caption_image), np.asarray(text_key, np.int64)
    t_ids, i_ids = mined["txt2img_ids"], mined["img2txt_ids"]
    key = np.arange(max(int(cap_img.max()), int(t_ids.max()), len(i_ids) - 1) + 1)
    said, n = _said(texts, cap_img, key)
    t_hit = np.isin(texts[:, None] * n + np.maximum(t_ids, 0), said)[t_ids >= 0]
    i_hit = np.isin(texts[np.maximum(i_ids, 0)] * n + np.arange(len(i_ids))[:, None], said)[i_ids >= 0]
    return float(t_hit.mean()) if t_hit.size else 0.0, float(i_hit.mean()) if i_hit.size else 0.0


def positive_ranks(top: TopK, caption_image) -> np.ndarray:
    """Per caption query, the 1-based rank of its own image in its row (0: not in the row)."""
    own = np.asarray(caption_image)[top.ir_query]
    hit = top.ir_ids == own[:, None]
    return np.where(hit.any(1), hit.argmax(1) + 1, 0)


def write_jsonl(out_dir, split, mined: dict[str, np.ndarray]) -> list[Path]:
    """``txt2img.jsonl`` (one line per caption) and ``img2txt.jsonl`` (one line per image), named by the
    dataset's own ids: image_id, and a caption as (image_id, its index among that image's captions)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cap_img = np.asarray(split.caption_image)
    if np.any(np.diff(cap_img) < 0):
        raise ValueError("captions must be stored image by image (EvalSplit order)")
    # index of each caption among its image's captions
    first = np.searchsorted(cap_img, cap_img, side="left")
    cap_ref = [{"image_id": split.image_ids[int(o)], "caption": int(c - f)}
               for c, (o, f) in enumerate(zip(cap_img, first))]
    txt2img, img2txt = out_dir / "txt2img.jsonl", out_dir / "img2txt.jsonl"
    with txt2img.open("w") as f:
        for c, (ids, scores) in enumerate(zip(mined["txt2img_ids"], mined["txt2img_scores"])):
            keep = ids >= 0
            f.write(json.dumps({**cap_ref[c], "text": split.captions[c],
                                "negatives": [split.image_ids[int(i)] for i in ids[keep]],
                                "scores": [round(float(s), 5) for s in scores[keep]]}) + "\n")
    with img2txt.open("w") as f:
        for r, (ids, scores) in enumerate(zip(mined["img2txt_ids"], mined["img2txt_scores"])):
            keep = ids >= 0
            f.write(json.dumps({"image_id": split.image_ids[r], "negatives": [cap_ref[int(i)] for i in ids[keep]],
                                "scores": [round(float(s), 5) for s in scores[keep]]}) + "\n")
    return [txt2img, img2txt]
