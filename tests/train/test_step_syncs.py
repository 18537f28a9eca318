"""The steady-state training step reads nothing back from the device in the trainer's own code: the
loss, the counters and the preemption flag are read every `tracking.log_every` steps or agreed on the
host (issue: a GPU idles while its host waits on such a read, once per micro-batch).

Counted on CPU with 2 real ranks (tests/train/sync_worker.py). The only reads allowed are of host
tensors by design: ldot/distributed.py's host-side agreement on CPU tensors over a gloo group. Not
seen by this count: syncs inside torch ops, such as VMLM's boolean gather of its masked words (their
number is data-dependent; ldot.train.objectives says why it stays)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sync_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
HOST_SIDE = ("ldot/distributed.py",)

pytestmark = [pytest.mark.slow, pytest.mark.torchrun]


def count_reads(tmp_path, text_encoder, shards, task, *extra):
    out = tmp_path / f"{task}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), str(out), text_encoder,
                           str(shards / "train"), task, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


# Hard negatives: mined at step 1 (not counted) and again only at the next epoch; train/hard_negatives.py reads
# which rows and captions a batch holds from the loader's CPU tensors to attach their negatives: host reads.
HARD = ["hard_negatives.num_hard_negatives=2", "hard_negatives.mine_at_start=true"]


@pytest.mark.parametrize("extra", [[], ["data.token_budget=200"], HARD], ids=["fixed-batch", "token-budget", "hard"])
def test_a_cmr_step_reads_nothing_from_the_device(tmp_path, tiny_text_encoder, tiny_shards, extra):
    result = count_reads(tmp_path, tiny_text_encoder, tiny_shards, "finetune", *extra)
    host_side = HOST_SIDE + (("train/hard_negatives.py",) if extra == HARD else ())
    device_reads = {site: n for site, n in result["sites"].items() if not site.startswith(host_side)}
    assert device_reads == {}, device_reads
    # the preemption flag (and, under a token budget, the batch sizes) are agreed on the host every step
    assert any(site.startswith(HOST_SIDE) for site in result["sites"])


def test_pretraining_tasks_read_only_what_they_must(tmp_path, tiny_text_encoder, tiny_shards):
    for task in ("mrfr", "vmlm"):
        result = count_reads(tmp_path, tiny_text_encoder, tiny_shards, "pretrain", f"pretrain.{task}=1")
        assert set(result["tasks"]) == {task}
        device_reads = {site: n for site, n in result["sites"].items() if not site.startswith(HOST_SIDE)}
        assert device_reads == {}, (task, device_reads)
