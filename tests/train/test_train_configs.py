"""Configurations the README offers, each trained through the trainer on real shards by 2 ranks under
torchrun (tests/train/trainer_worker.py): the zero0 and zero3-offload DeepSpeed configs, a token budget,
and fp16 with dynamic loss scaling where DeepSpeed has fp16."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("trainer_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.torchrun


def run_worker(nproc, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(WORKER), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]


def losses(out: Path) -> list[float]:
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    history = MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], "loss/cmr")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def exported(path: str) -> dict[str, torch.Tensor]:
    from ldot.model import load_dual_encoder

    _, model, _ = load_dual_encoder(path)
    return model.state_dict()


def test_zero0_zero3_offload_and_a_token_budget_train(tmp_path, tiny_shards, tiny_text_encoder):
    """zero0 (plain data parallel) and zero3-offload (parameters and optimizer state partitioned and on
    the CPU) train the same 8 steps from the same seed: the same losses step by step, the same exported
    weights, and different from where they started. A token budget gives the ranks different batch sizes,
    which the CMR gather takes, and trains to the end."""
    steps = "optim.max_steps=8"
    run_worker(2, "runs", tmp_path / "result.json", tiny_text_encoder, tiny_shards / "train",
               f"zero0:engine.deepspeed_config=deepspeed_configs/zero0.json,{steps}",
               f"zero3-offload:engine.deepspeed_config=deepspeed_configs/zero3-offload.json,{steps}",
               f"budget:data.token_budget=300,{steps}")
    res = json.loads((tmp_path / "result.json").read_text())
    assert {k: (r["outcome"], r["stage"], r["offload_optimizer"], r["offload_param"]) for k, r in res.items()} == {
        "zero0": ("finished", 0, False, False), "zero3-offload": ("finished", 3, True, True),
        "budget": ("finished", 2, False, False)}

    zero0, zero3 = losses(tmp_path / "zero0"), losses(tmp_path / "zero3-offload")
    assert len(zero0) == 8 and all(x == x for x in zero0), zero0
    assert zero3 == pytest.approx(zero0, rel=1e-5), (zero0, zero3)
    w0, w3 = exported(res["zero0"]["path"]), exported(res["zero3-offload"]["path"])
    assert w0.keys() == w3.keys()
    for name, w in w0.items():
        torch.testing.assert_close(w3[name], w, rtol=1e-4, atol=1e-5, msg=name)
    from transformers import BertModel

    start = BertModel.from_pretrained(tiny_text_encoder, add_pooling_layer=False).state_dict()
    moved = [k for k, v in start.items() if not torch.equal(w0[f"text.{k}"], v)]
    assert len(moved) > len(start) / 2, f"the text encoder hardly trained: only {moved} moved"

    sizes = res["budget"]["sizes"]
    assert len(sizes) == 8 and all(len(s) == 2 and min(s) >= 1 for s in sizes), sizes
    assert any(a != b for a, b in sizes), f"the token budget gave every step equal batch sizes: {sizes}"
    budget = losses(tmp_path / "budget")
    assert len(budget) == 8 and all(0 < x < 1e3 for x in budget), budget
    assert (Path(res["budget"]["path"]) / "ldot.json").is_file()


def _fp16_device() -> tuple[int, str]:
    """(ranks to run, why not): DeepSpeed's own answer, asked in a child (the test process stays light)."""
    probe = ("import torch; from deepspeed.accelerator import get_accelerator as g; a = g(); "
             "print(a.device_name(), bool(a.is_fp16_supported()), torch.cuda.device_count())")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, supported, gpus = proc.stdout.split()[-3:]
    if supported != "True":
        return 0, (f"DeepSpeed has no fp16 on this machine's {name}: its accelerator's is_fp16_supported() is false "
                   "(on a CPU, torch.ops.mkldnn._is_mkldnn_fp16_supported(): no AVX512-FP16/AMX-FP16), and "
                   "deepspeed.initialize raises 'Type fp16 is not supported on your device.' (the trainer now "
                   "refuses engine.precision=fp16 there in one line: tests/train/test_engine.py)")
    # NCCL refuses two ranks on one GPU
    return (min(2, int(gpus)) if name == "cuda" else 2), ""


def test_fp16_skips_an_overflowing_step_and_lowers_the_scale(tmp_path, tiny_shards, tiny_text_encoder):
    """engine.precision=fp16 with DeepSpeed's dynamic loss scaling: steps 8 and 9 get features beyond
    fp16's range, so their gradients overflow. Each is skipped (weights untouched) and, with DeepSpeed's
    hysteresis of 2, two overflows in a row lower the scale at least once; later steps train again."""
    nproc, why_not = _fp16_device()
    if not nproc:
        pytest.skip(why_not)
    run_worker(nproc, "fp16", tmp_path / "fp16.json", tiny_text_encoder, tiny_shards / "train")
    res = json.loads((tmp_path / "fp16.json").read_text())
    steps = res["steps"]
    assert res["dtype"] == "torch.float16" and len(steps) == 16
    for i, s in enumerate(steps, start=1):
        assert not (s["skipped"] and s["changed"]), f"step {i} was skipped but changed the weights: {steps}"
        assert s["scale_after"] <= s["scale_before"]  # no growth within DeepSpeed's 1000-step window
    poisoned = [steps[7], steps[8]]
    assert all(s["skipped"] == 1 and not s["changed"] for s in poisoned), steps
    assert poisoned[1]["scale_after"] <= poisoned[0]["scale_before"] / 2, steps
    assert any(not s["skipped"] and s["changed"] for s in steps[9:]), f"no step trained after the overflow: {steps}"
    assert (Path(res["path"]) / "ldot.json").is_file()
