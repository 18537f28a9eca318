"""Pretraining end to end on CPU: `ldot train task=pretrain` in bf16 with ZeRO-2 CPU optimizer offload
and 2-step gradient accumulation under 2 ranks, on real synth
shards that carry class distributions, so every task (CMR, VMLM, MRFR, MRC-kl) runs through DeepSpeed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.torchrun


def test_bf16_pretraining_runs_every_task(tmp_path, tiny_text_encoder):
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "ldot.data", "synth", "--out", str(data), "--images", "16",
                           "--test-images", "4", "--with-cls"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           "-m", "ldot.train", "--config", "train/configs/demo.yaml", f"output_dir={out}",
                           f"data.train={data / 'train'}", f"model.text_encoder={tiny_text_encoder}",
                           "model.image_layers=1", "data.batch_size=4", "optim.max_steps=12", "engine.precision=bf16",
                           "optim.grad_accum=2", "engine.deepspeed_config=deepspeed_configs/zero2-offload.json", "task=pretrain",
                           "pretrain.cmr=1", "pretrain.vmlm=1", "pretrain.mrfr=1", "pretrain.mrckl=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    seen = {}
    for task in ("cmr", "vmlm", "mrfr", "mrckl"):
        history = client.get_metric_history(info["run_id"], f"loss/{task}")
        seen[task] = len(history)
        assert all(m.value == m.value and abs(m.value) < 1e4 for m in history), (task, history)
    assert sum(seen.values()) == 12 and all(n > 0 for n in seen.values()), seen
    # the exported encoders hold no pretraining heads
    assert (out / "checkpoints" / "final" / "ldot.json").is_file()
    import torch

    heads = torch.load(out / "checkpoints" / "final" / "heads.pt")
    assert not any(k.startswith("pretrain_heads.") for k in heads)
