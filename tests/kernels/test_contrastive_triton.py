"""Tests of kernels/contrastive_triton.py against float64: compiled on CUDA, else Triton's CPU interpreter."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from ldot.kernels import contrastive_loss
from ldot.kernels.contrastive import one_way_loss_sum
from kernel_helpers import fast_with_grads, features, groups, reference_with_grads, rel_err

triton = pytest.importorskip("triton", reason="triton is not installed")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# The interpreter only works when TRITON_INTERPRET=1 was set before triton was first imported
# (triton's own library functions are decorated then); otherwise a subprocess runs this file.
INTERPRETED = not ON_GPU and type(triton.language.max).__name__ == "InterpretedFunction"
IN_PROCESS = ON_GPU or INTERPRETED

# (loss, gradients) relative tolerances. The reference sees the same rounded inputs, so what is
# left is accumulation order, G rounded to the operand dtype, the gradients' own rounding, and on
# GPU fp32 operands go through three TF32 passes at torch's default matmul precision.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1e-4, 2e-2),
    torch.float16: (1e-4, 3e-3),
}


# The backwards (kernels/contrastive_triton.py's docstring): the row-block kernel with d split in
# 256-wide chunks, G slabs + GEMM, and the one-program-per-tile kernel with fp32 atomics.
BACKWARDS = ("split", "slab", "tile")
# (n, d, groups, slab rows): small d (one K step for split and slab), d = 768 (K loop; three chunks
# for split, 48 column chunks for tile), n never a multiple of the 16-wide interpreter tiles; a slab
# size that leaves a short last slab, or one slab for all rows.
SHAPES = [(37, 40, True, 10), (29, 24, False, None), (21, 768, True, 8)]
ONE_WAY_D = (40, 768)
# Cases per test below, asserted by test_interpreter_in_subprocess.
BACKWARD_CASES = {
    "test_backward_matches_reference": len(BACKWARDS) * 3 * len(SHAPES),
    "test_backward_one_way_hard_columns": len(BACKWARDS) * 2 * len(ONE_WAY_D),
    "test_backward_one_side_only": len(BACKWARDS),
    "test_backward_deterministic": 2,
}


def _summary(stdout: str) -> dict[str, int]:
    """pytest's closing line ("== 17 passed, 1 skipped in 2.1s ==") as {outcome: count}."""
    line = re.findall(r"^=+ (.+) in [\d.]+s\b.*$", stdout, re.MULTILINE)[-1]
    return {word: int(n) for n, word in re.findall(r"\b(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b", line)}


def test_interpreter_in_subprocess(tmp_path):
    """On a CPU machine whose triton was imported without TRITON_INTERPRET, run this file under it.

    Every case must run and pass there: a kernel that cannot run fails this test, never skips it.
    The subprocess starts outside the repository, so only the installed ldot package is importable."""
    if IN_PROCESS:
        pytest.skip("kernels already run in this process (CUDA or TRITON_INTERPRET=1)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", __file__],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    collected = re.search(r"\bcollected (\d+) items?\b", out)
    assert collected, out[-3000:]
    # Everything but this test, which skips itself when the kernels run in process.
    assert _summary(proc.stdout) == {"passed": int(collected[1]) - 1, "skipped": 1}, out[-3000:]
    assert "kernels already run in this process" in out, out[-3000:]
    # The backward variants ran, every one of their cases (a parametrization that lost cases fails here).
    for name, count in BACKWARD_CASES.items():
        ran = re.findall(rf"::{name}\[\S*\] PASSED", proc.stdout)
        assert len(ran) == count, (name, len(ran), count)


@pytest.fixture(scope="module")
def triton_module():
    """The kernels module, where its kernels run in this process (CUDA or TRITON_INTERPRET=1).

    No exception is turned into a skip: with triton importable and a way to run it, a kernel that
    cannot run is a failure of every test here."""
    if not IN_PROCESS:
        pytest.skip("runs in a TRITON_INTERPRET=1 subprocess (test_interpreter_in_subprocess)")
    return importlib.import_module("ldot.kernels.contrastive_triton")


def _check(got, ref, dtype, n):
    loss_tol, grad_tol = TOL[dtype]
    assert abs(float(got[0]) - float(ref[0])) <= loss_tol * max(1.0, abs(float(ref[0])))
    for name, a, b in zip(("text", "image", "scale"), got[1:], ref[1:]):
        if b is None:
            assert a is None, name
        elif n == 1:
            assert a.abs().max() < 1e-4, name  # one pair: zero up to the lse round trip
        else:
            assert rel_err(a, b) < grad_tol, (name, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 5), (7, 16), (33, 40)])
