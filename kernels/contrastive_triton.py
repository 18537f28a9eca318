"""Triton kernels of the contrastive loss and their launch code: row log-sum-exps and row gradients.

Same two primitives, same signatures as ``contrastive_chunked`` (see its docstring for the
conventions), but each tile of ``S = scale * a @ b.T`` lives only in registers:

- ``row_lse``: one program per block of rows walks every column tile, computing the tile with
  ``tl.dot`` (bf16/fp16 operands, fp32 accumulation; fp32 operands on TF32 Tensor Cores, three
  passes at torch's default float32 matmul precision "highest", one pass when torch is set to
  "high" or "medium") and folding it
  into a running max-shifted log-sum-exp; it also picks out the positive's logit from the same
  tile, so that the loss ``lse - positive`` sees one rounding of S (it matters under TF32). Only
  ``[m]`` results are written. The bidirectional loss calls it twice (texts against images,
  images against texts), so column statistics need neither atomics nor an ``n/BLOCK_M × n`` buffer.
- ``row_grad``: recomputes each tile, forms ``G = exp(S - lse_x) + exp(S - lse_y) - c·I`` and
  accumulates ``G @ y`` in registers for the program's rows. For d ≤ 256 the row block and each
  column tile are loaded once and serve both products (the flash-attention shape, with V = K);
  for larger d a second grid axis splits the output columns into chunks of 256, each program
  recomputing S over the full d: more arithmetic, but no n-sized buffer, no atomics, deterministic.
  Two autotuned variants of that path: PREFETCH_Y issues the chunk's load before the K loop (won
  on the H100 at d = 768), ALL_CHUNKS keeps up to four chunk accumulators in one 16-warp program so
  that S is computed once (lost there; kept for other parts and shapes).

Exponentials run as ``exp2`` on log2-scaled logits. Offsets are int64; there is no host sync.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Largest padded d loaded whole (one K step, operands reused for both products of the backward).
SINGLE_K_MAX = 256
# Output columns per backward program when d is larger: a [BLOCK_M, D_CHUNK] fp32 accumulator.
D_CHUNK = 256


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1) instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _configs(shapes, **extra):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, **extra}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _fwd_configs():
    if interpreting():  # small tiles so that tiny test shapes still cross tile edges
        return _configs([(16, 16, 16, 4, 1)])
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    if major >= 9:  # Hopper: 227 KB shared memory; wgmma works on 64-row slabs per warpgroup
        return _configs([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                         (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 8, 3)])
    # Ampere: 164 KB (A100) or 100 KB (consumer parts) of shared memory
    return _configs([(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                     (128, 128, 64, 8, 2), (64, 64, 32, 4, 2)])


def _bwd_configs():
    # ALL_CHUNKS (d > SINGLE_K_MAX only): one program accumulates every column chunk of its rows,
    # so each tile of S is computed once; it needs many warps to hold the accumulators.
    if interpreting():
        return _configs([(16, 16, 16, 4, 1)], ALL_CHUNKS=False)
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    if major >= 9:
        return _configs([(64, 128, 64, 8, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 2), (128, 64, 64, 8, 2),
                         (128, 128, 64, 8, 2), (64, 64, 64, 8, 4), (128, 64, 32, 8, 3), (64, 256, 64, 8, 2)],
                        ALL_CHUNKS=False) + _configs(
            [(64, 64, 64, 16, 3), (64, 128, 64, 16, 2), (64, 64, 32, 16, 3), (128, 64, 64, 16, 2)], ALL_CHUNKS=True
        ) + _configs([(64, 64, 64, 4, 3), (64, 64, 64, 8, 3), (128, 64, 64, 8, 3)], ALL_CHUNKS=False, PREFETCH_Y=True)
    return _configs([(64, 64, 32, 4, 3), (64, 128, 32, 8, 2), (128, 64, 32, 8, 2), (64, 64, 64, 4, 2),
                     (64, 32, 64, 4, 2)], ALL_CHUNKS=False) + _configs([(64, 64, 32, 16, 2)], ALL_CHUNKS=True)


# Below this many logits a problem takes microseconds: benchmarking configs would cost more than
# it saves, so the smallest tile (most programs) is used untuned.
_TUNE_MIN_LOGITS = 1 << 22


def _smem_limit() -> int:
    if not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 166 * 1024)


def _prune(configs, named_args, backward: bool, **kwargs):
    """Drop configs that cannot fit (shared memory, registers) or that differ only in unused fields."""
    args = {**named_args, **kwargs}
    plain = [c for c in configs if not c.kwargs.get("ALL_CHUNKS")]
    if args["M_BUCKET"] * args["N_BUCKET"] < _TUNE_MIN_LOGITS:
        return [min(plain, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -c.num_stages))]
    es = args["a_ptr"].element_size()
    dp, dc, nch = args["DP"], args.get("DC", 0), args.get("NCHUNK", 1)
    kept, seen = [], set()
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        chunks = nch if c.kwargs.get("ALL_CHUNKS") else 1
        if dp:  # one K step of width DP: BLOCK_K unused; the row block is loaded once
            if c.kwargs.get("ALL_CHUNKS") or c.kwargs.get("PREFETCH_Y"):
                continue
            smem = (bm + c.num_stages * bn) * dp * es
            key = (bm, bn, c.num_warps, c.num_stages)
        else:
            smem = c.num_stages * (bm + bn) * bk * es + (bn * dc * es if backward else 0)
            key = (bm, bn, bk, c.num_warps, c.num_stages, chunks, c.kwargs.get("PREFETCH_Y", False))
        if chunks > 4:
            continue
        acc = bm * (dp or dc) * chunks if backward else 0  # fp32 gradient accumulators, in registers
        if key in seen or smem > _smem_limit() or acc > 4096 * c.num_warps:  # ≤ 128 registers a thread
            continue
        seen.add(key)
        kept.append(c)
    return kept or plain[-1:]


def _prune_fwd(configs, named_args, **kwargs):
    return _prune(configs, named_args, False, **kwargs)


def _prune_bwd(configs, named_args, **kwargs):
    return _prune(configs, named_args, True, **kwargs)


def _even_k(args) -> bool:
    return args["D"] % (args["DP"] or args["BLOCK_K"]) == 0


@triton.jit
def _logit_tile(a_ptr, b_ptr, rows, cols, D, stride_a, stride_b,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a[rows] @ b[cols].T`` in float32 over a K loop; rows and cols are already clamped into range."""
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
def _load_rows(ptr, rows, stride, D, DP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """Whole (padded) rows ``[len(rows), DP]`` for the one-K-step path."""
    dk = tl.arange(0, DP)
    ptrs = ptr + rows[:, None] * stride + dk[None, :]
    if EVEN_K:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=dk[None, :] < D, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_chunk(ptr, rows, stride, dcs, D, UPCAST: tl.constexpr):
    """Columns ``dcs`` of the given rows (zero past d)."""
    x = tl.load(ptr + rows[:, None] * stride + dcs[None, :], mask=dcs[None, :] < D, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


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
def _row_lse_kernel(a_ptr, b_ptr, scale_ptr, ga_ptr, gb_ptr, lse_ptr, pos_ptr,
                    M, N, D, stride_a, stride_b, diag_offset, M_BUCKET, N_BUCKET,
                    HAS_SCALE: tl.constexpr, HAS_GROUPS: tl.constexpr, EVEN_K: tl.constexpr, DP: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_c = tl.minimum(rows, M - 1)  # clamped rows load real data; their results are never stored
    own = rows_c + diag_offset  # each row's positive column
    own_lo = pid.to(tl.int64) * BLOCK_M + diag_offset
    k2 = LOG2E  # logits go to the log2 domain so that exp2 is the native instruction
    if HAS_SCALE:
        k2 = k2 * tl.load(scale_ptr)
    g_row = rows_c  # placeholder when there are no groups
    if HAS_GROUPS:
        g_row = tl.load(ga_ptr + rows_c)
    if DP > 0:
        x = _load_rows(a_ptr, rows_c, stride_a, D, DP, EVEN_K, UPCAST)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        cols_c = tl.minimum(cols, N - 1)
        if DP > 0:
            y = _load_rows(b_ptr, cols_c, stride_b, D, DP, EVEN_K, UPCAST)
            s = tl.dot(x, tl.trans(y), input_precision=PRECISION) * k2
        else:
            s = _logit_tile(a_ptr, b_ptr, rows_c, cols_c, D, stride_a, stride_b,
                            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION, UPCAST) * k2
        s = tl.where(_kept(rows_c, cols, N, g_row, gb_ptr, cols_c, diag_offset, HAS_GROUPS), s, float("-inf"))
        if (start_n < own_lo + BLOCK_M) & (start_n + BLOCK_N > own_lo):  # tiles holding positives
            pos += tl.sum(tl.where(cols[None, :] == own[:, None], s, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may see a fully excluded tile
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + rows, (m_i + tl.log2(l_i)) * LN2, mask=rows < M)
    tl.store(pos_ptr + rows, pos * LN2, mask=rows < M)


@triton.autotune(configs=_bwd_configs(), key=["D", "M_BUCKET", "N_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _row_grad_kernel(a_ptr, y_ptr, scale_ptr, lse_x_ptr, lse_y_ptr, gx_ptr, gy_ptr, out_ptr,
                     M, N, D, stride_x, stride_y, stride_o, diag_offset, M_BUCKET, N_BUCKET,
                     HAS_SCALE: tl.constexpr, HAS_LX: tl.constexpr, HAS_LY: tl.constexpr,
                     HAS_GROUPS: tl.constexpr, EVEN_K: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr,
                     NCHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALL_CHUNKS: tl.constexpr,
                     PREFETCH_Y: tl.constexpr = False):
    # a_ptr is x (named so that the pruner reads the element size the same way for both kernels).
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_c = tl.minimum(rows, M - 1)
    k2 = LOG2E
    if HAS_SCALE:
        k2 = k2 * tl.load(scale_ptr)
    g_row = rows_c
    if HAS_GROUPS:
        g_row = tl.load(gx_ptr + rows_c)
    lx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_LX:
        lx = tl.load(lse_x_ptr + rows_c) * LOG2E
    # This program's output columns: all of d when it is loaded whole; else chunk program_id(1) of
    # width DC, or with ALL_CHUNKS every chunk (up to four accumulators, unrolled at compile time).
    dcs = tl.program_id(1).to(tl.int64) * DC + tl.arange(0, DC)
    if DP > 0:
        x = _load_rows(a_ptr, rows_c, stride_x, D, DP, EVEN_K, UPCAST)
    acc = tl.zeros((BLOCK_M, DC), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, DC), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, DC), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, DC), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        cols_c = tl.minimum(cols, N - 1)
        if DP > 0:
            y = _load_rows(y_ptr, cols_c, stride_y, D, DP, EVEN_K, UPCAST)
            s = tl.dot(x, tl.trans(y), input_precision=PRECISION) * k2
        else:
            if PREFETCH_Y:  # issue the chunk's load before the K loop so that it overlaps it
                y = _load_chunk(y_ptr, cols_c, stride_y, dcs, D, UPCAST)
            s = _logit_tile(a_ptr, y_ptr, rows_c, cols_c, D, stride_x, stride_y,
                            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION, UPCAST) * k2
            if not PREFETCH_Y:
                y = _load_chunk(y_ptr, cols_c, stride_y, dcs, D, UPCAST)
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
        g = g.to(y_ptr.dtype.element_ty)  # Tensor Core operand; G lies in [-2, 2]
        if UPCAST:
            g = g.to(tl.float32)
        acc = tl.dot(g, y, acc, input_precision=PRECISION)
        if ALL_CHUNKS and NCHUNK > 1:
            acc1 = tl.dot(g, _load_chunk(y_ptr, cols_c, stride_y, dcs + DC, D, UPCAST), acc1, input_precision=PRECISION)
        if ALL_CHUNKS and NCHUNK > 2:
            acc2 = tl.dot(g, _load_chunk(y_ptr, cols_c, stride_y, dcs + 2 * DC, D, UPCAST), acc2, input_precision=PRECISION)
        if ALL_CHUNKS and NCHUNK > 3:
            acc3 = tl.dot(g, _load_chunk(y_ptr, cols_c, stride_y, dcs + 3 * DC, D, UPCAST), acc3, input_precision=PRECISION)
    row_ok = (rows < M)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_o + dcs[None, :], acc, mask=row_ok & (dcs[None, :] < D))
    if ALL_CHUNKS and NCHUNK > 1:
        tl.store(out_ptr + rows[:, None] * stride_o + (dcs + DC)[None, :], acc1, mask=row_ok & ((dcs + DC)[None, :] < D))
    if ALL_CHUNKS and NCHUNK > 2:
        tl.store(out_ptr + rows[:, None] * stride_o + (dcs + 2 * DC)[None, :], acc2,
                 mask=row_ok & ((dcs + 2 * DC)[None, :] < D))
    if ALL_CHUNKS and NCHUNK > 3:
        tl.store(out_ptr + rows[:, None] * stride_o + (dcs + 3 * DC)[None, :], acc3,
                 mask=row_ok & ((dcs + 3 * DC)[None, :] < D))


def _bucket(n: int) -> int:
    # Autotune once per power-of-two size class, not once per batch size (token-budget batches vary).
    return triton.next_power_of_2(max(n, 1))


def _precision(x: torch.Tensor) -> str:
    if _upcast(x) or x.dtype != torch.float32:
        return "ieee"  # ignored for 16-bit operands
    # fp32 operands follow torch's own setting: "highest" (its default) keeps about fp32 accuracy
    # with three TF32 passes; "high"/"medium" allow plain TF32 (one pass, ~1e-3 relative error).
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _upcast(x: torch.Tensor) -> bool:
    # Triton's CPU interpreter multiplies bf16 tiles wrongly (it stores them as uint16); there,
    # bf16 operands are widened to fp32 first, which is exact. Compiled kernels never do this.
    return interpreting() and x.dtype == torch.bfloat16


def _check(a: torch.Tensor, b: torch.Tensor):
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or a.dtype != b.dtype:
        raise TypeError(f"triton contrastive loss takes fp16/bf16/fp32 features of one dtype; got {a.dtype}, {b.dtype}")
    return a.contiguous(), b.contiguous()


def _single_k(d: int) -> int:
    dp = max(16, triton.next_power_of_2(d))
    return dp if dp <= SINGLE_K_MAX else 0


def row_lse(a, b, scale=None, *, ga=None, gb=None, diag_offset: int = 0, with_pos: bool = False):
    """Triton twin of :func:`kernels.contrastive_chunked.row_lse`."""
    a, b = _check(a, b)
    m, d = a.shape
    n = b.shape[0]
    lse = torch.empty(m, dtype=torch.float32, device=a.device)
    pos = torch.empty(m, dtype=torch.float32, device=a.device)
    if m > 0:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        _row_lse_kernel[grid](
            a, b, scale if scale is not None else lse, ga if ga is not None else lse, gb if gb is not None else lse,
            lse, pos, m, n, d, a.stride(0), b.stride(0), diag_offset, _bucket(m), _bucket(n),
            HAS_SCALE=scale is not None, HAS_GROUPS=ga is not None, DP=_single_k(d),
            PRECISION=_precision(a), UPCAST=_upcast(a),
        )
    return (lse, pos) if with_pos else lse


def row_grad(x, y, scale=None, *, lse_x=None, lse_y=None, gx=None, gy=None, diag_offset: int = 0) -> torch.Tensor:
    """Triton twin of :func:`kernels.contrastive_chunked.row_grad` (float32 ``[len(x), d]``)."""
    x, y = _check(x, y)
    m, d = x.shape
    n = y.shape[0]
    out = torch.empty((m, d), dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    dp = _single_k(d)
    dc = dp or D_CHUNK
    nchunk = triton.cdiv(d, dc)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), 1 if meta["ALL_CHUNKS"] else nchunk)  # noqa: E731
    _row_grad_kernel[grid](
        x, y, scale if scale is not None else out, lse_x if lse_x is not None else out,
        lse_y if lse_y is not None else out, gx if gx is not None else out, gy if gy is not None else out, out,
        m, n, d, x.stride(0), y.stride(0), out.stride(0), diag_offset, _bucket(m), _bucket(n),
        HAS_SCALE=scale is not None, HAS_LX=lse_x is not None, HAS_LY=lse_y is not None,
        HAS_GROUPS=gx is not None, DP=dp, DC=dc, NCHUNK=nchunk, PRECISION=_precision(x), UPCAST=_upcast(x),
    )
    return out
