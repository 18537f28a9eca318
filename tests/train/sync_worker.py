"""Worker for tests/train/test_step_syncs.py, launched with torchrun: counts the reads of tensor values
that the trainer's own code makes during steady-state steps (each is a device->host synchronization on
a GPU) and writes them, with their call sites, as JSON.

  sync_worker.py OUT TEXT_ENCODER TRAIN_DIR TASK [key=value ...]

Counted: Tensor.item/tolist/__bool__/__int__/__float__/__index__/numpy called directly from a module
of the ldot packages (DeepSpeed's and torch's own reads are theirs to answer for). Steps 2..5 of a run
that records every 1000 steps and never checkpoints: the steady state a long job spends its time in.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OURS = tuple(str(ROOT / d) + "/" for d in ("data", "kernels", "model", "tracking", "train", "eval", "ldot"))
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


def main():
    out, text_encoder, train_dir, task, *extra = sys.argv[1:]
    from ldot.train.config import load_config
    from ldot.train.trainer import Trainer

    overrides = [f"output_dir={Path(out).parent / 'run'}", f"data.train={train_dir}", f"model.text_encoder={text_encoder}",
                 "model.image_layers=1", "data.batch_size=4", "optim.max_steps=1000", "tracking.log_every=1000",
                 "tracking.system_metrics_every_s=0", "checkpoint.every_steps=0", "model.dropout=0.1",
                 f"task={task}"]
    if task == "pretrain":  # one task only, named in extra
        overrides += ["pretrain.cmr=0", "pretrain.vmlm=0", "pretrain.mrfr=0", "pretrain.mrckl=0"]
    overrides += extra
    cfg = load_config(ROOT / "train" / "configs" / "demo.yaml", overrides)
    trainer = Trainer(cfg)
    batches = iter(trainer.loader)
    trainer.step(1, batches)  # the first step builds lazily (optimizer state, kernels): not steady state

    sites = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS):
                frame = sys._getframe(1)
                sites[f"{Path(caller).relative_to(ROOT)}:{frame.f_lineno} {name}"] += 1
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        for step in range(2, 6):
            trainer.step(step, batches)
            trainer.preemption.any_rank_requested()
            trainer.checkpoints.due(step)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    if trainer.dist.is_main:
        Path(out).write_text(json.dumps({"sites": dict(sites), "tasks": [trainer.tasks.task_for(s) for s in range(2, 6)]}))
    trainer.tracker.finish("FINISHED")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
