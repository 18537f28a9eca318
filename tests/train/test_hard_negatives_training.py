"""Fine-tuning with mined hard negatives through the trainer, real ranks under torchrun
(tests/train/hardneg_worker.py): 2 ranks mine the same lists as 1 rank and train the same steps on the same
global batch (data.global_batch_size split 4 + 4 against 8), and a run resumed from a checkpoint taken
between two minings continues with the lists it held, step for step as the uninterrupted run."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("hardneg_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
# Float32 on CPU, two summation orders (tests/train/test_train_distributed.py observed ~5e-7 relative)
TOL = 1e-5

pytestmark = pytest.mark.torchrun


def torchrun(nproc, out, text_encoder, shards, *modes):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(WORKER), str(out),
                           text_encoder, str(shards / "train"), *modes], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


def test_hard_negatives_on_two_ranks_equal_one_and_survive_a_resume(tmp_path, tiny_text_encoder, tiny_shards):
    two = torchrun(2, tmp_path / "two" / "out.pt", tiny_text_encoder, tiny_shards, "equal", "resume")
    one = torchrun(1, tmp_path / "one" / "out.pt", tiny_text_encoder, tiny_shards, "equal")

    # mined on 2 ranks (each encodes and searches a slice) as on 1, at steps 1 and 4
    a, b = two["equal"], one["equal"]
    assert sorted(a["lists"]) == sorted(b["lists"]) == [1, 4]
    for step in (1, 4):
        for x, y in zip(a["lists"][step], b["lists"][step]):
            assert x.shape[1] == 2 and np.array_equal(x, y), step
    assert not np.array_equal(a["lists"][1][0], a["lists"][4][0])  # re-mined with the trained model
    for step in range(1, 5):
        assert a["losses"][step] == pytest.approx(b["losses"][step], rel=TOL), (a["losses"], b["losses"])
        assert a["norms"][step] == pytest.approx(b["norms"][step], rel=TOL), (a["norms"], b["norms"])

    # resumed at step 3 (mined at 1 and 3): the lists of step 3 come back, then steps 4-6 (step 5 mines
    # with the resumed weights) are the uninterrupted run's
    straight, resumed = two["straight"], two["resumed"]
    assert resumed["start_step"] == 3 and sorted(straight["lists"]) == [1, 3, 5] and sorted(resumed["lists"]) == [5]
    mined_at, lists = resumed["initial"]
    assert mined_at == 3 and all(np.array_equal(x, y) for x, y in zip(lists, straight["lists"][3]))
    assert all(np.array_equal(x, y) for x, y in zip(resumed["lists"][5], straight["lists"][5]))
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6), (straight, resumed)
