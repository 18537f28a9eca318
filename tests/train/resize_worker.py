"""Worker for tests/train/test_resume_world_size.py, launched with torchrun: whole training jobs through the
trainer (ldot.train.trainer.Trainer, what `ldot train` runs), one after the other in one process group.

  resize_worker.py OUT TEXT_ENCODER TRAIN_DIR NAME:RESUME:key=value,key=value ...

Each NAME trains in OUT's folder/NAME with demo.yaml plus its overrides and `--resume RESUME` (none|auto).
OUT (torch file, rank 0) holds per NAME: the step it started from, every step's global batch (each rank's
image indices, in rank order), the optimizer's parameter groups and Adam's step count in each of its
states at the end. A job that resumed a checkpoint
written by another number of ranks also saves its engine right after the load, converts that to DeepSpeed's
universal form and compares it, parameter by parameter, with the universal form it loaded: the largest
difference of the fp32 weights, Adam's two moments and the step, which must all be 0.
"""
import gc
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


class Recorded:
    """The trainer's loader, recording the image indices of every batch it hands out."""

    def __init__(self, loader, into):
        self.loader, self.into = loader, into

    def __iter__(self):
        for batch in self.loader:
            self.into.append(batch["group_ids"].tolist())
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def universal_diff(reloaded: Path, loaded: Path) -> dict[str, float]:
    """Largest |difference| per state file (fp32, exp_avg, exp_avg_sq, step) over every parameter."""
    worst: dict[str, float] = {}
    files = sorted((loaded / "zero").glob("*/*.pt"))
    assert files, f"no universal parameter files in {loaded}"
    for f in files:
        a = torch.load(f, weights_only=False)
        b = torch.load(reloaded / "zero" / f.parent.name / f.name, weights_only=False)
        a, b = (x["param"] if isinstance(x, dict) else x for x in (a, b))
        diff = (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()
        worst[f.stem] = max(worst.get(f.stem, 0.0), diff)
    return worst


def main():
    out, text_encoder, train_dir, *jobs = sys.argv[1:]
    from ldot.train.checkpoint import UNIVERSAL, convert_to_universal
    from ldot.train.config import load_config
    from ldot.train.trainer import Trainer

    result = {}
    for job in jobs:
        name, resume, extra = job.split(":", 2)
        overrides = [f"output_dir={Path(out).parent / name}", f"data.train={train_dir}",
                     f"model.text_encoder={text_encoder}", "model.image_layers=1", "model.dropout=0.0",
                     "tracking.system_metrics_every_s=0", "tracking.log_every=1", f"tracking.experiment={name}",
                     *(e for e in extra.split(",") if e)]
        trainer = Trainer(load_config(ROOT / "train" / "configs" / "demo.yaml", overrides), resume=resume)
        engine, dist = trainer.engine, trainer.dist
        record = {"start_step": trainer.start_step, "world": dist.world_size}
        tags = trainer.checkpoints.complete_tags()
        if trainer.start_step and (trainer.checkpoints.dir / tags[-1] / UNIVERSAL).is_dir():
            side = Path(out).parent / f"{name}-reloaded"
            engine.save_checkpoint(str(side), tag="now", save_latest=False)
            torch.distributed.barrier()
            if dist.is_main:
                convert_to_universal(side / "now", side / "now-universal")
                record["universal_diff"] = universal_diff(side / "now-universal",
                                                          trainer.checkpoints.dir / tags[-1] / UNIVERSAL)
                shutil.rmtree(side)
            torch.distributed.barrier()
        batches: list[list[int]] = []
        trainer.loader = Recorded(trainer.loader, batches)
        outcome, _ = trainer.train()
        every = [None] * dist.world_size
        torch.distributed.all_gather_object(every, batches)
        optimizer = engine.optimizer.optimizer
        record.update(outcome=outcome, batches=[sum(step, []) for step in zip(*every)],
                      groups=[{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                              for g in optimizer.param_groups],
                      adam_steps=sorted(float(st["step"]) for st in optimizer.state.values() if "step" in st))
        result[name] = record
        # every rank frees the job's engine at the same point (tests/train/trainer_worker.py says why)
        del trainer, engine
        gc.collect()
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
