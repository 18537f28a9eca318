"""The public contrastive (CMR) loss: autograd Functions, the dispatching function and the module.

The loss over ``S = scale * text @ image.T`` (n×n, never materialized) is
``1/(2n) Σ_k [(lse_row_k - S_kk) + (lse_col_k - S_kk)]``. Its gradient is
``dS = 1/(2n) (P + Q - 2I)`` with P, Q the row- and column-softmaxes, so every backward quantity
is ``(P + Q - 2I) @ features`` (and ``d scale = Σ text ⊙ dS @ image / scale``); the two primitives ``row_lse`` and ``row_grad`` (torch
chunked or Triton, same signatures) are all the Functions below need.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Literal

import torch
from torch import nn

from . import contrastive_chunked
from .errors import KernelError
from .reference import contrastive_loss_reference

log = logging.getLogger(__name__)

Impl = Literal["auto", "triton", "chunked", "reference"]
_IMPLS = ("auto", "triton", "chunked", "reference")


def _triton():
    # Relative to this package: "kernels.contrastive_triton" fails outside the repository root and,
    # inside it, is a second copy of the module that patches of ldot.kernels.contrastive_triton miss.
    return importlib.import_module(".contrastive_triton", __package__)


def _backend(impl: str, device: torch.device):
    """The module holding ``row_lse``/``row_grad`` for ``impl`` on ``device``."""
    if impl == "auto":
        if device.type != "cuda":
            return contrastive_chunked
        try:
            return _triton()
        except ImportError as exc:  # torch without triton: stay correct, say why once
            log.warning("triton unavailable (%s); contrastive loss uses the chunked torch path", exc)
            return contrastive_chunked
    if impl == "chunked":
        return contrastive_chunked
    if impl == "triton":
        module = _triton()
        if device.type != "cuda" and not module.interpreting():
            raise KernelError(f"impl='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to emulate")
        return module
    raise KernelError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _scale32(scale: torch.Tensor | None) -> torch.Tensor | None:
    return None if scale is None else scale.detach().to(torch.float32).reshape(())


def _scale_grad(scale: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value.reshape(scale.shape).to(scale.dtype)


def _feature_grads(backend, x, y, s, need_x: bool, need_y: bool, *, lse_x=None, lse_y=None, gx=None, gy=None,
                   diag_offset: int = 0):
    """``(G @ y, G.T @ x)`` in float32, each None when not needed, for G over rows x and columns y.

    One fused launch where the backend does pairs at this width (the Triton "tile" backward),
    else ``row_grad`` per side, the second with the roles of x and y swapped (G transposed)."""
    if need_x and need_y and getattr(backend, "fuses_pairs", lambda d: False)(x.shape[1]):
        return backend.pair_grad(x, y, s, lse_x=lse_x, lse_y=lse_y, gx=gx, gy=gy, diag_offset=diag_offset)
    out_x = out_y = None
    if need_x:
        out_x = backend.row_grad(x, y, s, lse_x=lse_x, lse_y=lse_y, gx=gx, gy=gy, diag_offset=diag_offset)
    if need_y:
        out_y = backend.row_grad(y, x, s, lse_x=lse_y, lse_y=lse_x, gx=gy, gy=gx, diag_offset=-diag_offset)
    return out_x, out_y


class _BidirectionalLoss(torch.autograd.Function):
    """Single-process CMR loss: both directions from one set of row/column statistics."""

    @staticmethod
    def forward(ctx, text, image, scale, group_ids, backend):
        n = text.shape[0]
        s = _scale32(scale)
        lse_t, pos_t = backend.row_lse(text, image, s, ga=group_ids, gb=group_ids, with_pos=True)
        lse_i, pos_i = backend.row_lse(image, text, s, ga=group_ids, gb=group_ids, with_pos=True)
        loss = ((lse_t - pos_t).sum() + (lse_i - pos_i).sum()) / (2 * n)
        ctx.save_for_backward(text, image, scale, group_ids, lse_t, lse_i)
        ctx.backend = backend
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        text, image, scale, group_ids, lse_t, lse_i = ctx.saved_tensors
        need_t, need_i, need_s = ctx.needs_input_grad[:3]
        n = text.shape[0]
        s = _scale32(scale)
        k = grad_out.float() / (2 * n)
        ks = k if s is None else k * s
        d_text = d_image = d_scale = None
        gt, gi = _feature_grads(ctx.backend, text, image, s, need_t or need_s, need_i,
                                lse_x=lse_t, lse_y=lse_i, gx=group_ids, gy=group_ids)
        if need_s:
            d_scale = _scale_grad(scale, k * (text.float() * gt).sum())
        if need_t:
            d_text = (ks * gt).to(text.dtype)
        if need_i:
            d_image = (ks * gi).to(image.dtype)
        return d_text, d_image, d_scale, None, None


class _OneWayLoss(torch.autograd.Function):
    """``Σ_i (lse_i - S[i, i + offset])`` for rows ``a`` against all of ``b`` (the cross-rank piece).

    Returned unnormalized; rank r calls it for its texts against all images and for its images
    against all texts.
    """

    @staticmethod
    def forward(ctx, a, b, scale, ga, gb, offset, backend):
        s = _scale32(scale)
        lse, pos = backend.row_lse(a, b, s, ga=ga, gb=gb, diag_offset=offset, with_pos=True)
        ctx.save_for_backward(a, b, scale, ga, gb, lse)
        ctx.offset, ctx.backend = offset, backend
        return (lse - pos).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a, b, scale, ga, gb, lse = ctx.saved_tensors
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        off = ctx.offset
        s = _scale32(scale)
        k = grad_out.float()
        ks = k if s is None else k * s
        d_a = d_b = d_scale = None
        ga_raw, gb_raw = _feature_grads(ctx.backend, a, b, s, need_a or need_s, need_b,
                                        lse_x=lse, gx=ga, gy=gb, diag_offset=off)
        if need_s:
            d_scale = _scale_grad(scale, k * (a.float() * ga_raw).sum())
        if need_a:
            d_a = (ks * ga_raw).to(a.dtype)
        if need_b:
            d_b = (ks * gb_raw).to(b.dtype)
        return d_a, d_b, d_scale, None, None, None, None


def _check_inputs(text, image, logit_scale, group_ids):
    if not (torch.is_tensor(text) and torch.is_tensor(image)):
        raise KernelError("text and image must be tensors")
    if text.dim() != 2 or text.shape != image.shape:
        raise KernelError(f"text and image must both be [n, d]; got {tuple(text.shape)} and {tuple(image.shape)}")
    if text.dtype != image.dtype or not text.dtype.is_floating_point:
        raise KernelError(f"text and image need one floating dtype; got {text.dtype} and {image.dtype}")
    if text.device != image.device:
        raise KernelError(f"text and image are on different devices: {text.device}, {image.device}")
    if logit_scale is not None and not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=text.device)
    if logit_scale is not None and logit_scale.numel() != 1:
        raise KernelError(f"logit_scale must hold one value; got shape {tuple(logit_scale.shape)}")
    if group_ids is not None:
        if group_ids.shape != (text.shape[0],) or group_ids.dtype != torch.int64:
            raise KernelError(f"group_ids must be int64 [{text.shape[0]}]; got {group_ids.dtype} {tuple(group_ids.shape)}")
        group_ids = group_ids.to(text.device).contiguous()
    return logit_scale, group_ids


def contrastive_loss(
    text: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor | float | None = None,
    *,
    impl: Impl = "auto",
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional contrastive (CMR) loss without the n×n matrix.

    Args:
        text, image: ``[n, d]`` features of one dtype (bf16/fp16/fp32); row k of each is a positive pair.
        logit_scale: scalar tensor multiplying the logits (1 when None). Differentiable.
        impl: ``"triton"`` (CUDA; fp32 inputs go through TF32 Tensor Cores), ``"chunked"`` (torch,
            float32, memory ``O(chunk·n + n·d)``), ``"reference"`` (float64, materialized; for
            tests), or ``"auto"`` (triton on CUDA, chunked otherwise).
        group_ids: optional int64 ``[n]``; entries (i, j), i≠j, of one group are left out of both
            softmax denominators (two captions of one image are not each other's negatives).

    Returns:
        Scalar loss ``(CE(text→image) + CE(image→text)) / 2``, float32 (float64 for ``"reference"``),
        differentiable in text, image and logit_scale.
    """
    logit_scale, group_ids = _check_inputs(text, image, logit_scale, group_ids)
    if text.shape[0] == 0:
        raise KernelError("contrastive_loss needs at least one pair")
    if impl == "reference":
        return contrastive_loss_reference(text, image, logit_scale, group_ids)
    backend = _backend(impl, text.device)
    return _BidirectionalLoss.apply(text.contiguous(), image.contiguous(), logit_scale, group_ids, backend)


