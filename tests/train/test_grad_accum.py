"""Gradient accumulation trains alike under every ZeRO stage: 2 ranks, 3 micro-batches a step, 3 CMR steps
and (another model) 3 MRFR steps; ZeRO-2 and ZeRO-3 end with ZeRO-1's weights (tests/train/accum_worker.py).

It guards the forward going through the DeepSpeed engine: ZeRO-3 counts micro-batches in the engine's
forward, and when the trainer called the module directly every micro-batch's gradient replaced the
last one's (ZeRO-1/2 were right either way). And the steps make DeepSpeed wait on the device nowhere
(its throughput timer, on by default, would synchronize in every forward and step)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("accum_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
ZERO_GRAD = re.compile(r"\.attention\.self\.key\.bias$")  # true gradient 0: see test_train_distributed.py

pytestmark = pytest.mark.torchrun


def test_every_zero_stage_accumulates_alike(tmp_path, tiny_text_encoder):
    out = tmp_path / "accum.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), str(out),
                           tiny_text_encoder], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = torch.load(out)
    for task in ("cmr", "mrfr"):
        ref = res[task, 1]["weights"]
        moved = [k for k, w in ref.items() if not torch.equal(w, res[task, 1]["initial"][k])]
        assert len(moved) > 0.6 * len(ref), (task, sorted(set(ref) - set(moved)))  # it trained
        for stage in (2, 3):
            w = res[task, stage]["weights"]
            assert w.keys() == ref.keys()
            for name, x in ref.items():
                if not ZERO_GRAD.search(name):
                    torch.testing.assert_close(w[name], x, rtol=1e-5, atol=1e-6, msg=f"{task} zero{stage} {name}")
    assert {key: r["syncs"] for key, r in res.items()} == {key: 0 for key in res}
