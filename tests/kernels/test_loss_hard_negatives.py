"""Hard-negative columns in the CMR loss (kernels/distributed.py): 1 process and 2 gloo ranks against a float64
reference written here, row by row, from the definition (issue 15, section 2).

The definition (the original LightningDOT's, from DPR): every caption of the global batch is scored against
every image of the batch plus every pair's K hard images; every image against every caption plus every
pair's K hard captions. A column of the same group (image) as a row's positive, other than the positive
itself, is not a negative of that row (a second caption of the image, or a mined duplicate of it)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldot.kernels import KernelError, global_contrastive_loss
from kernel_helpers import rel_err

D, K = 10, 3


def reference(t, i, ht, hi, s, g, ght, ghi):
    """Float64, one row at a time: lse over the row's allowed columns minus its positive, both directions."""
    n = t.shape[0]
    image_cols = [(i[j], int(g[j]), j) for j in range(n)] + \
                 [(hi[j, m], int(ghi[j, m]), None) for j in range(n) for m in range(K)]
    text_cols = [(t[j], int(g[j]), j) for j in range(n)] + \
                [(ht[j, m], int(ght[j, m]), None) for j in range(n) for m in range(K)]
    total = 0.0
    for rows, cols in ((t, image_cols), (i, text_cols)):
        for r in range(n):
            kept = [s * (rows[r] @ c) for c, grp, j in cols if j == r or grp != int(g[r])]
            total = total + torch.logsumexp(torch.stack(kept), 0) - s * (rows[r] @ cols[r][0])
    return total / (2 * n)


def inputs(n, *, duplicate_positives=False):
    gen = torch.Generator().manual_seed(100 + n)
    t, i = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
    i = 0.6 * t + 0.8 * i
    ht, hi = torch.randn(n, K, D, generator=gen), torch.randn(n, K, D, generator=gen)
    g = torch.arange(n) // 2 * 7          # two captions per image, groups not 0..n-1
    ghi = torch.randint(0, 7 * n, (n, K), generator=gen)
    ght = torch.randint(0, 7 * n, (n, K), generator=gen)
    if duplicate_positives:  # mined columns equal to (a copy of) some row's positive, with its group
        for j in range(n):
            other = (j + 1) % n
            hi[j, 0], ghi[j, 0] = i[other] * 1.5, g[other]
            ht[j, 1], ght[j, 1] = t[other] * 1.5, g[other]
    return t, i, ht, hi, torch.tensor(4.0), g, ght, ghi


def reference_with_grads(t, i, ht, hi, s, g, ght, ghi):
    xs = [x.double().requires_grad_(True) for x in (t, i, ht, hi, s)]
    loss = reference(*xs, g, ght, ghi)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("duplicates", [False, True], ids=["mined", "duplicates-of-positives"])
def test_one_process_equals_the_reference(duplicates):
    t, i, ht, hi, s, g, ght, ghi = inputs(6, duplicate_positives=duplicates)
    xs = [x.clone().requires_grad_(True) for x in (t, i, ht, hi, s)]
    loss = global_contrastive_loss(xs[0], xs[1], xs[4], group_ids=g, impl="chunked", hard_image=xs[3],
                                   hard_text=xs[2], hard_image_groups=ghi, hard_text_groups=ght)
    loss.backward()
    ref, grads = reference_with_grads(t, i, ht, hi, s, g, ght, ghi)
    assert abs(float(loss.detach()) - float(ref)) < 1e-5 * float(ref)
    for x, gref in zip(xs, grads):
        assert rel_err(x.grad, gref) < 1e-5
    if duplicates:  # the duplicates are really out: kept, they would be the hardest negatives of all
        kept = global_contrastive_loss(t, i, s, group_ids=g, impl="chunked", hard_image=hi, hard_text=ht,
                                       hard_image_groups=torch.full_like(ghi, -1),
                                       hard_text_groups=torch.full_like(ght, -1))
        assert float(kept) > float(ref) + 0.1


def test_hard_negatives_make_the_loss_harder_and_need_groups():
    t, i, ht, hi, s, g, ght, ghi = inputs(6)
    plain = global_contrastive_loss(t, i, s, group_ids=g, impl="chunked")
    hard = global_contrastive_loss(t, i, s, group_ids=g, impl="chunked", hard_image=hi, hard_text=ht,
                                   hard_image_groups=ghi, hard_text_groups=ght)
    assert float(hard) > float(plain)
    with pytest.raises(KernelError, match="need group_ids"):
        global_contrastive_loss(t, i, s, impl="chunked", hard_image=hi, hard_text=ht, hard_image_groups=ghi,
                                hard_text_groups=ght)
    with pytest.raises(KernelError, match=r"hard_text must be \[6, K, 10\]"):
        global_contrastive_loss(t, i, s, group_ids=g, impl="chunked", hard_image=hi, hard_text=ht[:, :, :4],
                                hard_image_groups=ghi, hard_text_groups=ght)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, sizes, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        t, i, ht, hi, s, g, ght, ghi = inputs(sum(sizes), duplicate_positives=True)
        lo, hi_ = sum(sizes[:rank]), sum(sizes[: rank + 1])
        xs = [x[lo:hi_].clone().requires_grad_(True) for x in (t, i, ht, hi)]
        scale = s.clone().requires_grad_(True)
        loss = global_contrastive_loss(xs[0], xs[1], scale, group_ids=g[lo:hi_], impl="chunked", sizes=list(sizes),
                                       hard_image=xs[3], hard_text=xs[2], hard_image_groups=ghi[lo:hi_],
                                       hard_text_groups=ght[lo:hi_])
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [x.grad for x in xs], "s": scale.grad},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sizes", [(4, 2), (0, 5)])
def test_two_ranks_equal_the_reference(tmp_path, sizes):
    """Each rank holds its slice of the pairs and of their hard negatives; the loss is the global one on
    both, each rank's rows (pairs and hard negatives) get their exact global gradients, the scale's shares
    sum to its gradient."""
    mp.spawn(_worker, args=(2, _free_port(), list(sizes), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    t, i, ht, hi, s, g, ght, ghi = inputs(sum(sizes), duplicate_positives=True)
    ref, grads = reference_with_grads(t, i, ht, hi, s, g, ght, ghi)
    for r in res:
        assert abs(float(r["loss"]) - float(ref)) < 1e-5 * float(ref)
    for j in range(4):
        assert rel_err(torch.cat([r["grads"][j] for r in res]), grads[j]) < 1e-5, j
    assert abs(float(res[0]["s"] + res[1]["s"]) - float(grads[4])) < 1e-5 * max(1.0, abs(float(grads[4])))
