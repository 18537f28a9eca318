"""task=rerank under torchrun: 2 ranks train the cross-encoder exactly as 1 rank does on the global batch
(per-step loss, every gradient before clipping, DeepSpeed's global grad norm, the weights), and a rerank
run through the Trainer that stops after a checkpoint and resumes continues exactly as the straight run; bf16 and
amp_bf16 runs track the fp32 one, and a bf16 export scores in bf16 as its float32 copy does."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("rerank_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
# float32 on CPU, summed in another order (all-reduce vs one batch): as tests/train/test_train_distributed.py
LOSS_TOL, NORM_TOL, GRAD_TOL, WEIGHT_TOL = 1e-5, 1e-5, 1e-4, 1e-6
# True gradient zero, computed as rounding noise that Adam would blow up to full-size steps of any sign
# (tests/train/test_train_distributed.py): the attention key biases (softmax over keys is shift-invariant)
# and the ITM head's bias (it shifts every score of a list alike; the listwise softmax ignores that)
ZERO_GRAD = re.compile(r"(\.attention\.self\.key\.bias|^itm\.bias)$")
ZERO_GRAD_TOL = 1e-6  # of the global norm
AMP_COS = 0.9  # Adam's first steps are about lr x sign(gradient): the few gradients near 0 may flip under bf16

pytestmark = pytest.mark.torchrun


def torchrun(nproc, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(WORKER), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """16 images x 3 captions (random 8-d features) and `eval mine`'s files from a random first stage."""
    from ldot.data.loader import load_eval_split
    from ldot.eval.hard_negatives import mine, write_jsonl
    from ldot.eval.recall import topk_from_embeddings

    spec = importlib.util.spec_from_file_location("datafixtures", ROOT / "tests" / "data" / "datafixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    out = tmp_path_factory.mktemp("rerank-dist")
    data = fixtures.write_random_dataset(out / "train", 16, shard_size=4, captions=3)
    split = load_eval_split(data)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((16, 6)).astype(np.float32)
    txt = (img[split.caption_image] + rng.standard_normal((len(split.captions), 6))).astype(np.float32)
    write_jsonl(out / "mined", split, mine(topk_from_embeddings(txt, img, split.caption_image, 6),
                                           split.caption_image, 6))
    return data, out / "mined"


def test_two_ranks_train_the_reranker_as_one_rank_on_the_global_batch(tmp_path, tiny_text_encoder, mined):
    data, mined_dir = mined
    torchrun(2, "equivalence", tmp_path / "two.pt", tiny_text_encoder, data, mined_dir)
    torchrun(1, "equivalence", tmp_path / "one.pt", tiny_text_encoder, data, mined_dir)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert len(one["losses"]) == len(two["grads"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], rel=LOSS_TOL), (two["losses"], one["losses"])
    assert one["losses"][-1] < one["losses"][0] - 0.01  # it trained: step 4 repeats step 1's batch
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=NORM_TOL)
    for step, (g2, g1, norm) in enumerate(zip(two["grads"], one["grads"], one["grad_norms"]), start=1):
        assert g2.keys() == g1.keys()
        for name, g in g1.items():
            if ZERO_GRAD.search(name):
                assert max(g.norm(), g2[name].norm()) <= ZERO_GRAD_TOL * norm, (step, name)
                continue
            assert (g2[name] - g).norm() <= GRAD_TOL * g.norm() + 1e-12, (step, name, (g2[name] - g).norm(), g.norm())
    for name, w in one["weights"].items():
        if not ZERO_GRAD.search(name):
            torch.testing.assert_close(two["weights"][name], w, rtol=WEIGHT_TOL, atol=WEIGHT_TOL, msg=name)


def test_a_rerank_run_resumes_exactly(tmp_path, tiny_text_encoder, mined):
    """Dropout on: steps 4-6 after the restart draw the same pairs, negatives and dropout masks."""
    data, mined_dir = mined
    torchrun(2, "resume", tmp_path / "res.pt", tiny_text_encoder, data, mined_dir)
    res = torch.load(tmp_path / "res.pt")
    assert res["resumed"].pop("best_at_resume") == pytest.approx(res["straight"]["val2"][2], rel=1e-6)
    steps = [*range(1, 7), "val2", "val4", "val6"]
    assert res["start"] == 3 and sorted(res["resumed"], key=str) == sorted(res["straight"], key=str) == sorted(steps, key=str)
    for step in range(1, 7):
        task, loss = res["straight"][step]
        assert task == "rerank" and res["resumed"][step] == (task, pytest.approx(loss, rel=1e-6, abs=1e-6)), step
    # the periodic validation (val/list_loss, val/list_top1, the best loss so far) goes on as it would have
    for step in ("val2", "val4", "val6"):
        assert res["resumed"][step] == pytest.approx(res["straight"][step], rel=1e-6, abs=1e-6), step
    assert res["straight"]["val6"][2] == min(v[0] for k, v in res["straight"].items() if str(k).startswith("val"))
    assert res["best"]
    for name, w in res["w_straight"].items():
        torch.testing.assert_close(res["w_resumed"][name], w, rtol=1e-6, atol=1e-6, msg=name)


