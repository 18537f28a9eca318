"""Worker for tests/train/test_pretrain_mixing.py, launched with torchrun: pretraining on a mix of two training sets
through the trainer (ldot.train.trainer.Trainer), 6 steps straight with a checkpoint at step 3, then resumed
from it.

  mix_worker.py OUT TEXT_ENCODER SET_A SET_B

OUT (rank 0) is a torch file: per run, each step's loss, (set, task) as every rank drew it, and how many
batches each set's loader had delivered after the step on every rank.
"""
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def run(out_dir, text_encoder, a, b, resume=None):
    from ldot.train.config import load_config
    from ldot.train.trainer import Trainer

    mix = f"[{{path: {a}, cmr: 2, vmlm: 1, mrfr: 1, mrckl: 0}}, {{path: {b}, cmr: 1, vmlm: 0, mrfr: 2, mrckl: 0}}]"
    cfg = load_config(ROOT / "train" / "configs" / "demo.yaml", [
        f"output_dir={out_dir}", f"data.train={mix}", "task=pretrain", f"model.text_encoder={text_encoder}",
        "model.image_layers=1", "data.batch_size=4", "optim.max_steps=6", "checkpoint.every_steps=3",
        "checkpoint.keep_last=3", "tracking.system_metrics_every_s=0", f"tracking.experiment={Path(out_dir).name}"])
    t = Trainer(cfg, resume=resume)
    losses, draws, counts = {}, {}, {}
    record = t.metrics.record

    def rec(step, task, stats, engine, scale):
        losses[step], draws[step] = float(stats.loss), (t.tasks.draw(step), task)
        counts[step] = [loader._batches for loader in t.loader.loaders]
        return record(step, task, stats, engine, scale)

    t.metrics.record = rec
    assert t.train()[0] == "finished"
    mine = {"losses": losses, "draws": draws, "counts": counts, "start_step": t.start_step}
    every = [None] * t.dist.world_size
    torch.distributed.all_gather_object(every, mine)
    t = None  # the Trainer freed before the next run builds its own (rec above closes over t)
    gc.collect()
    torch.distributed.barrier()
    return every


def main():
    out, text_encoder, a, b = sys.argv[1:]
    base = Path(out).parent / "run"
    result = {"straight": run(base, text_encoder, a, b)}
    result["resumed"] = run(base, text_encoder, a, b, resume="step-00000003")
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
