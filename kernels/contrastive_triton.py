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

The backward is selectable (``BACKWARD``, from ``LDOT_LOSS_BACKWARD``; "auto" is "split" for d ≤ 256 and
"slab" above, as ``benchmarks/loss.py --backward split slab tile`` measured on an H100, benchmarks/RESULTS.md):

- "split": ``row_grad`` above, per direction (deterministic).
- "slab": per slab of rows (at least SLAB_MIN_ROWS, at most SLAB_ELEMS entries of G: memory O(n)), one
  kernel writes G in the operand dtype, S computed once per tile, and a cuBLAS GEMM multiplies the slab
  by y with fp32 accumulation (deterministic; 2·n²·d MACs per direction whatever d is).
- "tile": one program per (row block, column block) tile computes S once and adds both ``G @ y`` into
  the rows' and ``G.T @ x`` into the columns' fp32 outputs with atomics: both directions' gradients from
  one recomputation (1.5·n²·d MACs per direction), the sums' order (last bits) varying from run to run.

Exponentials run as ``exp2`` on log2-scaled logits. Offsets are int64; there is no host sync.
"""
from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from .errors import KernelError

log = logging.getLogger(__name__)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Largest padded d loaded whole (one K step, operands reused for both products of the backward).
SINGLE_K_MAX = 256
# Output columns per backward program when d is larger: a [BLOCK_M, D_CHUNK] fp32 accumulator.
D_CHUNK = 256
# The backward (module docstring): "split", "slab", "tile", or "auto" (see backward_method).
BACKWARDS = ("split", "slab", "tile")
BACKWARD = os.environ.get("LDOT_LOSS_BACKWARD", "auto")
# "slab": G entries per slab (256 MiB in bf16), and the fewest rows a slab has whatever n is.
SLAB_ELEMS = 1 << 27
SLAB_MIN_ROWS = 1024
_MM_OUT_DTYPE = True  # cleared if torch.mm(out_dtype=float32) turns out to be missing


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


def _slab_configs():
    # One tile of G per program (the forward's tile shapes, fewer of them: each is compiled per dtype).
    if interpreting():
        return _configs([(16, 16, 16, 4, 1)])
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    if major >= 9:
        return _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)])
    return _configs([(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)])


def _zero_outputs(nargs):
    # The tile backward adds into its outputs, so they are zeroed before every launch (the
    # autotuner's trial launches included): a config pre-hook, which every Triton version runs.
    nargs["dx_ptr"].zero_()
    nargs["dy_ptr"].zero_()


def _pair_config(m, n, k, dd, w, s, group_m=8):
    """A config of the tile backward: S tile BLOCK_M x BLOCK_N over K steps of BLOCK_K, products in BLOCK_D columns."""
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_D": dd, "GROUP_M": group_m},
                         num_warps=w, num_stages=s, pre_hook=_zero_outputs)


def _pair_configs():
    if interpreting():  # GROUP_M 2: the grouped order's last, shorter group is crossed by the tests
        return [_pair_config(16, 16, 16, 16, 4, 1, group_m=2)]
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    if major >= 9:
        shapes = [(128, 128, 64, 64, 8, 3), (128, 128, 64, 128, 8, 2), (128, 64, 64, 64, 8, 3), (64, 128, 64, 64, 4, 3)]
    else:
        shapes = [(128, 128, 32, 64, 8, 2), (64, 64, 32, 64, 4, 3)]
    return [_pair_config(*shape) for shape in shapes]


def _prune_pair(configs, named_args, **kwargs):
    """The tile backward's configs that fit shared memory; one (the smallest tile) for small problems."""
    args = {**named_args, **kwargs}
    if args["M_BUCKET"] * args["N_BUCKET"] < _TUNE_MIN_LOGITS:
        return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -c.num_stages))]
    es = args["a_ptr"].element_size()
    kept = []
    for c in configs:
        bm, bn, bk, bd = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D"))
        if c.num_stages * (bm + bn) * max(bk, bd) * es + bm * bn * es <= _smem_limit():
            kept.append(c)
    return kept or configs[-1:]


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