def test_triton_matches_reference(triton_module, dtype, n, d):
    t, i = features(n, d, dtype=dtype, seed=n + d, device=DEVICE)
    scale = torch.tensor(9.0, device=DEVICE)
    g = groups(n, seed=d).to(DEVICE)
    ref = reference_with_grads(t, i, scale, g)
    got = fast_with_grads(contrastive_loss, t, i, scale, impl="triton", group_ids=g)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    _check(got, ref, dtype, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_without_scale_or_groups(triton_module, dtype):
    t, i = features(33, 16, dtype=dtype, seed=11, device=DEVICE)
    _check(fast_with_grads(contrastive_loss, t, i, None, impl="triton"), reference_with_grads(t, i), dtype, 33)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_k_loop_and_split_d(monkeypatch, triton_module, dtype):
    """Large d takes a K loop and splits the gradient's columns over programs; force that path here."""
    monkeypatch.setattr(triton_module, "SINGLE_K_MAX", 0)
    monkeypatch.setattr(triton_module, "D_CHUNK", 16)
    monkeypatch.setattr(triton_module, "BACKWARD", "split")  # "auto" takes "slab" past SINGLE_K_MAX
    t, i = features(33, 40, dtype=dtype, seed=3, device=DEVICE)
    scale = torch.tensor(5.0, device=DEVICE)
    g = groups(33, seed=4).to(DEVICE)
    _check(fast_with_grads(contrastive_loss, t, i, scale, impl="triton", group_ids=g),
           reference_with_grads(t, i, scale, g), dtype, 33)


@pytest.mark.parametrize("variant", [{"ALL_CHUNKS": True}, {"ALL_CHUNKS": False, "PREFETCH_Y": True}], ids=str)
def test_triton_large_d_variants(monkeypatch, triton_module, variant):
    """Large-d variants: every column chunk (three here) in one program; the chunk's load hoisted."""
    monkeypatch.setattr(triton_module, "SINGLE_K_MAX", 0)
    monkeypatch.setattr(triton_module, "D_CHUNK", 16)
    monkeypatch.setattr(triton_module, "BACKWARD", "split")
    tile = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32} if ON_GPU else {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    config = triton.Config({**tile, **variant}, num_warps=8 if ON_GPU else 4, num_stages=2)
    monkeypatch.setattr(triton_module._row_grad_kernel, "configs", [config])  # one config: used untuned
    t, i = features(33, 40, seed=13, device=DEVICE)
    scale = torch.tensor(5.0, device=DEVICE)
    _check(fast_with_grads(contrastive_loss, t, i, scale, impl="triton"), reference_with_grads(t, i, scale),
           torch.float32, 33)


def test_triton_one_way_with_offset_matches_chunked(triton_module):
    """The cross-rank building block: this rank's 9 rows against a global batch of 20, positives at 6."""
    a_all, b_all = features(20, 16, seed=21, device=DEVICE)
    g = groups(20, seed=5).to(DEVICE)
    results = {}
    for impl in ("chunked", "triton"):
        a = a_all[6:15].clone().requires_grad_(True)
        b = b_all.clone().requires_grad_(True)
        s = torch.tensor(4.0, device=DEVICE, requires_grad=True)
        loss = one_way_loss_sum(a, b, s, offset=6, ga=g[6:15], gb=g, impl=impl)
        loss.backward()
        results[impl] = (loss.detach(), a.grad, b.grad, s.grad)
    tol = 2e-5
    for x, y in zip(results["triton"], results["chunked"]):
        assert rel_err(x, y) < tol


def test_triton_rejects_cpu_tensors_when_not_interpreting(monkeypatch):
    from ldot.kernels import KernelError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t, i = features(3, 5)
    with pytest.raises(KernelError):
        contrastive_loss(t, i, impl="triton")


def test_triton_plain_tf32_when_torch_allows_it(triton_module):
    """With torch's matmul precision at "high", fp32 operands take one TF32 pass (looser, still close)."""
    t, i = features(33, 40, seed=17, device=DEVICE)
    scale = torch.tensor(9.0, device=DEVICE)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = fast_with_grads(contrastive_loss, t, i, scale, impl="triton")
    finally:
        torch.set_float32_matmul_precision(before)
    ref = reference_with_grads(t, i, scale)
    assert abs(float(got[0]) - float(ref[0])) < 2e-3 * abs(float(ref[0]))
    for a, b in zip(got[1:], ref[1:]):
        assert rel_err(a, b) < 1e-2


@pytest.fixture
def backward(request, monkeypatch, triton_module):
    """Selects the backward named by the test's parameter; slabs of ``slab_rows`` rows when a test gives them."""
    name, slab_rows = request.param if isinstance(request.param, tuple) else (request.param, None)
    monkeypatch.setattr(triton_module, "BACKWARD", name)
    if slab_rows is not None:
        monkeypatch.setattr(triton_module, "SLAB_MIN_ROWS", slab_rows)
        monkeypatch.setattr(triton_module, "SLAB_ELEMS", 1)
    return name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d,with_groups,backward",
                         [(n, d, grp, (b, rows)) for n, d, grp, rows in SHAPES for b in BACKWARDS],
                         indirect=["backward"], ids=lambda v: str(v[0]) if isinstance(v, tuple) else str(v))
def test_backward_matches_reference(backward, dtype, n, d, with_groups):
    """Each backward: loss and the gradients of text, image and scale against float64."""
    t, i = features(n, d, dtype=dtype, seed=n + d, device=DEVICE)
    scale = torch.tensor(7.0, device=DEVICE)
    g = groups(n, seed=d).to(DEVICE) if with_groups else None
    got = fast_with_grads(contrastive_loss, t, i, scale, impl="triton", group_ids=g)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    _check(got, reference_with_grads(t, i, scale, g), dtype, n)


