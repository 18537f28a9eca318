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
    """
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