def test_bf16_and_amp_bf16_rerank_runs_track_the_fp32_run(tmp_path, tiny_text_encoder, mined):
    """The same run in fp32 is the reference for the losses and updates of a bf16 run (DeepSpeed's bf16: bf16
    weights, float32 master weights in the optimizer) and of an amp_bf16 run (float32 weights, the forward
    under autocast: benchmarks/quality.py trains its re-rankers so); a bf16 export, scored as eval scores it,
    matches its own float32 copy."""
    from ldot.data.loader import load_eval_split
    from ldot.eval.image_store import ImageStore
    from ldot.eval.rerank import CrossEncoderReranker
    from ldot.model import load_cross_encoder

    data, mined_dir = mined
    torchrun(2, "precision", tmp_path / "precision.pt", tiny_text_encoder, data, mined_dir)
    res = torch.load(tmp_path / "precision.pt")
    fp32, bf16, amp = res["fp32"], res["bf16"], res["amp_bf16"]
    assert len(fp32["losses"]) == len(bf16["losses"]) == len(amp["losses"]) == 4
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9); the losses of 4 steps stay within a few of those
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2e-2), (bf16["losses"], fp32["losses"])
    _, m32, _ = load_cross_encoder(fp32["final"])
    tok, m16, _ = load_cross_encoder(bf16["final"])
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    # the updates: what 4 steps changed, against the fp32 run's change (a lost update is 0 here). On the biases:
    # they start at 0, where bf16 resolves a step of 1e-3 finely; a weight near 1 (a LayerNorm's) keeps a bf16
    # copy whose spacing (2^-7) is above 4 such steps, so its update shows in the float32 master weights only
    w32, w16 = m32.state_dict(), m16.state_dict()
    names = [n for n in w32 if n.endswith(".bias") and not ZERO_GRAD.search(n)]
    d32 = torch.cat([(w32[n].float() - fp32["init"][n]).flatten() for n in names])
    d16 = torch.cat([(w16[n].float() - bf16["init"][n]).flatten() for n in names])
    assert d32.norm() > 0
    assert torch.nn.functional.cosine_similarity(d16, d32, dim=0) > 0.95
    assert 0.8 < (d16.norm() / d32.norm()).item() < 1.25
    # amp_bf16: float32 weights, every one updated as fp32 updates it, within bf16 matmuls' rounding; its losses
    # differ from fp32's (the forward did run under autocast) by no more than that rounding
    assert amp["losses"] == pytest.approx(fp32["losses"], rel=1e-2) and amp["losses"] != fp32["losses"]
    _, ma, _ = load_cross_encoder(amp["final"])
    assert {p.dtype for p in ma.parameters()} == {torch.float32}
    wa = ma.state_dict()
    names = [n for n in w32 if not ZERO_GRAD.search(n) and w32[n].dtype.is_floating_point]
    d32 = torch.cat([(w32[n] - fp32["init"][n]).flatten() for n in names])
    da = torch.cat([(wa[n] - amp["init"][n]).flatten() for n in names])
    cos = torch.nn.functional.cosine_similarity(da, d32, dim=0)
    assert cos > AMP_COS, cos
    assert 0.9 < (da.norm() / d32.norm()).item() < 1.1
    # eval scores a bf16 export in bf16: as its float32 copy does, within bf16's rounding
    split = load_eval_split(data)
    store = ImageStore(data, split.keys)
    rows = np.arange(len(split.captions)) % split.num_images
    scores16 = CrossEncoderReranker(m16, tok, store, max_text_len=16).score_pairs(split.captions, rows)
    scores32 = CrossEncoderReranker(m16.float(), tok, store, max_text_len=16).score_pairs(split.captions, rows)
    assert np.abs(scores16 - scores32).max() <= 3e-2 * max(1.0, np.abs(scores32).max())