def _one_way_reference(a, b, scale, offset, ga, gb):
    """Float64 ``Σ_i [lse_j S_ij - S_{i, i+offset}]`` over the allowed columns, and its gradients (a, b, scale)."""
    a, b, s = (x.detach().double().cpu().requires_grad_(True) for x in (a, b, scale))
    logits = s * a @ b.T
    rows = torch.arange(a.shape[0])[:, None]
    cols = torch.arange(b.shape[0])[None, :]
    excluded = (ga.cpu()[:, None] == gb.cpu()[None, :]) & (cols != rows + offset)
    logits = logits.masked_fill(excluded, float("-inf"))
    loss = (torch.logsumexp(logits, 1) - logits[rows[:, 0], rows[:, 0] + offset]).sum()
    loss.backward()
    return loss.detach(), a.grad, b.grad, s.grad


@pytest.mark.parametrize("d", ONE_WAY_D)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backward", [(b, 8) for b in BACKWARDS], indirect=True, ids=lambda v: v[0])
def test_backward_one_way_hard_columns(backward, dtype, d):
    """The cross-rank block with hard negatives (kernels/distributed.py): 11 rows of one rank against the
    global batch's 23 pairs and K = 2 mined columns per pair (69 columns), positives at offset 9; mined
    columns share groups with rows (duplicates of positives, excluded from those rows)."""
    m, pairs, k, off = 11, 23, 2, 9
    gen = torch.Generator().manual_seed(d)
    t_all, i_all = features(pairs, d, dtype=dtype, seed=d + 1)
    hard = features(pairs * k, d, dtype=dtype, seed=d + 2)[1]
    b_all = torch.cat([i_all, hard]).to(DEVICE)
    g_pairs = torch.arange(pairs) // 2 * 5
    gb = torch.cat([g_pairs, g_pairs[torch.randint(0, pairs, (pairs * k,), generator=gen)]]).to(DEVICE)
    a_all = t_all[off:off + m].to(DEVICE)
    ga = gb[off:off + m]
    got = []
    for leaf in (a_all, b_all, torch.tensor(6.0, device=DEVICE)):
        got.append(leaf.detach().clone().requires_grad_(True))
    a, b, s = got
    loss = one_way_loss_sum(a, b, s, offset=off, ga=ga, gb=gb, impl="triton")
    loss.backward()
    ref = _one_way_reference(a_all, b_all, torch.tensor(6.0), off, ga, gb)
    loss_tol, grad_tol = TOL[dtype]
    assert abs(float(loss.detach()) - float(ref[0])) <= loss_tol * abs(float(ref[0]))
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    for name, x, r in zip(("a", "b", "scale"), (a.grad, b.grad, s.grad), ref[1:]):
        assert rel_err(x, r) < grad_tol, (name, rel_err(x, r))


@pytest.mark.parametrize("backward", BACKWARDS, indirect=True)
def test_backward_one_side_only(backward):
    """Only text needs a gradient (frozen image tower): one side computed, the other None."""
    t, i = features(33, 40, seed=5, device=DEVICE)
    scale = torch.tensor(5.0, device=DEVICE)
    g = groups(33, seed=6).to(DEVICE)
    tt = t.clone().requires_grad_(True)
    contrastive_loss(tt, i, scale, impl="triton", group_ids=g).backward()
    ref = reference_with_grads(t, i, scale, g)
    assert rel_err(tt.grad, ref[1]) < TOL[torch.float32][1]


@pytest.mark.parametrize("backward", ["split", "slab"], indirect=True)
def test_backward_deterministic(backward):
    """The deterministic backwards give the same bits twice (on a GPU too, where "tile" would not)."""
    t, i = features(45, 40, dtype=torch.bfloat16, seed=8, device=DEVICE)
    scale = torch.tensor(5.0, device=DEVICE)
    g = groups(45, seed=9).to(DEVICE)
    first = fast_with_grads(contrastive_loss, t, i, scale, impl="triton", group_ids=g)
    second = fast_with_grads(contrastive_loss, t, i, scale, impl="triton", group_ids=g)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_backward_unknown_name_is_refused(monkeypatch, triton_module):
    from ldot.kernels import KernelError

    monkeypatch.setattr(triton_module, "BACKWARD", "fused")
    t, i = features(5, 8, device=DEVICE)
    with pytest.raises(KernelError, match="LDOT_LOSS_BACKWARD"):
        fast_with_grads(contrastive_loss, t, i, None, impl="triton")


def test_auto_backward_is_the_measured_winner(monkeypatch, triton_module):
    """"auto": split while d is loaded whole (d <= 256), slab above (the H100 figures in benchmarks/RESULTS.md)."""
    monkeypatch.setattr(triton_module, "BACKWARD", "auto")
    assert [triton_module.backward_method(d) for d in (40, 256, 257, 768)] == ["split", "split", "slab", "slab"]