@triton.jit
def _grad_tile(s, rows, cols, rows_c, cols_c, M, N, lx, lse_y_ptr, g_row, gy_ptr, diag_offset,
               HAS_LX: tl.constexpr, HAS_LY: tl.constexpr, HAS_GROUPS: tl.constexpr, MASK_ROWS: tl.constexpr):
    """The tile of ``G = exp(S - lse_x) + exp(S - lse_y) - c·[positive]`` from log2-scaled ``s`` (fp32), zero
    where excluded; with MASK_ROWS also on rows past M (needed wherever G's columns are summed over rows)."""
    g = tl.zeros_like(s)
    if HAS_LX:
        g += tl.exp2(s - lx[:, None])
    if HAS_LY:
        ly = tl.load(lse_y_ptr + cols_c) * LOG2E
        g += tl.exp2(s - ly[None, :])
    # The positives' -1 per softmax term is applied here, in fp32, before G is rounded to the
    # operand dtype: G - 2 is small where training has converged, so it rounds finely. The
    # mask below then also drops positives that fall past the last column.
    g = tl.where(cols[None, :] == (rows + diag_offset)[:, None], g - (HAS_LX + HAS_LY), g)
    keep = _kept(rows_c, cols, N, g_row, gy_ptr, cols_c, diag_offset, HAS_GROUPS)
    if MASK_ROWS:
        keep = keep & (rows < M)[:, None]
    return tl.where(keep, g, 0.0)


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
        g = _grad_tile(s, rows, cols, rows_c, cols_c, M, N, lx, lse_y_ptr, g_row, gy_ptr, diag_offset,
                       HAS_LX, HAS_LY, HAS_GROUPS, False)
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


