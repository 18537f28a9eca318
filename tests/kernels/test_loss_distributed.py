"""Tests of kernels/distributed.py: real gloo processes with unequal local batches vs one process."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldot.kernels import contrastive_loss, global_contrastive_loss
from kernel_helpers import features, rel_err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, sizes, with_groups, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        t_all, i_all, s, g_all = _global_inputs(sizes, with_groups)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        t = t_all[lo:hi].clone().requires_grad_(True)
        i = i_all[lo:hi].clone().requires_grad_(True)
        s = s.clone().requires_grad_(True)
        g = None if g_all is None else g_all[lo:hi]
        loss = global_contrastive_loss(t, i, s, group_ids=g, impl="chunked")
        loss.backward()
        torch.save({"loss": loss.detach(), "t": t.grad, "i": i.grad, "s": s.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _global_inputs(sizes, with_groups):
    n = sum(sizes)
    t, i = features(n, 12, seed=n)
    g = (torch.arange(n) // 2) if with_groups else None  # pairs of captions, split across ranks
    return t, i, torch.tensor(6.0), g


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sizes,with_groups", [((3, 6), True), ((0, 5), False)])
def test_two_gloo_ranks_match_one_process(tmp_path, sizes, with_groups):
    mp.spawn(_worker, args=(2, _free_port(), list(sizes), with_groups, str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    t, i, s, g = _global_inputs(list(sizes), with_groups)
    t, i, s = (x.clone().requires_grad_(True) for x in (t, i, s))
    single = contrastive_loss(t, i, s, impl="chunked", group_ids=g)
    single.backward()

    for r in res:  # the value is the global loss on every rank
        assert abs(float(r["loss"]) - float(single.detach())) < 1e-5
    # Each rank holds the exact gradient of its own rows ...
    assert rel_err(torch.cat([r["t"] for r in res]), t.grad) < 1e-5
    assert rel_err(torch.cat([r["i"] for r in res]), i.grad) < 1e-5
    # ... and a share of the replicated scale's gradient; the shares sum to the whole.
    assert abs(float(res[0]["s"] + res[1]["s"]) - float(s.grad)) < 1e-5 * max(1.0, abs(float(s.grad)))
    if sizes[0] > 0:
        assert abs(float(res[0]["s"]) - float(s.grad)) > 1e-4  # really a share, not a copy