def one_way_loss_sum(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor | None,
    *,
    offset: int,
    ga: torch.Tensor | None = None,
    gb: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``Σ_i [logsumexp_j S_ij - S_{i, i+offset}]`` for ``S = scale * a @ b.T`` (unnormalized).

    The building block of the cross-rank loss: ``a`` holds this rank's rows, ``b`` the global batch,
    and row i's positive sits at ``i + offset``. ``ga``/``gb``: group ids of a's and b's rows.
    """
    if impl == "reference":
        raise KernelError("one_way_loss_sum has no reference impl; use contrastive_loss_reference on the whole batch")
    if a.shape[0] == 0:  # a rank may hold no pairs; it still takes part in the collectives
        zero = (a.sum() + b.sum()) * 0.0
        return zero.float() if logit_scale is None else zero.float() + 0.0 * logit_scale.reshape(())
    backend = _backend(impl, a.device)
    return _OneWayLoss.apply(a.contiguous(), b.contiguous(), logit_scale, ga, gb, offset, backend)


class ContrastiveLoss(nn.Module):
    """CMR loss as a module, owning the logit scale.

    Args:
        scale: ``"none"`` (the paper's plain dot product), ``"fixed"`` (``init_scale``, a buffer), or
            ``"learnable"`` (CLIP: a parameter holding ``log(init_scale)``; the scale used is
            ``exp(log_scale)`` clamped to ``max_scale``, so it gets no gradient past the clamp).
        init_scale: starting scale, e.g. ``1/0.07``.
        max_scale: CLIP's clamp, 100.
        impl: see :func:`contrastive_loss`.
    """

    def __init__(
        self,
        scale: Literal["none", "fixed", "learnable"] = "learnable",
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        impl: Impl = "auto",
    ):
        super().__init__()
        if scale not in ("none", "fixed", "learnable"):
            raise KernelError(f"scale must be 'none', 'fixed' or 'learnable', got {scale!r}")
        if impl not in _IMPLS:
            raise KernelError(f"impl must be one of {_IMPLS}, got {impl!r}")
        if scale != "none" and not (0 < init_scale <= max_scale):
            raise KernelError(f"need 0 < init_scale <= max_scale; got {init_scale} and {max_scale}")
        self.scale_mode, self.max_scale, self.impl = scale, float(max_scale), impl
        if scale == "learnable":
            # shape [1], not 0-d: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes
            self.log_scale = nn.Parameter(torch.tensor([math.log(init_scale)]))
        elif scale == "fixed":
            self.register_buffer("fixed_scale", torch.tensor([float(init_scale)]))

    def logit_scale(self) -> torch.Tensor | None:
        """The scale the loss multiplies logits by (a differentiable 0-d tensor), or None."""
        if self.scale_mode == "learnable":
            return self.log_scale.exp().clamp(max=self.max_scale).squeeze(0)
        if self.scale_mode == "fixed":
            return self.fixed_scale.squeeze(0)
        return None

    @property
    def current_scale(self) -> float:
        """The scale in use, as a float for logging (syncs with the device: call off the hot path)."""
        s = self.logit_scale()
        return 1.0 if s is None else float(s.detach())

    def forward(self, text: torch.Tensor, image: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
        return contrastive_loss(text, image, self.logit_scale(), impl=self.impl, group_ids=group_ids)

    def extra_repr(self) -> str:
        return f"scale={self.scale_mode!r}, max_scale={self.max_scale}, impl={self.impl!r}"
