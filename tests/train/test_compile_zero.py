"""model.compile composes with activation checkpointing and DeepSpeed ZeRO-2/3: 2 CPU ranks train a CMR,
a VMLM and an MRFR step, compiled and eager, to the same losses and weights (tests/train/compile_worker.py).
Under ZeRO-3 each compiled layer is split where DeepSpeed's parameter hooks run (they are
torch.compiler.disable'd), which must change nothing but speed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("compile_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
# attention key biases have a true gradient of 0 (softmax is shift-invariant): Adam turns their rounding
# noise into full-size steps of either sign (tests/train/test_train_distributed.py says more)
ZERO_GRAD = re.compile(r"\.attention\.self\.key\.bias$")

pytestmark = [pytest.mark.torchrun, pytest.mark.slow]


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_trains_like_eager_under_zero(tmp_path, tiny_text_encoder, stage):
    out = tmp_path / f"zero{stage}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), str(out),
                           tiny_text_encoder, str(stage)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = torch.load(out)
    eager, compiled = res[False], res[True]
    assert len(eager["losses"]) == 3 and all(x == x for x in eager["losses"])
    assert eager["frames"].get("ok", 0) == 0 and compiled["frames"]["ok"] > 0, (eager["frames"], compiled["frames"])
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5), (compiled["losses"], eager["losses"])
    assert compiled["weights"].keys() == eager["weights"].keys()
    moved = 0
    for name, w in eager["weights"].items():
        if ZERO_GRAD.search(name):
            continue
        torch.testing.assert_close(compiled["weights"][name], w, rtol=1e-5, atol=2e-6, msg=name)
        moved += 1
    assert moved > 40
    print(f"zero{stage}: dynamo frames {compiled['frames']}, graph breaks {compiled['graph_breaks']}")
