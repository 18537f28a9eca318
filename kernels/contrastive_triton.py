"""Triton kernels of the contrastive loss and their launch code: row log-sum-exps and row gradients.

Same two primitives, same signatures as ``contrastive_chunked`` (see its docstring for the
conventions), but each tile of ``S = scale * a @ b.T`` lives only in registers:

- ``row_lse``: one program per block of rows walks every column tile, computing the tile with
  ``tl.dot`` (bf16/fp16 operands, fp32 accumulation; fp32 operands through TF32) and folding it
  into a running max-shifted log-sum-exp. Only the ``[m]`` result is written. The bidirectional
  loss calls it twice (texts against images, images against texts), so its column statistics
  need neither atomics nor an ``n/BLOCK_M × n`` partial buffer.
- ``row_grad``: recomputes each tile, forms ``G = exp(S - lse_x) + exp(S - lse_y)`` and accumulates
  ``G @ y`` for the program's rows: in registers when d is small, else read-modify-written in a
  float32 ``[m, d]`` buffer that only this program touches (deterministic, no atomics).

Exponentials run as ``exp2`` on log2-scaled logits. Offsets are int64; there is no host sync.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = 1.4426950408889634
LN2: tl.constexpr = 0.6931471805599453

# Largest (padded) d whose [BLOCK_M, d] float32 gradient accumulator stays in registers.
REG_D_MAX = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fwd_configs():
    if _interpreting():  # small tiles so that tiny test shapes still cross tile edges
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    if major >= 9:  # Hopper: 228 KB shared memory, wgmma wants 64-row multiples per warpgroup
        shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)]
    else:  # Ampere: 164 KB (A100) or 100 KB (consumer) shared memory
        shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                  (128, 128, 64, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _bwd_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    if major >= 9:
        shapes = [(128, 128, 64, 128, 8, 3), (128, 64, 64, 128, 8, 3), (64, 128, 64, 128, 4, 3),
                  (128, 128, 64, 64, 8, 3), (64, 256, 64, 128, 8, 3), (128, 256, 64, 64, 8, 2),
                  (64, 64, 64, 128, 4, 4)]
    else:
        shapes = [(128, 64, 32, 64, 8, 3), (64, 128, 32, 64, 4, 3), (64, 64, 64, 64, 4, 3),
                  (128, 128, 32, 64, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": dd}, num_warps=w, num_stages=s)
            for m, n, k, dd, w, s in shapes]


# Below this many logits a problem takes microseconds: benchmarking configs would cost more than
# it saves, so the smallest tile (most programs) is used untuned.
_TUNE_MIN_LOGITS = 1 << 22


def _small_problem(named_args, kwargs) -> bool:
    args = {**named_args, **kwargs}
    return args["M_BUCKET"] * args["N_BUCKET"] < _TUNE_MIN_LOGITS


def _smallest(configs):
    return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -c.num_stages))]


def _prune_fwd(configs, named_args, **kwargs):
    return _smallest(configs) if _small_problem(named_args, kwargs) else configs


def _prune_bwd(configs, named_args, **kwargs):
    if _small_problem(named_args, kwargs):
        return _smallest(configs)
    # In register mode BLOCK_D is unused (d is padded to REG_D), so only distinct tiles remain.
    if {**named_args, **kwargs}["ACC_IN_REGS"]:
        seen, kept = set(), []
        for c in configs:
            k = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            if k not in seen:
                seen.add(k)
                kept.append(c)
        return kept
    return configs


def _even_k(args) -> bool:
    return args["D"] % args["BLOCK_K"] == 0


@triton.jit
def _logit_tile(a_ptr, b_ptr, rows, cols, D, stride_a, stride_b,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a[rows] @ b[cols].T`` in float32; rows and cols are already clamped into range."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + cols[:, None] * stride_b + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k + ks)[None, :] < D, other=0.0)
            b = tl.load(b_ptrs, mask=(k + ks)[None, :] < D, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _kept(rows, cols, N, g_row, gb_ptr, cols_c, diag_offset, HAS_GROUPS: tl.constexpr):
    """Which tile entries count: real columns, minus same-group non-positives."""
    keep = cols[None, :] < N
    if HAS_GROUPS:
        g_col = tl.load(gb_ptr + cols_c)
        own = rows + diag_offset
        keep = keep & ((g_row[:, None] != g_col[None, :]) | (cols[None, :] == own[:, None]))
    return keep


@triton.autotune(configs=_fwd_configs(), key=["D", "M_BUCKET", "N_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _row_lse_kernel(a_ptr, b_ptr, scale_ptr, ga_ptr, gb_ptr, lse_ptr,
                    M, N, D, stride_a, stride_b, diag_offset, M_BUCKET, N_BUCKET,
                    HAS_SCALE: tl.constexpr, HAS_GROUPS: tl.constexpr, EVEN_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_c = tl.minimum(rows, M - 1)  # clamped rows load real data; their results are never stored
    k2 = LOG2E  # logits go to the log2 domain so that exp2 is the native instruction
    if HAS_SCALE:
        k2 = k2 * tl.load(scale_ptr)
    g_row = rows_c  # placeholder when there are no groups
    if HAS_GROUPS:
        g_row = tl.load(ga_ptr + rows_c)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        cols_c = tl.minimum(cols, N - 1)
        s = _logit_tile(a_ptr, b_ptr, rows_c, cols_c, D, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION, UPCAST) * k2
        s = tl.where(_kept(rows_c, cols, N, g_row, gb_ptr, cols_c, diag_offset, HAS_GROUPS), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see a fully excluded tile
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(lse_ptr + rows, lse, mask=rows < M)


@triton.autotune(configs=_bwd_configs(), key=["D", "M_BUCKET", "N_BUCKET", "ACC_IN_REGS"],
                 reset_to_zero=["out_ptr"], prune_configs_by={"early_config_prune": _prune_bwd})
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _row_grad_kernel(x_ptr, y_ptr, scale_ptr, lse_x_ptr, lse_y_ptr, gx_ptr, gy_ptr, out_ptr,
                     M, N, D, stride_x, stride_y, stride_o, diag_offset, M_BUCKET, N_BUCKET,
                     HAS_SCALE: tl.constexpr, HAS_LX: tl.constexpr, HAS_LY: tl.constexpr,
                     HAS_GROUPS: tl.constexpr, EVEN_K: tl.constexpr, ACC_IN_REGS: tl.constexpr,
                     REG_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_c = tl.minimum(rows, M - 1)
    row_ok = rows < M
    k2 = LOG2E
    if HAS_SCALE:
        k2 = k2 * tl.load(scale_ptr)
    g_row = rows_c
    if HAS_GROUPS:
        g_row = tl.load(gx_ptr + rows_c)
    lx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_LX:
        lx = tl.load(lse_x_ptr + rows_c) * LOG2E
    # Register mode: the whole (padded) d is one chunk of width REG_D.
    rd = tl.arange(0, REG_D)
    acc = tl.zeros((BLOCK_M, REG_D), dtype=tl.float32)
    ds = tl.arange(0, BLOCK_D)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        cols_c = tl.minimum(cols, N - 1)
        s = _logit_tile(x_ptr, y_ptr, rows_c, cols_c, D, stride_x, stride_y,
                        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION, UPCAST) * k2
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LX:
            g += tl.exp2(s - lx[:, None])
        if HAS_LY:
            ly = tl.load(lse_y_ptr + cols_c) * LOG2E
            g += tl.exp2(s - ly[None, :])
        # The positives' -1 per softmax term is applied here, in fp32, before G is rounded to the
        # operand dtype: G - 2 is small where training has converged, so it rounds finely. The
        # mask below then also drops positives that fall past the last column.
        g = tl.where(cols[None, :] == (rows + diag_offset)[:, None], g - (HAS_LX + HAS_LY), g)
        g = tl.where(_kept(rows_c, cols, N, g_row, gy_ptr, cols_c, diag_offset, HAS_GROUPS), g, 0.0)
        g = g.to(y_ptr.dtype.element_ty)  # Tensor Core operand; G lies in [0, 2]
        if UPCAST:
            g = g.to(tl.float32)
        if ACC_IN_REGS:
            y = tl.load(y_ptr + cols_c[:, None] * stride_y + rd[None, :], mask=rd[None, :] < D, other=0.0)
            if UPCAST:
                y = y.to(tl.float32)
            acc = tl.dot(g, y, acc, input_precision=PRECISION)
        else:
            # This program alone owns these output rows, so the float32 read-modify-write is race-free.
            for kd in range(0, D, BLOCK_D):
                d_ok = (kd + ds)[None, :] < D
                y = tl.load(y_ptr + cols_c[:, None] * stride_y + (kd + ds)[None, :], mask=d_ok, other=0.0)
                if UPCAST:
                    y = y.to(tl.float32)
                o_ptrs = out_ptr + rows[:, None] * stride_o + (kd + ds)[None, :]
                o = tl.load(o_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
                o = tl.dot(g, y, o, input_precision=PRECISION)
                tl.store(o_ptrs, o, mask=row_ok[:, None] & d_ok)
    if ACC_IN_REGS:
        tl.store(out_ptr + rows[:, None] * stride_o + rd[None, :], acc, mask=row_ok[:, None] & (rd[None, :] < D))


def _bucket(n: int) -> int:
    # Autotune once per power-of-two size class, not once per batch size (token-budget batches vary).
    return triton.next_power_of_2(max(n, 1))


def _precision(x: torch.Tensor) -> str:
    if _upcast(x):
        return "ieee"
    return "tf32" if x.dtype == torch.float32 else "ieee"  # ignored for 16-bit operands


def _upcast(x: torch.Tensor) -> bool:
    # Triton's CPU interpreter multiplies bf16 tiles wrongly (it stores them as uint16); there,
    # bf16 operands are widened to fp32 first, which is exact. Compiled kernels never do this.
    return _interpreting() and x.dtype == torch.bfloat16


def _check(a: torch.Tensor, b: torch.Tensor):
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or a.dtype != b.dtype:
        raise TypeError(f"triton contrastive loss takes fp16/bf16/fp32 features of one dtype; got {a.dtype}, {b.dtype}")
    return a.contiguous(), b.contiguous()


def row_lse(a, b, scale=None, *, ga=None, gb=None, diag_offset: int = 0) -> torch.Tensor:
    """Triton twin of :func:`kernels.contrastive_chunked.row_lse`."""
    a, b = _check(a, b)
    m, d = a.shape
    n = b.shape[0]
    out = torch.empty(m, dtype=torch.float32, device=a.device)
    if m == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _row_lse_kernel[grid](
        a, b, scale if scale is not None else out, ga if ga is not None else out, gb if gb is not None else out, out,
        m, n, d, a.stride(0), b.stride(0), diag_offset, _bucket(m), _bucket(n),
        HAS_SCALE=scale is not None, HAS_GROUPS=ga is not None, PRECISION=_precision(a), UPCAST=_upcast(a),
    )
    return out


def row_grad(x, y, scale=None, *, lse_x=None, lse_y=None, gx=None, gy=None, diag_offset: int = 0) -> torch.Tensor:
    """Triton twin of :func:`kernels.contrastive_chunked.row_grad` (float32 ``[len(x), d]``)."""
    x, y = _check(x, y)
    m, d = x.shape
    n = y.shape[0]
    out = torch.zeros((m, d), dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    reg_d = max(16, triton.next_power_of_2(d))
    acc_in_regs = reg_d <= REG_D_MAX
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _row_grad_kernel[grid](
        x, y, scale if scale is not None else out, lse_x if lse_x is not None else out,
        lse_y if lse_y is not None else out, gx if gx is not None else out, gy if gy is not None else out, out,
        m, n, d, x.stride(0), y.stride(0), out.stride(0), diag_offset, _bucket(m), _bucket(n),
        HAS_SCALE=scale is not None, HAS_LX=lse_x is not None, HAS_LY=lse_y is not None,
        HAS_GROUPS=gx is not None, ACC_IN_REGS=acc_in_regs, REG_D=reg_d if acc_in_regs else 16,
        PRECISION=_precision(x), UPCAST=_upcast(x),
    )
    return out
