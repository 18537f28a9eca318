"""Worker for tests/train/test_train_configs.py, launched with torchrun: whole training jobs through the
trainer (ldot.train.trainer.Trainer, what `ldot train` runs) on real shards, several in one process
group, so that one launch (tens of seconds of start-up on a small machine) covers several configurations.

  trainer_worker.py runs OUT TEXT_ENCODER TRAIN_DIR NAME:key=value,key=value ...
      Each NAME trains to the end in OUT's folder/NAME with demo.yaml plus its overrides. OUT (JSON, rank
      0) holds, per NAME, the outcome, the engine's ZeRO stage and offload settings, and every rank's
      batch size at every step as the trainer's CMR gather got them.
  trainer_worker.py fp16 OUT TEXT_ENCODER TRAIN_DIR
      engine.precision=fp16, 16 steps, of which steps 8 and 9 get region features beyond fp16's range
      (65504): they overflow. OUT holds, per step, the loss scale before and after, whether DeepSpeed
      skipped it, and whether the weights changed.
"""
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
POISONED = (8, 9)


def trainer_for(out, name, text_encoder, train_dir, extra):
    from ldot.train.config import load_config
    from ldot.train.trainer import Trainer

    overrides = [f"output_dir={Path(out).parent / name}", f"data.train={train_dir}", f"model.text_encoder={text_encoder}",
                 "model.image_layers=1", "data.batch_size=4", "tracking.system_metrics_every_s=0",
                 f"tracking.experiment={name}", *extra]
    return Trainer(load_config(ROOT / "train" / "configs" / "demo.yaml", overrides))


def runs(out, text_encoder, train_dir, *specs):
    result = {}
    for spec in specs:
        name, _, extra = spec.partition(":")
        trainer = trainer_for(out, name, text_encoder, train_dir, [e for e in extra.split(",") if e])
        sizes, rank_sizes = [], trainer.rank_sizes

        def recording(local, rank_sizes=rank_sizes, sizes=sizes):
            sizes.append(rank_sizes(local))
            return sizes[-1]

        trainer.rank_sizes = recording
        engine = trainer.engine
        outcome, path = trainer.train()
        result[name] = {"outcome": outcome, "path": str(path), "stage": engine.zero_optimization_stage(),
                        "offload_optimizer": bool(engine.zero_offload_optimizer()),
                        "offload_param": bool(engine.zero_offload_param()), "sizes": sizes}
        # Free this job's engine on every rank at the same point: left to the cycle collector, it was
        # freed at different moments on different ranks, and the next job's first ZeRO-3 all-gather met a
        # collective of the old engine's (a mismatch that killed the process group). One job per
        # process, as `ldot train` runs, never meets this.
        del trainer, engine, rank_sizes, recording
        gc.collect()
        torch.distributed.barrier()
    return result


def fp16(out, text_encoder, train_dir):
    from ldot.train.engine import loss_scale

    trainer = trainer_for(out, "fp16", text_encoder, train_dir,
                          ["engine.precision=fp16", "optim.max_steps=16", "optim.lr=1e-3"])
    engine, batches, steps = trainer.engine, iter(trainer.loader), []
    for step in range(1, 17):
        before = [p.detach().clone() for p in engine.module.parameters()]
        scale, skipped = loss_scale(engine), engine.skipped_steps
        source = batches
        if step in POISONED:  # the trainer casts features to fp16: 1e6 becomes inf
            batch = next(batches)
            source = iter([{**batch, "img_feat": batch["img_feat"] * 1e6}])
        trainer.step(step, source)
        steps.append({"scale_before": scale, "scale_after": loss_scale(engine),
                      "skipped": engine.skipped_steps - skipped,
                      "changed": any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))})
    trainer.metrics.close()
    return {"steps": steps, "dtype": str(next(engine.module.parameters()).dtype), "path": str(trainer.finish())}


def main():
    mode, out, *args = sys.argv[1:]
    result = runs(out, *args) if mode == "runs" else fp16(out, *args)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
