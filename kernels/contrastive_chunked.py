"""Memory-lean torch primitives of the contrastive loss: row log-sum-exps and row gradients.

The CPU path (and the GPU fallback). Rows are processed in chunks so that only a
``chunk × n`` slab of logits exists at a time; nothing n×n is ever allocated. The Triton module
exposes the same two functions with the same signatures, so the autograd Functions in
``contrastive.py`` are written once for both.

Conventions shared with the Triton primitives: logits are ``S = scale * a @ b.T``; row i's positive
is column ``i + diag_offset``; with group ids, entry (i, j) is excluded (as if ``-inf``) when
``ga[i] == gb[j]`` and ``j != i + diag_offset``. Arithmetic is float32 whatever the input dtype.
"""
from __future__ import annotations

import torch

# Elements of one logits slab (float32): 4M elements = 16 MiB, a few live at once.
_CHUNK_ELEMS = 1 << 22


def _chunks(rows: int, cols: int):
    step = max(1, min(rows, _CHUNK_ELEMS // max(cols, 1)))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _logits(a32, b32, scale, ga, gb, diag_offset, start, stop):
    s = a32[start:stop] @ b32.T
    if scale is not None:
        s = s * scale
    if ga is not None:
        cols = torch.arange(b32.shape[0], device=s.device)
        own = torch.arange(start, stop, device=s.device) + diag_offset
        excluded = (ga[start:stop, None] == gb[None, :]) & (cols[None, :] != own[:, None])
        s = s.masked_fill(excluded, float("-inf"))
    return s


def row_lse(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    ga: torch.Tensor | None = None,
    gb: torch.Tensor | None = None,
    diag_offset: int = 0,
    with_pos: bool = False,
):
    """``logsumexp_j S[i, j]`` over the non-excluded entries, float32 ``[len(a)]``.

    With ``with_pos``, also the positives' logits ``S[i, i + diag_offset]`` taken from the same
    computed logits (so that ``lse - pos`` carries one rounding of S), as ``(lse, pos)``.
    """
    a32, b32 = a.float(), b.float()
    lse = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    pos = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    for start, stop in _chunks(a.shape[0], b.shape[0]):
        s = _logits(a32, b32, scale, ga, gb, diag_offset, start, stop)
        lse[start:stop] = torch.logsumexp(s, dim=1)
        if with_pos:
            own = torch.arange(start, stop, device=a.device) + diag_offset
            inside = (own >= 0) & (own < b.shape[0])
            pos[start:stop][inside] = s[torch.arange(stop - start, device=a.device)[inside], own[inside]]
    return (lse, pos) if with_pos else lse


def row_grad(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    lse_x: torch.Tensor | None = None,
    lse_y: torch.Tensor | None = None,
    gx: torch.Tensor | None = None,
    gy: torch.Tensor | None = None,
    diag_offset: int = 0,
) -> torch.Tensor:
    """``G @ y`` in float32 ``[len(x), d]``: the gradient of the summed cross-entropies w.r.t. the raw logits, times y.

    ``G = exp(S - lse_x[:, None]) + exp(S - lse_y[None, :]) - c·[j == i + diag_offset]``, with
    either softmax term left out when its lse is None and c the number of terms kept (each
    cross-entropy's ``-1`` at its positive). Excluded entries contribute nothing. The caller
    applies the scale and the normalization.
    """
    x32, y32 = x.float(), y.float()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for start, stop in _chunks(x.shape[0], y.shape[0]):
        s = _logits(x32, y32, scale, gx, gy, diag_offset, start, stop)
        g = torch.zeros_like(s)
        if lse_x is not None:
            g += torch.exp(s - lse_x[start:stop, None])
        if lse_y is not None:
            g += torch.exp(s - lse_y[None, :])
        own = torch.arange(start, stop, device=x.device) + diag_offset
        inside = (own >= 0) & (own < y.shape[0])
        rows = torch.arange(stop - start, device=x.device)[inside]
        g[rows, own[inside]] -= (lse_x is not None) + (lse_y is not None)
        out[start:stop] = g @ y32
    return out
