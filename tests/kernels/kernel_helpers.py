"""Shared inputs and comparisons for the kernels tests."""
from __future__ import annotations

import torch

from ldot.kernels import contrastive_loss_reference


def features(n: int, d: int, *, dtype=torch.float32, seed: int = 0, device="cpu"):
    """Unit-ish random features (fresh per seed), as an encoder's normalized output would be."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    i = t * 0.6 + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # positives correlated
    t = t / t.norm(dim=1, keepdim=True)
    i = i / i.norm(dim=1, keepdim=True)
    return t.to(dtype).to(device), i.to(dtype).to(device)


def groups(n: int, seed: int = 0) -> torch.Tensor:
    """Group ids with repeats (about two captions per image)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, max(1, n // 2), (n,), generator=gen, dtype=torch.int64)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def reference_with_grads(text, image, scale=None, group_ids=None):
    """Float64 loss and gradients (text, image, scale) on the exact values the fast path sees."""
    t = text.detach().double().cpu().requires_grad_(True)
    i = image.detach().double().cpu().requires_grad_(True)
    s = None if scale is None else scale.detach().double().cpu().requires_grad_(True)
    g = None if group_ids is None else group_ids.cpu()
    loss = contrastive_loss_reference(t, i, s, g)
    loss.backward()
    return loss.detach(), t.grad, i.grad, (None if s is None else s.grad)


def fast_with_grads(fn, text, image, scale=None, **kw):
    t = text.detach().clone().requires_grad_(True)
    i = image.detach().clone().requires_grad_(True)
    s = None if scale is None else scale.detach().clone().requires_grad_(True)
    loss = fn(t, i, s, **kw)
    loss.backward()
    return loss.detach(), t.grad, i.grad, (None if s is None else s.grad)
