"""Resume on a different number of ranks (issue 16): 2 ranks -> 1 and 1 -> 2, under ZeRO-1, -2 and -3, through
the trainer (`--resume auto` on a copy of an uninterrupted run's step-4 checkpoint), against that run.

The global batch stays 8 pairs (2 ranks x data.batch_size=4, 1 rank x 8). What is exact: the weights and
Adam's moments and step as loaded (the universal form of the engine right after the load equals the one it
was loaded from, bit for bit), every global batch of the resumed steps (the same images, also across the
epoch boundary at step 8), the step count and the lr schedule. What is not: the losses and gradients after
the change sum the same numbers in another order (1 rank's matmul vs 2 ranks' all-reduce), so they agree
to float tolerance, as 2 ranks and 1 rank do in tests/train/test_train_distributed.py. Dropout is off:
the old ranks' RNG streams cannot be carried over to another number of ranks (each new rank's generators
are seeded from (seed, step, rank)), so with dropout on the masks after the change are new ones.

Three torchrun launches in all (2 ranks: references + checkpoints; 1 rank: references + 2 -> 1; 2 ranks:
1 -> 2), each running several trainer jobs; and one `ldot train` that must refuse, in one line, a resume
that would change the global batch."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("resize_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
STAGES = (1, 2, 3)
STEPS, CUT = 10, 4  # 64 images / 8 a step: epoch 1 begins at step 9
LOSS_TOL = 1e-5  # relative; see tests/train/test_train_distributed.py for what 2 vs 1 rank agree to
ZERO_GRAD = re.compile(r"\.attention\.self\.key\.bias$")  # true gradient 0: Adam amplifies rounding (ibid.)

pytestmark = pytest.mark.torchrun


def launch(nproc, out, text_encoder, train_dir, jobs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(WORKER), str(out),
                           text_encoder, str(train_dir), *jobs], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out, weights_only=False), proc.stderr


def job(name, stage, batch, resume="none"):
    return (f"{name}:{resume}:data.batch_size={batch},optim.max_steps={STEPS},checkpoint.every_steps={CUT},"
            f"checkpoint.keep_last=5,engine.deepspeed_config=deepspeed_configs/zero{stage}.json")


def seed_from(src: Path, dst: Path):
    """dst starts as a requeued job would find it: the source run's step-4 checkpoint and nothing else."""
    tag = f"step-{CUT:08d}"
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)


def trace(out: Path, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    return {m.step: m.value for m in MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], key)}


def weights(export: Path) -> dict[str, torch.Tensor]:
    from ldot.model import load_dual_encoder

    _, model, _ = load_dual_encoder(export)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_on_another_world_size_continues_the_run(tmp_path, tiny_shards, tiny_text_encoder):
    data = tiny_shards / "train"
    two, _ = launch(2, tmp_path / "two.pt", tiny_text_encoder, data, [job(f"two-z{s}", s, 4) for s in STAGES])
    for s in STAGES:
        seed_from(tmp_path / f"two-z{s}", tmp_path / f"to1-z{s}")
    one, _ = launch(1, tmp_path / "one.pt", tiny_text_encoder, data,
                    [job(f"one-z{s}", s, 8) for s in STAGES] + [job(f"to1-z{s}", s, 8, "auto") for s in STAGES])
    # `ldot train` itself, on 1 rank, with data.batch_size left at the 2 ranks' 4: one line, exit 2
    seed_from(tmp_path / "two-z2", tmp_path / "bad")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    bad = subprocess.run([sys.executable, "-m", "ldot.train", "--config", "train/configs/demo.yaml", "--resume", "auto",
                          f"output_dir={tmp_path / 'bad'}", f"data.train={data}", f"model.text_encoder={tiny_text_encoder}",
                          "model.image_layers=1", "data.batch_size=4", f"optim.max_steps={STEPS}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ") \
        and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert ("the checkpoint's global batch is 8 pairs (2 ranks x data.batch_size=4); 1 ranks x data.batch_size=4 "
            "would change it: set data.batch_size=8 to keep it") in bad.stderr.strip().splitlines()[-1]
    for s in STAGES:
        seed_from(tmp_path / f"one-z{s}", tmp_path / f"to2-z{s}")
    to2, log = launch(2, tmp_path / "to2.pt", tiny_text_encoder, data, [job(f"to2-z{s}", s, 4, "auto") for s in STAGES])
    assert "was written by 1 ranks, this job has 2: resuming through its universal form" in log
    runs = {**two, **one, **to2}

    for s in STAGES:
        for straight, resized in ((f"two-z{s}", f"to1-z{s}"), (f"one-z{s}", f"to2-z{s}")):
            ref, res = runs[straight], runs[resized]
            where = f"zero{s} {straight} -> {resized}"
            assert ref["start_step"] == 0 and res["start_step"] == CUT and res["outcome"] == "finished", where
            assert res["world"] != ref["world"]
            # weights, moments and step as loaded: bit for bit
            assert set(res["universal_diff"]) >= {"fp32", "exp_avg", "exp_avg_sq"}, where
            assert all(v == 0.0 for v in res["universal_diff"].values()), (where, res["universal_diff"])
            # each parameter group keeps its own hyperparameters (ZeRO-3's universal load would give the
            # no-decay group the first group's weight decay)
            assert res["groups"] == ref["groups"] and [g["weight_decay"] for g in ref["groups"]] == [0.01, 0.0], where
            # and Adam counts each step once in every state (ZeRO-3's universal load shares one step tensor
            # between the groups, which AdamW then advances once per group)
            assert res["adam_steps"] == ref["adam_steps"] and len(set(ref["adam_steps"])) == 1, where
            # the data: every global batch after the change is the uninterrupted run's (steps 5-10)
            assert len(ref["batches"]) == STEPS and len(res["batches"]) == STEPS - CUT, where
            assert res["batches"] == ref["batches"][CUT:], where
            assert sorted(sum(ref["batches"][:8], [])) == list(range(64))  # epoch 0: every image once
            # step count and schedule continue; the losses and grad norms to float tolerance
            out_ref, out_res = tmp_path / straight, tmp_path / resized
            lr_ref, lr_res = trace(out_ref, "lr"), trace(out_res, "lr")
            assert [lr_res[k] for k in range(CUT + 1, STEPS + 1)] == [lr_ref[k] for k in range(CUT + 1, STEPS + 1)]
            for key in ("loss/cmr", "grad_norm"):
                want, got = trace(out_ref, key), trace(out_res, key)
                assert sorted(k for k in got if k > CUT) == list(range(CUT + 1, STEPS + 1)), (where, key, got)
                for k in range(CUT + 1, STEPS + 1):
                    assert got[k] == pytest.approx(want[k], rel=LOSS_TOL), (where, key, k, want, got)
            # the exported encoders after 10 steps: the uninterrupted run's, to float tolerance
            w_ref, w_res = weights(out_ref / "checkpoints" / "final"), weights(out_res / "checkpoints" / "final")
            for name, w in w_ref.items():
                if not ZERO_GRAD.search(name):
                    torch.testing.assert_close(w_res[name], w, rtol=1e-5, atol=1e-6, msg=f"{where} {name}")
