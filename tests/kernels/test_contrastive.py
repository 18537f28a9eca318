"""Tests of kernels/contrastive.py (chunked path, dispatch, module) and reference.py against float64."""
from __future__ import annotations

import math

import pytest
import torch

from ldot import kernels
from ldot.kernels import ContrastiveLoss, KernelError, contrastive_loss, contrastive_loss_reference
from ldot.kernels import contrastive_chunked
from kernel_helpers import fast_with_grads, features, groups, reference_with_grads, rel_err

SHAPES = [(1, 5), (7, 16), (33, 40)]


def test_reference_matches_a_plain_loop():
    """The truth itself, against the definition written out element by element."""
    t, i = features(5, 3, dtype=torch.float64, seed=3)
    g = torch.tensor([0, 1, 0, 2, 1])
    scale = 2.5
    total = 0.0
    for k in range(5):
        row = [scale * float(t[k] @ i[j]) for j in range(5) if j == k or g[j] != g[k]]
        col = [scale * float(t[j] @ i[k]) for j in range(5) if j == k or g[j] != g[k]]
        pos = scale * float(t[k] @ i[k])
        total += math.log(sum(math.exp(x) for x in row)) - pos
        total += math.log(sum(math.exp(x) for x in col)) - pos
    got = contrastive_loss_reference(t, i, torch.tensor(scale), g)
    assert abs(float(got) - total / 10) < 1e-12


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_groups", [False, True])
@pytest.mark.parametrize("chunk_elems", [16, 1 << 22])  # many one-row chunks, and one chunk
def test_chunked_matches_reference(monkeypatch, n, d, with_scale, with_groups, chunk_elems):
    monkeypatch.setattr(contrastive_chunked, "_CHUNK_ELEMS", chunk_elems)
    t, i = features(n, d, seed=n * 100 + d)
    scale = torch.tensor(7.0) if with_scale else None
    g = groups(n, seed=n) if with_groups else None
    ref = reference_with_grads(t, i, scale, g)
    got = fast_with_grads(contrastive_loss, t, i, scale, impl="chunked", group_ids=g)
    assert got[0].dtype == torch.float32
    assert abs(float(got[0]) - float(ref[0])) <= 1e-5 * max(1.0, abs(float(ref[0])))
    for name, a, b in zip(("text", "image", "scale"), got[1:], ref[1:]):
        if b is None:
            assert a is None
        elif n == 1 and name != "scale":
            assert a.abs().max() < 1e-6  # one pair: zero loss, zero gradient
        else:
            assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_chunked_low_precision_inputs(dtype, tol):
    t, i = features(33, 40, dtype=dtype, seed=5)
    scale = torch.tensor(10.0)
    ref = reference_with_grads(t, i, scale)  # on the same rounded inputs
    got = fast_with_grads(contrastive_loss, t, i, scale, impl="chunked")
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == torch.float32
    assert abs(float(got[0]) - float(ref[0])) < 1e-5 * abs(float(ref[0]))  # float32 arithmetic
    for a, b in zip(got[1:], ref[1:]):
        assert rel_err(a, b) < tol  # gradients rounded to the input dtype


def test_group_mask_changes_the_loss_and_matches_explicit_masking():
    t, i = features(12, 8, seed=9)
    g = torch.arange(12) // 2  # pairs of captions
    masked = contrastive_loss(t, i, 4.0, impl="chunked", group_ids=g)
    plain = contrastive_loss(t, i, 4.0, impl="chunked")
    assert float(plain - masked) > 1e-3  # fewer negatives, lower loss
    # Excluding entries equals pushing their logits to -inf in a materialized loss.
    logits = 4.0 * t.double() @ i.double().T
    same = (g[:, None] == g[None, :]) & ~torch.eye(12, dtype=torch.bool)
    logits[same] = -math.inf
    lab = torch.arange(12)
    explicit = 0.5 * (torch.nn.functional.cross_entropy(logits, lab) + torch.nn.functional.cross_entropy(logits.T, lab))
    assert abs(float(masked) - float(explicit)) < 1e-5


