"""Pretraining on a mix of training sets, each with its own task ratios (the original's MetaLoader; issue 15
section 3): the (set, task) draw of each step, and a real 2-rank run that trains each step on the drawn set,
the same on every rank, and resumes exactly (tests/train/mix_worker.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldot.train.mixing import MixSampler

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
COCO_SBU, VG_CC = {"cmr": 16, "vmlm": 8, "mrfr": 4, "mrckl": 4}, {"cmr": 16, "vmlm": 12, "mrfr": 6, "mrckl": 6}


def test_sets_and_tasks_are_drawn_by_their_ratios_from_seed_and_step():
    s = MixSampler([COCO_SBU, VG_CC], seed=1)
    draws = [s.draw(i) for i in range(20000)]
    assert draws == [MixSampler([COCO_SBU, VG_CC], seed=1).draw(i) for i in range(20000)]
    assert draws != [MixSampler([COCO_SBU, VG_CC], seed=2).draw(i) for i in range(20000)]
    share = lambda pred: sum(map(pred, draws)) / len(draws)  # noqa: E731
    assert share(lambda d: d[0] == 0) == pytest.approx(32 / 72, abs=0.01)  # COCO : VG = 32 : 40
    assert share(lambda d: d == (1, "vmlm")) == pytest.approx(12 / 72, abs=0.01)
    assert share(lambda d: d == (0, "mrckl")) == pytest.approx(4 / 72, abs=0.01)
    assert all(s.task_for(i) == draws[i][1] for i in range(100))
    assert {d[1] for d in (MixSampler([{"cmr": 1, "vmlm": 0}, {"mrfr": 1}], 0).draw(i) for i in range(300))} == {
        "cmr", "mrfr"}


@pytest.mark.torchrun
def test_a_two_rank_mix_trains_the_drawn_set_and_resumes_exactly(tmp_path, tiny_text_encoder, tiny_shards):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "out.pt"
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(Path(__file__).with_name(
        "mix_worker.py")), str(out), tiny_text_encoder, str(tiny_shards / "train"), str(tiny_shards / "test")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = torch.load(out, weights_only=False)
    straight, resumed = result["straight"], result["resumed"]
    sampler = MixSampler([{"cmr": 2, "vmlm": 1, "mrfr": 1}, {"cmr": 1, "mrfr": 2}], seed=0)
    for rank in straight:
        assert rank["draws"] == straight[0]["draws"]  # every rank trains the same set and task
        before = [0, 0]
        for step in range(1, 7):
            (which, task), trained = rank["draws"][step]
            assert (which, task) == sampler.draw(step) and trained == task
            after = rank["counts"][step]
            assert after[which] == before[which] + 1 and after[1 - which] == before[1 - which], (step, before, after)
            before = after
    assert {rank["draws"][s][0][0] for s in range(1, 7) for rank in straight} == {0, 1}  # both sets trained
    for rank_straight, rank_resumed in zip(straight, resumed):
        assert rank_resumed["start_step"] == 3 and sorted(rank_resumed["losses"]) == [4, 5, 6]
        for step in (4, 5, 6):
            assert rank_resumed["draws"][step] == rank_straight["draws"][step]
            assert rank_resumed["counts"][step] == rank_straight["counts"][step]
            assert rank_resumed["losses"][step] == pytest.approx(rank_straight["losses"][step], rel=1e-6)
