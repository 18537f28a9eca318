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
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", __file__],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    collected = re.search(r"\bcollected (\d+) items?\b", out)
    assert collected, out[-3000:]
    # Everything but this test, which skips itself when the kernels run in process.
    assert _summary(proc.stdout) == {"passed": int(collected[1]) - 1, "skipped": 1}, out[-3000:]
    assert "kernels already run in this process" in out, out[-3000:]


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