def test_unique_groups_equal_no_groups():
    t, i = features(7, 16, seed=2)
    a = contrastive_loss(t, i, 3.0, impl="chunked", group_ids=torch.arange(7))
    b = contrastive_loss(t, i, 3.0, impl="chunked")
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_auto_is_chunked_on_cpu_and_reference_is_float64():
    t, i = features(7, 5, seed=4)
    auto = contrastive_loss(t, i, 2.0)
    chunked = contrastive_loss(t, i, 2.0, impl="chunked")
    ref = contrastive_loss(t, i, 2.0, impl="reference")
    assert ref.dtype == torch.float64
    assert float(auto) == float(chunked)
    assert abs(float(auto) - float(ref)) < 1e-6


def test_scale_given_as_float_and_as_shaped_tensor():
    t, i = features(7, 5, seed=6)
    s = torch.tensor([3.0], requires_grad=True)
    loss = contrastive_loss(t, i, s, impl="chunked")
    loss.backward()
    assert s.grad.shape == (1,)
    assert abs(float(contrastive_loss(t, i, 3.0, impl="chunked")) - float(loss.detach())) < 1e-6


@pytest.mark.parametrize(
    "bad",
    [
        lambda t, i: (t, i[:, :3]),
        lambda t, i: (t[None], i[None]),
        lambda t, i: (t, i.double()),
        lambda t, i: (t.long(), i.long()),
        lambda t, i: (t[:0], i[:0]),
    ],
)
def test_bad_inputs_raise_kernel_error(bad):
    t, i = features(7, 5)
    with pytest.raises(KernelError):
        contrastive_loss(*bad(t, i), impl="chunked")


def test_bad_options_raise_kernel_error():
    t, i = features(7, 5)
    with pytest.raises(KernelError):
        contrastive_loss(t, i, impl="cuda")
    with pytest.raises(KernelError):
        contrastive_loss(t, i, torch.ones(2), impl="chunked")
    with pytest.raises(KernelError):
        contrastive_loss(t, i, impl="chunked", group_ids=torch.zeros(7, dtype=torch.int32))
    with pytest.raises(KernelError):
        ContrastiveLoss(scale="temperature")


def test_module_learnable_scale_gradient_and_clamp():
    t, i = features(9, 16, seed=8)
    module = ContrastiveLoss(scale="learnable", init_scale=1 / 0.07, impl="chunked")
    assert abs(module.current_scale - 1 / 0.07) < 1e-4
    loss = module(t, i)
    loss.backward()
    # d/d(log s) = s * dL/ds, checked against the reference at the same scale.
    s = torch.tensor(1 / 0.07, dtype=torch.float64)
    _, _, _, ds = reference_with_grads(t, i, s)
    assert abs(float(module.log_scale.grad) - float(ds * s)) < 1e-4 * abs(float(ds * s)) + 1e-7
    with torch.no_grad():
        module.log_scale.fill_(math.log(500.0))
    module.log_scale.grad = None
    assert module.current_scale == pytest.approx(100.0)
    module(t, i).backward()
    assert float(module.log_scale.grad) == 0.0  # clamped: no gradient, as in CLIP


def test_module_fixed_and_none():
    t, i = features(7, 16, seed=1)
    fixed = ContrastiveLoss(scale="fixed", init_scale=5.0, impl="chunked")
    none = ContrastiveLoss(scale="none", impl="chunked")
    assert list(fixed.parameters()) == [] and list(none.parameters()) == []
    assert none.current_scale == 1.0 and fixed.current_scale == 5.0
    g = groups(7)
    assert abs(float(fixed(t, i, g)) - float(contrastive_loss_reference(t, i, 5.0, g))) < 1e-5
    assert abs(float(none(t, i)) - float(contrastive_loss_reference(t, i))) < 1e-5


def test_global_loss_without_process_group_is_the_local_loss():
    t, i = features(7, 16, seed=3)
    assert float(kernels.global_contrastive_loss(t, i, 2.0, impl="chunked")) == float(
        contrastive_loss(t, i, 2.0, impl="chunked")
    )
