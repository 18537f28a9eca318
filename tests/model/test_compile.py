"""Regional torch.compile (model.compile) computes what eager computes: every objective's loss and every
gradient, with and without activation checkpointing. On CPU (inductor's C++ backend, the machine's
compiler) and, where there is one, on CUDA: benchmarks/gpu_session.sh runs this file there.

Dropout is off: compiled dropout draws its masks from inductor's own RNG, not eager's stream. float32,
so the tolerances are rounding (inductor fuses and reorders reductions)."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from ldot.model import PretrainHeads, compile_regions, enable_grad_checkpointing
from ldot.train.objectives import Objectives, mask_generator

from test_attention import B, FEAT, N, VOCAB, padded_batch, tiny_model

pytestmark = pytest.mark.slow  # the first compilation takes a minute on 2 CPU cores

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CLASSES = 5


class _Tok:  # what Objectives reads of a tokenizer
    mask_token_id, all_special_ids = 3, [0, 1, 2, 3]

    def __len__(self):
        return VOCAB


def model_with_heads(layers=2):
    model = tiny_model(layers=layers)
    heads = PretrainHeads(model.text.config, FEAT, CLASSES)
    model.pretrain_heads = heads
    return model


def batch_on(device):
    b = padded_batch()
    b["img_cls"] = torch.softmax(torch.randn(B, N, CLASSES, generator=torch.Generator().manual_seed(3)), -1)
    b["group_ids"] = torch.arange(B)
    return {k: v.to(device) for k, v in b.items()}


def run(model, task, batch, device):
    model.zero_grad(set_to_none=True)
    loss = Objectives(model, _Tok())(task, batch, mask_generator(torch.device(device), 0, 1, 0, 0))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(loss_c, grads_c, loss_e, grads_e, what):
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6, msg=what)
    assert grads_c.keys() == grads_e.keys(), what
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads_e.values()))
    for name, g in grads_e.items():
        # relative to the parameter's own gradient, plus rounding of the global norm: attention key biases
        # get a true gradient of 0 (softmax is shift-invariant), which both compute as ~1e-8 noise
        err = (grads_c[name].double() - g.double()).norm()
        assert err <= 1e-4 * g.double().norm() + 1e-6 * total, (what, name, float(err), float(g.norm()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_compiled_equals_eager(device, grad_checkpointing):
    eager = model_with_heads().to(device)
    compiled = copy.deepcopy(eager)
    if grad_checkpointing:
        enable_grad_checkpointing(eager)
        enable_grad_checkpointing(compiled)
    torch._dynamo.reset()
    counters.clear()
    names = compile_regions(compiled)
    assert names == ["text.encoder.layer.0", "text.encoder.layer.1", "image.encoder.layer.0", "image.encoder.layer.1",
                     "text_proj", "image_proj", "pretrain_heads.mlm", "pretrain_heads.mrfr", "pretrain_heads.mrc"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and exports unchanged
    batch = batch_on(device)
    tasks = ("cmr", "vmlm", "mrfr", "mrckl") if not grad_checkpointing else ("cmr",)
    for task in tasks:
        assert_same(*run(compiled, task, batch, device), *run(eager, task, batch, device), f"{device} {task}")
    assert counters["frames"]["ok"] > 0  # the compiled regions really ran compiled
    if not grad_checkpointing:
        assert not counters["graph_break"], dict(counters["graph_break"])  # each region is one graph
    # a second step (weights changed, same shapes) still agrees, without compiling again
    frames = counters["frames"]["ok"]
    with torch.no_grad():
        for a, b in zip(compiled.parameters(), eager.parameters()):
            a.add_(0.01 * torch.randn_like(a, generator=None))
            b.copy_(a)
    assert_same(*run(compiled, "cmr", batch, device), *run(eager, "cmr", batch, device), f"{device} cmr, step 2")
    assert counters["frames"]["ok"] == frames
