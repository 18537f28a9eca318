"""Float64 truth for the bidirectional contrastive (CMR) loss, shared by tests and benchmarks.

It materializes the n×n matrix on purpose: it is the definition the fused paths must match, not
something to train with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss_reference(
    text: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor | float | None = None,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the text→image and image→text cross-entropies over ``scale * text @ image.T``.

    Computed in float64 and differentiable in every floating input, so tests can take gradients
    of float64 copies. Entries (i, j), i ≠ j, with ``group_ids[i] == group_ids[j]`` are dropped from
    both softmax denominators.
    """
    t = text.to(torch.float64)
    i = image.to(torch.float64)
    logits = t @ i.T
    if logit_scale is not None:
        scale = logit_scale.to(torch.float64) if torch.is_tensor(logit_scale) else float(logit_scale)
        logits = logits * (scale.reshape(()) if torch.is_tensor(scale) else scale)
    n = logits.shape[0]
    if group_ids is not None:
        g = group_ids.to(logits.device)
        same = (g[:, None] == g[None, :]) & ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def materialized_contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The usual baseline (open_clip style): matmul in the input dtype, then cross-entropy both ways.

    This is what the benchmark compares against; it holds the n×n logits and their gradient.
    """
    logits = text @ image.T
    if logit_scale is not None:
        logits = logit_scale * logits
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