@triton.autotune(configs=_slab_configs(), key=["D", "M_BUCKET", "N_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _grad_slab_kernel(a_ptr, y_ptr, scale_ptr, lse_x_ptr, lse_y_ptr, gx_ptr, gy_ptr, g_ptr,
                      M, N, D, stride_x, stride_y, stride_g, diag_offset, M_BUCKET, N_BUCKET,
                      HAS_SCALE: tl.constexpr, HAS_LX: tl.constexpr, HAS_LY: tl.constexpr,
                      HAS_GROUPS: tl.constexpr, EVEN_K: tl.constexpr, DP: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of G (rows of x against columns of y), written in the operand dtype for the GEMM that follows."""
    # Row blocks vary fastest, so the programs in flight share their column block of y (read from
    # HBM once) while the slab's rows of x stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    rows = (pid % num_m).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // num_m).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, M - 1)
    cols_c = tl.minimum(cols, N - 1)
    k2 = LOG2E
    if HAS_SCALE:
        k2 = k2 * tl.load(scale_ptr)
    g_row = rows_c
    if HAS_GROUPS:
        g_row = tl.load(gx_ptr + rows_c)
    lx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_LX:
        lx = tl.load(lse_x_ptr + rows_c) * LOG2E
    if DP > 0:
        x = _load_rows(a_ptr, rows_c, stride_x, D, DP, EVEN_K, UPCAST)
        y = _load_rows(y_ptr, cols_c, stride_y, D, DP, EVEN_K, UPCAST)
        s = tl.dot(x, tl.trans(y), input_precision=PRECISION) * k2
    else:
        s = _logit_tile(a_ptr, y_ptr, rows_c, cols_c, D, stride_x, stride_y,
                        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION, UPCAST) * k2
    g = _grad_tile(s, rows, cols, rows_c, cols_c, M, N, lx, lse_y_ptr, g_row, gy_ptr, diag_offset,
                   HAS_LX, HAS_LY, HAS_GROUPS, False)
    tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.autotune(configs=_pair_configs(), key=["D", "M_BUCKET", "N_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_pair})
@triton.heuristics({"EVEN_K": lambda args: args["D"] % args["BLOCK_K"] == 0,
                    "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _pair_grad_kernel(a_ptr, y_ptr, scale_ptr, lse_x_ptr, lse_y_ptr, gx_ptr, gy_ptr, dx_ptr, dy_ptr,
                      M, N, D, stride_x, stride_y, stride_dx, stride_dy, diag_offset, M_BUCKET, N_BUCKET,
                      HAS_SCALE: tl.constexpr, HAS_LX: tl.constexpr, HAS_LY: tl.constexpr,
                      HAS_GROUPS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr):
    """One tile (BLOCK_M rows of x, BLOCK_N rows of y): S once, then ``dx[rows] += G @ y[cols]`` and
    ``dy[cols] += G.T @ x[rows]`` in BLOCK_D-wide column chunks, added with fp32 atomics."""
    # Grouped order (Triton's matmul tutorial): GROUP_M row blocks walk the column blocks together,
    # so both operands of the programs in flight are L2-resident.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, M - 1)
    cols_c = tl.minimum(cols, N - 1)
    k2 = LOG2E
    if HAS_SCALE:
        k2 = k2 * tl.load(scale_ptr)
    g_row = rows_c
    if HAS_GROUPS:
        g_row = tl.load(gx_ptr + rows_c)
    lx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_LX:
        lx = tl.load(lse_x_ptr + rows_c) * LOG2E
    s = _logit_tile(a_ptr, y_ptr, rows_c, cols_c, D, stride_x, stride_y,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION, UPCAST) * k2
    # Rows past M are zeroed too: G's columns are summed over the tile's rows here.
    g = _grad_tile(s, rows, cols, rows_c, cols_c, M, N, lx, lse_y_ptr, g_row, gy_ptr, diag_offset,
                   HAS_LX, HAS_LY, HAS_GROUPS, True)
    g = g.to(y_ptr.dtype.element_ty)
    if UPCAST:
        g = g.to(tl.float32)
    gt = tl.trans(g)
    row_ok = (rows < M)[:, None]
    col_ok = (cols < N)[:, None]
    for d0 in range(0, D, BLOCK_D):
        dcs = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        if EVEN_D:
            yc = tl.load(y_ptr + cols_c[:, None] * stride_y + dcs[None, :])
            xc = tl.load(a_ptr + rows_c[:, None] * stride_x + dcs[None, :])
        else:
            yc = tl.load(y_ptr + cols_c[:, None] * stride_y + dcs[None, :], mask=dcs[None, :] < D, other=0.0)
            xc = tl.load(a_ptr + rows_c[:, None] * stride_x + dcs[None, :], mask=dcs[None, :] < D, other=0.0)
        if UPCAST:
            yc = yc.to(tl.float32)
            xc = xc.to(tl.float32)
        d_ok = (dcs < D)[None, :]
        tl.atomic_add(dx_ptr + rows[:, None] * stride_dx + dcs[None, :], tl.dot(g, yc, input_precision=PRECISION),
                      mask=row_ok & d_ok, sem="relaxed")
        tl.atomic_add(dy_ptr + cols[:, None] * stride_dy + dcs[None, :], tl.dot(gt, xc, input_precision=PRECISION),
                      mask=col_ok & d_ok, sem="relaxed")


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


def backward_method(d: int) -> str:
    """The backward used for features of width ``d``: ``BACKWARD``, with "auto" resolved (module docstring)."""
    if BACKWARD == "auto":
        # H100, bf16 (benchmarks/RESULTS.md, loss, 2026-11-26): where d is loaded whole, split's one recomputation
        # serves both products and wins (5.9-6.6x the materialized loss at d = 256; slab 3.8-4.0x, tile 4.2-4.6x);
        # above it split recomputes S per 256-wide chunk and slab wins (2.5-2.6x at d = 768; split 0.95-1.03x,
        # tile 1.8-2.0x)
        return "split" if d <= SINGLE_K_MAX else "slab"
    if BACKWARD not in BACKWARDS:
        raise KernelError(f"LDOT_LOSS_BACKWARD / contrastive_triton.BACKWARD must be one of "
                          f"{('auto',) + BACKWARDS}, got {BACKWARD!r}")
    return BACKWARD


def fuses_pairs(d: int) -> bool:
    """Whether both gradients of one loss term come from one launch (:func:`pair_grad`) at width ``d``."""
    return backward_method(d) == "tile"


def row_grad(x, y, scale=None, *, lse_x=None, lse_y=None, gx=None, gy=None, diag_offset: int = 0) -> torch.Tensor:
    """Triton twin of :func:`kernels.contrastive_chunked.row_grad` (float32 ``[len(x), d]``).

    "slab" computes it through G slabs and a GEMM; "split" (and "tile", which only fuses pairs) with
    the row-block kernel."""
    x, y = _check(x, y)
    m, d = x.shape
    n = y.shape[0]
    if m > 0 and backward_method(d) == "slab":
        return _row_grad_slab(x, y, scale, lse_x, lse_y, gx, gy, diag_offset)
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


def _slab_rows(m: int, n: int) -> int:
    # At least SLAB_MIN_ROWS rows (GEMM-shaped), else as many as SLAB_ELEMS entries allow: O(n) memory.
    return max(1, min(m, max(SLAB_MIN_ROWS, SLAB_ELEMS // max(n, 1))))


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` with fp32 accumulation and output; a, b of one dtype (cuBLAS on CUDA)."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:  # follows torch's float32 matmul precision, like the kernels
        torch.mm(a, b, out=out)
        return
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)  # fp16/bf16 in, fp32 out (torch >= 2.8)
            return
        except (RuntimeError, TypeError) as exc:
            _MM_OUT_DTYPE = False
            log.warning("torch.mm(out_dtype=float32) unavailable (%s): slab GEMMs widen G to fp32 first", exc)
    torch.mm(a.float(), b.float(), out=out)  # exact products of 16-bit values, fp32 sums


def _row_grad_slab(x, y, scale, lse_x, lse_y, gx, gy, diag_offset):
    """``row_grad`` as G slabs: per slab of rows, one kernel writes G (S computed once) and a GEMM multiplies it by y."""
    m, d = x.shape
    n = y.shape[0]
    out = torch.empty((m, d), dtype=torch.float32, device=x.device)
    rows = _slab_rows(m, n)
    g = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    dummy = out
    for r0 in range(0, m, rows):
        r = min(rows, m - r0)
        xs = x[r0:r0 + r]
        grid = lambda meta: (triton.cdiv(r, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _grad_slab_kernel[grid](
            xs, y, scale if scale is not None else dummy, lse_x[r0:r0 + r] if lse_x is not None else dummy,
            lse_y if lse_y is not None else dummy, gx[r0:r0 + r] if gx is not None else dummy,
            gy if gy is not None else dummy, g,
            r, n, d, xs.stride(0), y.stride(0), g.stride(0), diag_offset + r0, _bucket(r), _bucket(n),
            HAS_SCALE=scale is not None, HAS_LX=lse_x is not None, HAS_LY=lse_y is not None,
            HAS_GROUPS=gx is not None, DP=_single_k(d), PRECISION=_precision(x), UPCAST=_upcast(x),
        )
        _mm_f32(g[:r], y, out[r0:r0 + r])
    return out


def pair_grad(x, y, scale=None, *, lse_x=None, lse_y=None, gx=None, gy=None, diag_offset: int = 0):
    """``(G @ y, G.T @ x)``, both float32, from one launch ("tile": S once per tile, fp32 atomics).

    G as in :func:`row_grad` (rows of x, columns of y). The atomics make the sums' order, and so the
    last bits of the result, vary from run to run; "split" and "slab" are deterministic."""
    x, y = _check(x, y)
    m, d = x.shape
    n = y.shape[0]
    dx = torch.empty((m, d), dtype=torch.float32, device=x.device)  # zeroed by the config's pre-hook
    dy = torch.empty((n, d), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return dx.zero_(), dy.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _pair_grad_kernel[grid](
        x, y, scale if scale is not None else dx, lse_x if lse_x is not None else dx,
        lse_y if lse_y is not None else dx, gx if gx is not None else dx, gy if gy is not None else dx, dx, dy,
        m, n, d, x.stride(0), y.stride(0), dx.stride(0), dy.stride(0), diag_offset, _bucket(m), _bucket(n),
        HAS_SCALE=scale is not None, HAS_LX=lse_x is not None, HAS_LY=lse_y is not None,
        HAS_GROUPS=gx is not None, PRECISION=_precision(x), UPCAST=_upcast(x),
    )
    return dx, dy
