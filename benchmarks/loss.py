"""Benchmark: fused contrastive loss vs the materialized one (matmul + cross-entropy both ways).

One command; prints a Markdown table of forward+backward time and peak loss memory for each n and
d, with their ratios, and appends it (device, date, command) to the "## loss" section of
benchmarks/RESULTS.md. On GPU it also reports the fused kernels' TFLOP/s against the bf16 Tensor
Core peak, and with --check compares the fused path with the float64 reference at a realistic size
(n=4097, d=768 on CUDA) in bf16, fp16 and fp32 and exits 1 when any error exceeds CHECK_TOL (or is
NaN); --check-only stops there.

    python benchmarks/loss.py                       # CUDA: n 1k..64k, d 256/768, bf16
    python benchmarks/loss.py --device cpu          # CPU: n 1k 4k 8k, float32
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import functools
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from ldot.kernels import contrastive_loss, contrastive_loss_reference, materialized_contrastive_loss  # noqa: E402

from results import RESULTS, append_run, bf16_peak_tflops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# --check: largest relative error against float64 (loss, gradients), per input dtype. What is left after
# the reference sees the same rounded inputs: accumulation order, G rounded to the operand dtype, the
# gradients' own rounding (tests/kernels/test_contrastive_triton.py's TOL; measured on an H100 at
# n=4097, d=768: bf16 5e-6 / 2.4e-3, fp16 1.3e-5 / 3.8e-4, fp32 1.2e-6 / 9.5e-7).
CHECK_TOL = {"bf16": (1e-4, 1e-2), "fp16": (1e-4, 3e-3), "fp32": (2e-5, 2e-5)}


def _inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(n, d, device=device, generator=gen)
    i = 0.6 * t + 0.8 * torch.randn(n, d, device=device, generator=gen)
    t = torch.nn.functional.normalize(t, dim=1).to(dtype).requires_grad_(True)
    i = torch.nn.functional.normalize(i, dim=1).to(dtype).requires_grad_(True)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return t, i, scale


def _step_fn(which: str, impl: str, t, i, s):
    def step():
        t.grad = i.grad = s.grad = None
        if which == "fused":
            loss = contrastive_loss(t, i, s, impl=impl)
        else:
            loss = materialized_contrastive_loss(t, i, s)
        loss.backward()
        return loss

    return step


def _time_cuda(fn, rep_ms: float) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median"))


def _time_cpu(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _tuned() -> str:
    mod = sys.modules.get("ldot.kernels.contrastive_triton")
    if mod is None:
        return "-"
    out = []
    for name in ("_row_lse_kernel", "_row_grad_kernel"):
        kernel = getattr(mod, name)
        out.append(f"{name[1:-7]}: {getattr(kernel, 'best_config', None)}")
        timings = getattr(kernel, "configs_timings", None) or {}
        ranked = sorted((t[0] if isinstance(t, (list, tuple)) else t, str(c)) for c, t in timings.items())
        out += [f"    {ms:.3f} ms  {cfg}" for ms, cfg in ranked[:6]]
    return "\n".join(out)


def _select_backward(backward: str | None) -> None:
    """The Triton backward to time (kernels/contrastive_triton.py: split, slab, tile; auto picks)."""
    if backward:
        from ldot.kernels import contrastive_triton

        contrastive_triton.BACKWARD = backward


def measure(which: str, impl: str, n: int, d: int, dtype: str, device: str, rep: float, verbose: bool = False,
            backward: str | None = None):
    """(ms per forward+backward, peak bytes above the inputs, loss value) or an error string."""
    if which == "fused" and device == "cuda" and impl != "chunked":
        _select_backward(backward)
    t, i, s = _inputs(n, d, DTYPES[dtype], device)
    step = _step_fn(which, impl, t, i, s)
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            step()  # compile and autotune outside the measurement
            torch.cuda.synchronize()
            t.grad = i.grad = s.grad = None
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = _time_cuda(step, rep)
        else:
            # A fresh process each: the first call's growth of the resident-set peak is its memory.
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            loss = step()
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
            ms = _time_cpu(step, int(rep))
        if verbose and which == "fused" and device == "cuda":
            with torch.no_grad():
                fwd = _time_cuda(functools.partial(contrastive_loss, t, i, s, impl=impl), rep)
            print(f"  n={n} d={d}: fused forward {fwd:.2f} ms, backward {ms - fwd:.2f} ms; tuned: {_tuned()}", flush=True)
        return ms, peak, float(loss.detach())
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        del t, i, s
        if device == "cuda":
            torch.cuda.empty_cache()


def _measure_isolated(*args):
    if args[5] == "cuda":
        return measure(*args)
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def check(device: str, n: int, d: int) -> tuple[list[str], list[str]]:
    """Relative errors of the fused path against float64 at a realistic, odd size: (table rows, failures)."""
    lines, failures = [], []
    for dtype in ("bf16", "fp16", "fp32"):
        t, i, s = _inputs(n, d, DTYPES[dtype], device, seed=7)
        g = torch.randint(0, n // 2, (n,), device=device)
        ref = [x.detach() for x in (t, i, s)]
        ref = [x.double().requires_grad_(True) for x in ref]
        ref_loss = contrastive_loss_reference(*ref, group_ids=g)
        ref_loss.backward()
        loss = contrastive_loss(t, i, s, group_ids=g)
        loss.backward()

        def rel(a, b):
            return float((a.double() - b).norm() / b.norm())

        errs = [abs(float(loss.detach()) - float(ref_loss.detach())) / abs(float(ref_loss.detach()))] + [
            rel(x.grad, r.grad) for x, r in zip((t, i, s), ref)
        ]
        loss_tol, grad_tol = CHECK_TOL[dtype]
        ok = [e <= tol for e, tol in zip(errs, (loss_tol, grad_tol, grad_tol, grad_tol))]  # NaN is never <=
        for name, e, good in zip(("loss", "d text", "d image", "d scale"), errs, ok):
            if not good:
                failures.append(f"{dtype} n={n} d={d}: {name} relative error {e:.1e} > "
                                f"{loss_tol if name == 'loss' else grad_tol:.0e}")
        lines.append(f"| {dtype} | {n} | {d} | " + " | ".join(f"{e:.1e}" for e in errs)
                     + f" | {loss_tol:.0e} / {grad_tol:.0e} | {'ok' if all(ok) else '**FAILED**'} |")
    return lines, failures


def executed_flops(n: int, d: int) -> float:
    """Matrix-unit FLOPs of the Triton path for one forward+backward, as the tuned kernels ran it.

    Useful work is the materialized path's three n²d products (6n²d FLOPs). The fused path
    computes S once per direction in the forward (4n²d) and, per direction in the backward,
    recomputes S and multiplies by G (8n²d in all) — and for d above SINGLE_K_MAX, unless the
    all-chunks variant won the autotuning, recomputes S once per 256-wide output chunk.
    """
    from ldot.kernels import contrastive_triton as kt

    bwd_macs_per_dir = 2 * n * n * d
    # slab and tile compute S once per tile in the backward (tile: once for both directions' products)
    if kt.backward_method(d) == "tile":
        bwd_macs_per_dir = 1.5 * n * n * d
    elif not kt._single_k(d) and kt.backward_method(d) == "split":
        best = getattr(kt._row_grad_kernel, "best_config", None)
        if not (best and best.kwargs.get("ALL_CHUNKS")):
            bwd_macs_per_dir = (-(-d // kt.D_CHUNK) + 1) * n * n * d
    return 2 * (2 * n * n * d + 2 * bwd_macs_per_dir)


def _device_name(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"


def _bf16_peak(device: str) -> tuple[float | None, float | None]:
    """(datasheet peak, measured 8192³ bf16 matmul) in TFLOP/s."""
    if device != "cuda":
        return None, None
    name = torch.cuda.get_device_name(0)
    sheet = bf16_peak_tflops(name)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _time_cuda(lambda: a @ b, 200)
    return sheet, 2 * 8192**3 / ms / 1e9


def _fmt_mem(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if on_gpu else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--n", type=int, nargs="+", help="batch sizes (default: 1k 4k 16k 64k on CUDA, 1k 4k 8k on CPU)")
    ap.add_argument("--d", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--impl", default="auto", choices=["auto", "triton", "chunked"])
    ap.add_argument("--rep", type=float, help="CUDA: ms of timed repeats per case (default 300); CPU: repeats (default 2)")
    ap.add_argument("--backward", nargs="+", default=["auto"], choices=["auto", "split", "slab", "tile"],
                    help="CUDA, Triton: the fused backward(s) to time, one row each (kernels/contrastive_triton.py)")
    ap.add_argument("--check", action="store_true",
                    help="first compare with float64 at n=4097, d=768 (CUDA); exit 1 beyond CHECK_TOL")
    ap.add_argument("--check-only", action="store_true", help="--check, then stop (no timing)")
    ap.add_argument("--verbose", action="store_true", help="CUDA: also print forward/backward split and tuned configs")
    ap.add_argument("--no-append", action="store_true", help=f"print only; do not append to {RESULTS.name}")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to append to")
    args = ap.parse_args(argv)
    device = args.device
    ns = args.n or ([1024, 4096, 16384, 65536] if device == "cuda" else [1024, 4096, 8192])
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    rep = args.rep or (300 if device == "cuda" else 2)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))

    lines, failures = [], []
    if args.check or args.check_only:
        rows, failures = check(device, 4097 if device == "cuda" else 257, 768 if device == "cuda" else 40)
        lines += ["Check against float64 (relative error; loss, d text, d image, d scale; tolerance loss / "
                  "gradients):", "", "| dtype | n | d | loss | text | image | scale | tolerance | |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
        print("\n".join(lines), flush=True)
        for f in failures:
            print(f"CHECK FAILED: {f}", file=sys.stderr, flush=True)
        if args.check_only:
            return 1 if failures else 0

    sheet, measured = _bf16_peak(device)
    gpu_cols = " fused TFLOP/s (useful / executed) | % of bf16 peak (executed) |" if device == "cuda" else ""
    table = [f"| n | d | backward | fused ms | materialized ms | speed-up | fused MiB | materialized MiB | memory ratio |"
             f"{gpu_cols}", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if device == "cuda" else "")]
    for d in args.d:
        for n in ns:
            mat = _measure_isolated("materialized", args.impl, n, d, dtype, device, rep)
            for backward in (args.backward if device == "cuda" else ["auto"]):
                fused = _measure_isolated("fused", args.impl, n, d, dtype, device, rep, args.verbose, backward)
                row = [str(n), str(d), backward]
                ok_f, ok_m = isinstance(fused, tuple), isinstance(mat, tuple)
                row += [f"{fused[0]:.2f}" if ok_f else fused, f"{mat[0]:.2f}" if ok_m else mat]
                row += [f"{mat[0] / fused[0]:.2f}×" if ok_f and ok_m else "–"]
                row += [_fmt_mem(fused[1]) if ok_f else fused, _fmt_mem(mat[1]) if ok_m else mat]
                row += [f"{mat[1] / max(fused[1], 1):.0f}×" if ok_f and ok_m else "–"]
                if device == "cuda":
                    useful = 6 * n * n * d / (fused[0] * 1e9) if ok_f else float("nan")
                    executed = executed_flops(n, d) / (fused[0] * 1e9) if ok_f else float("nan")
                    peak = measured if sheet is None else sheet
                    row += [f"{useful:.0f} / {executed:.0f}", f"{100 * executed / peak:.0f}%" if peak else "–"]
                if ok_f and ok_m and abs(fused[2] - mat[2]) > 2e-2 * abs(mat[2]):
                    row[3] += f" (loss {fused[2]:.4f} vs {mat[2]:.4f}!)"
                table.append("| " + " | ".join(row) + " |")
                print(table[-1] if len(table) > 3 else "\n".join(table), flush=True)

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    impl = args.impl if args.impl != "auto" else ("triton" if device == "cuda" else "chunked")
    head = [f"### {date} · {_device_name(device)}", "", f"`{command}` — fused = `{impl}`, inputs {dtype}, "
            "learnable scale, forward+backward; memory = peak allocated above the inputs"
            + (" (CUDA allocator)" if device == "cuda" else " (growth of the process's peak RSS)") + "."]
    if device == "cuda":
        head.append(f"bf16 peak: datasheet {sheet} TFLOP/s; measured 8192³ matmul {measured:.0f} TFLOP/s.")
    out = "\n".join(head + [""] + lines + table) + "\n"
    print("\n" + out)
    if not args.no_append:
        append_run("loss", out, args.results)
        print(f"appended to {args.results}")
    if failures:
        print(f"CHECK FAILED ({len(failures)}): the kernels do not match float64 within CHECK_TOL", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
