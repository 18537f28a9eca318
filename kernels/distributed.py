"""Global-batch contrastive loss across ranks: every rank's negatives, exact loss and gradients.

Rank r gathers all features, then computes the rows of its own texts (text→image) and the
columns of its own images (image→text) against the global batch. Its share of the loss is those
terms over ``2N``; the shares sum to the single-process loss on the concatenated batch, and the
gather's backward sums every rank's feature gradients and hands each owner its slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .contrastive import Impl, _check_inputs, contrastive_loss, one_way_loss_sum
from .errors import KernelError


def _all_sizes(n: int, device: torch.device, group) -> list[int]:
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]  # one host sync per step, for the shapes


def _gather_rows_nograd(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    # all_gather needs equal shapes: pad every rank's rows to the largest, then trim.
    pad = torch.zeros((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather of rows (unequal counts) whose backward returns each owner the SUM of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows_nograd(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        # gloo has no reduce_scatter; an all_reduce of the [N, ·] gradient is exact and simple.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def global_contrastive_loss(
    text: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor | float | None = None,
    *,
    group_ids: torch.Tensor | None = None,
    impl: Impl = "auto",
    group=None,
    sizes: list[int] | None = None,
    hard_image: torch.Tensor | None = None,
    hard_text: torch.Tensor | None = None,
    hard_image_groups: torch.Tensor | None = None,
    hard_text_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """CMR loss over the global batch, called on every rank with that rank's LOCAL features.

    Local batch sizes may differ across ranks (one may even be empty). ``group_ids``, when given,
    must be given on every rank and label groups globally (e.g. image ids), since they are
    compared across ranks. The scale must be the same on every rank (a replicated parameter).

    Value: on every rank, the single-process loss on the concatenation of all ranks' batches.

    Gradients: backward must run on every rank (it holds collectives). Each rank's local text and
    image receive their exact global gradients (the gather's backward sums every rank's
    contribution), while logit_scale — and so every replicated encoder parameter — receives this
    rank's share: the SUM over ranks equals the single-process gradient. A trainer whose engine
    AVERAGES gradients across ranks (DDP, DeepSpeed) must therefore backpropagate
    ``loss * world_size`` to get the single-process gradient.

    ``sizes``, when given, is every rank's local batch size in rank order (the same list on every
    rank); otherwise the ranks exchange them, which costs a device-to-host read per call. A trainer
    knows them on the host (fixed batches, or a host-side exchange) and passes them to keep its step
    free of device synchronization.

    Falls back to :func:`contrastive_loss` when torch.distributed is not initialized or the group
    has one rank.

    Hard negatives (``hard_image``, ``hard_text``: ``[n, K, d]``, K mined columns per pair, with their
    groups ``[n, K]``, needing ``group_ids``): every rank's hard images join the columns that every
    caption is scored against, and every rank's hard captions those of every image, beside the in-batch
    ones: the rows stay the global batch's n pairs, the columns become n(1 + K). As in the original
    LightningDOT (and DPR, whose loss it took), one pair's hard negatives are negatives of every row. A
    hard column of the same group as a row's positive (a duplicate of it) is left out of that row, like
    a second caption of the same image. Nothing n x n(1 + K) is materialized: ``one_way_loss_sum``
    walks the extended column set in tiles.
    """
    if hard_image is not None or hard_text is not None:
        return _with_hard_columns(text, image, logit_scale, group_ids, impl, group, sizes, hard_image, hard_text,
                                  hard_image_groups, hard_text_groups)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return contrastive_loss(text, image, logit_scale, impl=impl, group_ids=group_ids)
    if impl == "reference":
        raise KernelError("global_contrastive_loss has no 'reference' impl; compare against one process instead")
    logit_scale, group_ids = _check_inputs(text, image, logit_scale, group_ids)
    rank = dist.get_rank(group)
    if sizes is None:
        sizes = _all_sizes(text.shape[0], text.device, group)
    elif len(sizes) != dist.get_world_size(group) or sizes[rank] != text.shape[0]:
        raise KernelError(f"sizes {sizes} must list every rank's batch size; this rank ({rank}) has {text.shape[0]}")
    total_n = sum(sizes)
    if total_n == 0:
        raise KernelError("global_contrastive_loss needs at least one pair across ranks")
    offset = sum(sizes[:rank])
    # One gather (and so one backward all_reduce) for both modalities: a single collective
    # cannot be reordered between ranks by the autograd engine.
    both = _GatherRows.apply(torch.cat([text, image], dim=1).contiguous(), sizes, rank, group)
    d = text.shape[1]
    text_all, image_all = both[:, :d], both[:, d:]
    g_all = None if group_ids is None else _gather_rows_nograd(group_ids, sizes, group)

    rows = one_way_loss_sum(text, image_all, logit_scale, offset=offset, ga=group_ids, gb=g_all, impl=impl)
    cols = one_way_loss_sum(image, text_all, logit_scale, offset=offset, ga=group_ids, gb=g_all, impl=impl)
    share = (rows + cols) / (2 * total_n)
    total = share.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    # The value is the global loss; the gradient is this rank's share only.
    return share + (total - share).detach()


def _check_hard(name: str, x, groups, n: int, d: int, like: torch.Tensor) -> None:
    if x is None or groups is None:
        raise KernelError(f"{name} and {name}_groups go together, with hard_image and hard_text both given")
    if x.dim() != 3 or x.shape[0] != n or x.shape[2] != d or x.dtype != like.dtype or x.device != like.device:
        raise KernelError(f"{name} must be [{n}, K, {d}] {like.dtype} on {like.device}; got {x.dtype} "
                          f"{tuple(x.shape)} on {x.device}")
    if groups.shape != x.shape[:2] or groups.dtype != torch.int64:
        raise KernelError(f"{name}_groups must be int64 {tuple(x.shape[:2])}; got {groups.dtype} {tuple(groups.shape)}")


def _with_hard_columns(text, image, logit_scale, group_ids, impl, group, sizes, hard_image, hard_text,
                       hard_image_groups, hard_text_groups) -> torch.Tensor:
    """The loss with K hard columns per pair in each direction (global_contrastive_loss's docstring)."""
    if group_ids is None:
        raise KernelError("hard negatives need group_ids: a hard column that duplicates a row's positive is "
                          "recognized by its group")
    if impl == "reference":
        raise KernelError("hard negatives have no 'reference' impl; the tests hold a float64 one")
    logit_scale, group_ids = _check_inputs(text, image, logit_scale, group_ids)
    n, d = text.shape
    _check_hard("hard_image", hard_image, hard_image_groups, n, d, text)
    _check_hard("hard_text", hard_text, hard_text_groups, n, d, text)
    k = hard_image.shape[1]
    if hard_text.shape[1] != k:
        raise KernelError(f"hard_image has {k} columns per pair and hard_text {hard_text.shape[1]}: give both K")
    # This rank's columns: its pairs, then their hard negatives (pair-major), in each direction.
    image_cols = torch.cat([image, hard_image.reshape(n * k, d)])
    text_cols = torch.cat([text, hard_text.reshape(n * k, d)])
    image_g = torch.cat([group_ids, hard_image_groups.reshape(n * k).to(group_ids.device)])
    text_g = torch.cat([group_ids, hard_text_groups.reshape(n * k).to(group_ids.device)])
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if distributed:
        rank = dist.get_rank(group)
        if sizes is None:
            sizes = _all_sizes(n, text.device, group)
        elif len(sizes) != dist.get_world_size(group) or sizes[rank] != n:
            raise KernelError(f"sizes {sizes} must list every rank's batch size; this rank ({rank}) has {n}")
        total_n = sum(sizes)
        # Every rank's block is its n_r pairs then its n_r * K hard rows, so the positive of local row i
        # sits at the start of this rank's block + i. One gather for both directions (see above).
        cols = [s * (1 + k) for s in sizes]
        offset = sum(cols[:rank])
        both = _GatherRows.apply(torch.cat([text_cols, image_cols], dim=1).contiguous(), cols, rank, group)
        text_cols, image_cols = both[:, :d], both[:, d:]
        text_g = _gather_rows_nograd(text_g, cols, group)
        image_g = _gather_rows_nograd(image_g, cols, group)
    else:
        total_n, offset = n, 0
    if total_n == 0:
        raise KernelError("global_contrastive_loss needs at least one pair across ranks")
    rows = one_way_loss_sum(text, image_cols, logit_scale, offset=offset, ga=group_ids, gb=image_g, impl=impl)
    cols_ = one_way_loss_sum(image, text_cols, logit_scale, offset=offset, ga=group_ids, gb=text_g, impl=impl)
    share = (rows + cols_) / (2 * total_n)
    if not distributed:
        return share
    total = share.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return share + (total - share).detach()
