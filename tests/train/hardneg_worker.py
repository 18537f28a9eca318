"""Worker for tests/train/test_hard_negatives_training.py, launched with torchrun: fine-tuning with mined hard
negatives through the trainer (ldot.train.trainer.Trainer, what `ldot train` runs) on real shards.

  hardneg_worker.py OUT TEXT_ENCODER TRAIN_DIR MODE...
    equal    global batch 8 (data.global_batch_size: 8 on 1 rank, 4 + 4 on 2; the batches made here, the
             same global ones on 1 and 2 ranks, with their hard negatives attached), K = 2 hard negatives a
             direction, mined at steps 1 and 4 (sampling top), dropout off, 4 steps: each step's loss and
             grad norm, the lists of each mining
    resume   (dropout on) 6 steps straight with mining at 1, 3, 5 and a checkpoint at 3; then the same
             run resumed from that checkpoint: both runs' losses of steps 4-6 and lists
OUT (rank 0) is a torch file holding, per MODE, what it records.
"""
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def trainer(out_dir, text_encoder, train_dir, extra, resume=None):
    from ldot.train.config import load_config
    from ldot.train.trainer import Trainer

    overrides = [f"output_dir={out_dir}", f"data.train={train_dir}", f"model.text_encoder={text_encoder}",
                 "model.image_layers=1", "data.batch_size=null", "data.global_batch_size=8",
                 "tracking.system_metrics_every_s=0", f"tracking.experiment={Path(out_dir).name}",
                 "hard_negatives.num_hard_negatives=2", "hard_negatives.every_steps=2",
                 "hard_negatives.mine_at_start=true", *extra]
    return Trainer(load_config(ROOT / "train" / "configs" / "demo.yaml", overrides), resume=resume)


def global_batches(t, size=8):
    """Step s's global batch is images 8(s - 1) .. 8s - 1 of a fixed permutation of the split, each with its
    caption s mod 5; this rank takes its slice, as the loader would hand it (the loader itself lays out a
    fresh run's samples by its world size, so 1 and 2 ranks would read different batches)."""
    from ldot.data.loader import tokenize

    split, hard, rank, world = t.hard.split, t.hard, t.dist.rank, t.dist.world_size
    order = torch.randperm(split.num_images, generator=torch.Generator().manual_seed(7)).tolist()
    per = size // world
    for step in range(1, t.max_steps + 1):
        rows = order[(step - 1) * size:step * size][rank * per:(rank + 1) * per]
        caption = [step % int(hard.num_captions[r]) for r in rows]
        batch = tokenize(t.tokenizer, [split.captions[hard.first_caption[r] + c] for r, c in zip(rows, caption)],
                         t.cfg.data.max_text_len)
        batch.update(hard.store.batch(rows))
        batch.update(group_ids=torch.tensor(rows), caption_index=torch.tensor(caption),
                     image_id=[split.image_ids[r] for r in rows])
        yield hard.attach(batch)  # when the step draws it: after the step's mining


def recording(t, batches=None):
    """Runs the trainer to its end (on `batches` instead of its loader's, if given), recording each step's loss
    and grad norm and the lists of each mining."""
    losses, norms, lists = {}, {}, {}
    record, mine = t.metrics.record, t.hard.mine
    # what the run starts with: on a resume, the lists the checkpoint held
    initial = (t.hard.mined_at, None if t.hard.txt2img is None else (t.hard.txt2img.copy(), t.hard.img2txt.copy()))

    def rec(step, task, stats, engine, scale):
        losses[step], norms[step] = float(stats.loss), float(engine.get_global_grad_norm())
        return record(step, task, stats, engine, scale)

    def mining(model, step, **kw):
        mine(model, step, **kw)
        lists[step] = (t.hard.txt2img.copy(), t.hard.img2txt.copy())

    t.metrics.record, t.hard.mine = rec, mining
    if batches is None:
        outcome, _ = t.train()
        assert outcome == "finished"
    else:
        for step in range(t.start_step + 1, t.max_steps + 1):
            t.step(step, batches)
        t.metrics.close()
        t.tracker.finish("FINISHED")
    return {"losses": losses, "norms": norms, "lists": lists, "initial": initial, "start_step": t.start_step}


def done(t):
    # free the engine on every rank at the same point (tests/train/trainer_worker.py says why)
    del t
    gc.collect()
    torch.distributed.barrier()


def main():
    out, text_encoder, train_dir, *modes = sys.argv[1:]
    base = Path(out).parent
    result = {}
    if "equal" in modes:
        t = trainer(base / "equal", text_encoder, train_dir,
                    ["optim.max_steps=4", "optim.lr=3e-3", "model.dropout=0.0", "hard_negatives.sampling=top",
                     "hard_negatives.every_steps=3"])
        result["equal"] = recording(t, global_batches(t))
        done(t)
    if "resume" in modes:
        extra = ["optim.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=3"]
        t = trainer(base / "resume", text_encoder, train_dir, extra)
        result["straight"] = recording(t)
        done(t)
        t = trainer(base / "resume", text_encoder, train_dir, extra, resume="step-00000003")
        result["resumed"] = recording(t)
        done(t)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
