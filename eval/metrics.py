"""Recall@K for image-text retrieval: the one place recall is computed (LightningDOT/SCAN protocol).

Ties count against the ground truth (a candidate scoring equal to it ranks above it), so a collapsed
model that scores everything alike gets recall near 0, never a flattering 1.
"""
from __future__ import annotations

from math import comb

import numpy as np
import torch

_CHUNK = 4096  # captions per block: bounds the temporary boolean matrix


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def retrieval_recall(scores, caption_image, ks=(1, 5, 10)) -> dict[str, float]:
    """scores [n_captions, n_images]; caption_image[c] = index of caption c's image.

    Returns tr_r{k} (image -> any of its captions in the top k), ir_r{k} (caption -> its image in the
    top k), fractions in [0, 1], and ar, the mean of all of them.
    """
    scores = _as_tensor(scores).float()
    cap_img = _as_tensor(caption_image).long()
    n_cap, n_img = scores.shape
    if cap_img.shape != (n_cap,):
        raise ValueError(f"caption_image has shape {tuple(cap_img.shape)}, expected ({n_cap},)")
    if n_cap == 0 or n_img == 0:
        raise ValueError("recall of an empty score matrix")
    if int(cap_img.min()) < 0 or int(cap_img.max()) >= n_img:
        raise ValueError(f"caption_image values must lie in [0, {n_img})")
    has_caption = torch.zeros(n_img, dtype=torch.bool).index_fill_(0, cap_img, True)

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

    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = float((tr_rank[has_caption] < k).double().mean())
    for k in ks:
        out[f"ir_r{k}"] = float((ir_rank < k).double().mean())
    out["ar"] = float(np.mean([out[f"tr_r{k}"] for k in ks] + [out[f"ir_r{k}"] for k in ks]))
    return out


def chance_recall(caption_image, n_images: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall of a random ranking, for the same keys as retrieval_recall."""
    cap_img = np.asarray(caption_image)
    n_cap = len(cap_img)
    per_image = np.bincount(cap_img, minlength=n_images)
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
