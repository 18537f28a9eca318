"""Recall@K for image-text retrieval: the one place recall is computed (LightningDOT/SCAN protocol).

Ties count against the ground truth (a candidate scoring equal to it ranks above it), so a collapsed
model that scores everything alike gets recall near 0, never a flattering 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np
import torch

_CHUNK = 4096  # captions per block: bounds the temporary boolean matrix


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


@dataclass
class TopK:
    """Search results in both directions, the form recall takes when the n_captions x n_images score
    matrix is too large to hold (the paper's full setting: 123k images, 615k captions).

    Each row lists one query's best candidates, best first (an id of -1 pads a row shorter than the
    pool). For exact recall at every k up to K the rows must be at least K + m deep, where m is the
    most positives a query has (1 for a caption, its caption count for an image): then a ground truth
    tied with the K-th candidate is still seen to rank below it.
    """

    ir_ids: np.ndarray     # [q_cap, D] image ids per caption query
    ir_scores: np.ndarray  # [q_cap, D]
    tr_ids: np.ndarray     # [q_img, D'] caption ids per image query
    tr_scores: np.ndarray  # [q_img, D']
    num_images: int        # candidate pool sizes (the searched indexes' ntotal)
    num_captions: int
    ir_query: np.ndarray | None = None  # caption id of each ir row; default all captions in order
    tr_query: np.ndarray | None = None  # image id of each tr row; default all images in order

    def __post_init__(self):
        if self.ir_query is None:
            self.ir_query = np.arange(len(self.ir_ids))
        if self.tr_query is None:
            self.tr_query = np.arange(len(self.tr_ids))
        for name in ("ir", "tr"):
            ids, sc, q = getattr(self, f"{name}_ids"), getattr(self, f"{name}_scores"), getattr(self, f"{name}_query")
            if ids.ndim != 2 or ids.shape != sc.shape or len(q) != len(ids):
                raise ValueError(f"TopK {name}: ids {ids.shape}, scores {sc.shape} and {len(q)} queries do not match")


def _ranks_dense(scores: torch.Tensor, cap_img: torch.Tensor, n_img: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_cap = scores.shape[0]
    # Image retrieval: rank of the caption's own image among all images.
    gt = scores.gather(1, cap_img[:, None])                                  # [n_cap, 1]
    ir_rank = torch.empty(n_cap, dtype=torch.long)
    for s in range(0, n_cap, _CHUNK):
        block = scores[s:s + _CHUNK]
        ir_rank[s:s + _CHUNK] = (block >= gt[s:s + _CHUNK]).sum(1) - 1   # others scoring >= gt

    # Text retrieval: rank of the image's best-scoring own caption among all captions, i.e. the
    # number of other captions scoring >= that best own score.
    gt = gt.squeeze(1)
    best_own = torch.full((n_img,), float("-inf")).scatter_reduce(0, cap_img, gt, reduce="amax")
    tr_rank = torch.zeros(n_img, dtype=torch.long)
    for s in range(0, n_cap, _CHUNK):
        tr_rank += (scores[s:s + _CHUNK] >= best_own[None, :]).sum(0)
    own_at_best = torch.bincount(cap_img[gt >= best_own[cap_img]], minlength=n_img)
    tr_rank -= own_at_best
    has_caption = torch.zeros(n_img, dtype=torch.bool).index_fill_(0, cap_img, True)
    return tr_rank[has_caption], ir_rank


def _ranks_topk(top: TopK, cap_img: torch.Tensor, depth_needed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ranks as _ranks_dense, capped: a rank >= K (the rows' depth minus m) means "not in any
    top k". rank = the number of non-positive candidates scoring >= the best positive."""
    n_img = top.num_images
    per_image = torch.bincount(cap_img, minlength=n_img)
    for name, ids, m, pool in (("ir", top.ir_ids, 1, top.num_images),
                               ("tr", top.tr_ids, int(per_image.max()), top.num_captions)):
        if len(ids) and ids.shape[1] < min(depth_needed + m, pool):
            raise ValueError(f"TopK {name} rows are {ids.shape[1]} deep; recall@{depth_needed} needs "
                             f"{min(depth_needed + m, pool)} (max k + {m} positives per query)")

    def rank(ids, scores, positive):
        ids, scores = torch.as_tensor(ids).long(), torch.as_tensor(scores).float()
        scores = scores.masked_fill(ids < 0, float("-inf"))
        best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
        r = ((scores >= best) & ~positive & (ids >= 0)).sum(1)
        # no positive listed: every listed candidate outscores every positive
        return torch.where(positive.any(1), r, torch.full_like(r, ids.shape[1]))

    ir_ids = torch.as_tensor(top.ir_ids).long()
    ir_gt = cap_img[torch.as_tensor(top.ir_query).long()]
    ir_rank = rank(ir_ids, top.ir_scores, ir_ids == ir_gt[:, None])

    tr_ids = torch.as_tensor(top.tr_ids).long()
    tr_q = torch.as_tensor(top.tr_query).long()
    owner = torch.where(tr_ids >= 0, cap_img[tr_ids.clamp(min=0)], torch.full_like(tr_ids, -1))
    tr_rank = rank(tr_ids, top.tr_scores, owner == tr_q[:, None])
    return tr_rank[per_image[tr_q] > 0], ir_rank


def retrieval_ranks(scores, caption_image, max_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(tr_rank per image that has a caption, ir_rank per caption query): 0 = ranked first.

    ``scores`` is the dense [n_captions, n_images] matrix or a TopK, whose ranks are exact below max_k
    (checked against the rows' depth) and capped above. Ties count against the ground truth."""
    cap_img = _as_tensor(caption_image).long()
    if isinstance(scores, TopK):
        n_img = scores.num_images
        if cap_img.shape != (scores.num_captions,):
            raise ValueError(f"caption_image has shape {tuple(cap_img.shape)}, expected ({scores.num_captions},)")
    else:
        scores = _as_tensor(scores).float()
        n_cap, n_img = scores.shape
        if cap_img.shape != (n_cap,):
            raise ValueError(f"caption_image has shape {tuple(cap_img.shape)}, expected ({n_cap},)")
    if cap_img.numel() == 0 or n_img == 0:
        raise ValueError("recall of an empty score matrix")
    if int(cap_img.min()) < 0 or int(cap_img.max()) >= n_img:
        raise ValueError(f"caption_image values must lie in [0, {n_img})")
    if isinstance(scores, TopK):
        return _ranks_topk(scores, cap_img, max_k)
    return _ranks_dense(scores, cap_img, n_img)


def retrieval_recall(scores, caption_image, ks=(1, 5, 10)) -> dict[str, float]:
    """scores [n_captions, n_images] (or a TopK of both search directions); caption_image[c] = index
    of caption c's image.

    Returns tr_r{k} (image -> any of its captions in the top k), ir_r{k} (caption -> its image in the
    top k), fractions in [0, 1], and ar, the mean of all of them.
    """
    tr_rank, ir_rank = retrieval_ranks(scores, caption_image, max(ks))
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = float((tr_rank < k).double().mean())
    for k in ks:
        out[f"ir_r{k}"] = float((ir_rank < k).double().mean())
    out["ar"] = float(np.mean([out[f"tr_r{k}"] for k in ks] + [out[f"ir_r{k}"] for k in ks]))
    return out


def recall_curve(scores, caption_image, max_k: int) -> dict[str, np.ndarray]:
    """Recall at every k = 1..max_k in both directions (for the recall-at-K plot), from the same ranks."""
    tr_rank, ir_rank = retrieval_ranks(scores, caption_image, max_k)
    ks = np.arange(1, max_k + 1)
    return {"k": ks,
            "tr": np.array([(tr_rank < k).double().mean().item() for k in ks]),
            "ir": np.array([(ir_rank < k).double().mean().item() for k in ks])}


def chance_recall(caption_image, n_images: int, ks=(1, 5, 10), query_images=None) -> dict[str, float]:
    """Expected recall of a random ranking, for the same keys as retrieval_recall.

    query_images: the images asked for text retrieval when not all are (a pool with distractors)."""
    cap_img = np.asarray(caption_image)
    n_cap = len(cap_img)
    per_image = np.bincount(cap_img, minlength=n_images)
    if query_images is not None:
        per_image = per_image[np.asarray(query_images)]
    per_image = per_image[per_image > 0]
    out: dict[str, float] = {}
    for k in ks:
        # P(at least one of m own captions in the top k of n_cap) = 1 - C(n_cap - m, k) / C(n_cap, k)
        out[f"tr_r{k}"] = float(np.mean([1 - comb(n_cap - m, k) / comb(n_cap, k) for m in per_image]))
    for k in ks:
        out[f"ir_r{k}"] = min(k, n_images) / n_images
    out["ar"] = float(np.mean([out[f"tr_r{k}"] for k in ks] + [out[f"ir_r{k}"] for k in ks]))
    return out


def format_table(recall: dict[str, float], chance: dict[str, float] | None = None, ks=(1, 5, 10)) -> str:
    """Markdown table, percentages, one row per result (and one for chance)."""
    cols = [f"tr_r{k}" for k in ks] + [f"ir_r{k}" for k in ks] + ["ar"]
    head = "| | " + " | ".join([f"TR R@{k}" for k in ks] + [f"IR R@{k}" for k in ks] + ["AR"]) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]
    rows.append("| model | " + " | ".join(f"{100 * recall[c]:.1f}" for c in cols) + " |")
    if chance is not None:
        rows.append("| chance | " + " | ".join(f"{100 * chance[c]:.1f}" for c in cols) + " |")
    return "\n".join(rows)
