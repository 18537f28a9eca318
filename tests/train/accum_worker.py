"""Worker for tests/train/test_grad_accum.py, launched with torchrun: ZeRO-1, -2 and -3 train 3 optimizer
steps of 3 micro-batches each, of CMR and (another model) of MRFR, through the trainer's own pieces, the
forward through the engine as the Trainer does; writes each stage's gathered weights and how often
DeepSpeed synchronized the device during the steps (its accelerator's synchronize, counted).

One task a model: a parameter a step leaves without gradient (a head another task uses) is updated by
Adam's momentum under ZeRO-1/2 but not alike under ZeRO-3, which is not what this compares.

  accum_worker.py OUT TEXT_ENCODER [module]   # "module": the forward bypasses the engine (the old way)
"""
import sys

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from ldot.distributed import init_distributed
from ldot.train.config import EngineConfig, LossConfig, ModelConfig, OptimConfig
from ldot.train.engine import build_engine
from ldot.train.model_setup import build_dual_encoder
from ldot.train.objectives import Objectives
from ldot.train.step import train_step

from compile_worker import D, batch

ACCUM, STEPS = 3, 3  # the first step has lr 0 (warm-up from 0)


def run(text_encoder, stage, dist, through_engine, task):
    torch.manual_seed(0)
    tok, model = build_dual_encoder(ModelConfig(text_encoder=text_encoder, image_layers=2, dropout=0.0,
                                                projection=task == "cmr"),
                                    LossConfig(scale="learnable", normalize=True), D, pretrain=task != "cmr")
    engine, _ = build_engine(model, OptimConfig(lr=1e-3, max_steps=8, warmup_ratio=0.0, grad_clip=1.0, grad_accum=ACCUM),
                             EngineConfig(deepspeed_config=f"deepspeed_configs/zero{stage}.json"), 4)
    objectives = Objectives(engine.module, tok, forward=engine if through_engine else None)
    initial = gathered(engine, stage)
    acc = get_accelerator()
    synchronize, syncs = acc.synchronize, []
    acc.synchronize = lambda *a, **k: (syncs.append(1), synchronize(*a, **k))[1]
    try:
        for step in range(1, STEPS + 1):
            micro = iter([batch(tok, 10 * step + m, dist.rank) for m in range(ACCUM)])
            train_step(engine, objectives, task, micro, world=dist.world_size, seed=0, step=step, rank=dist.rank,
                       device=dist.device, float_dtype=torch.float32, rank_sizes=lambda n: [n] * dist.world_size)
    finally:
        acc.synchronize = synchronize
    assert engine.global_steps == STEPS
    return {"initial": initial, "weights": gathered(engine, stage), "syncs": len(syncs)}


def gathered(engine, stage):
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def main():
    out, text_encoder = sys.argv[1], sys.argv[2]
    through_engine = sys.argv[3:] != ["module"]
    dist = init_distributed()
    results = {(task, stage): run(text_encoder, stage, dist, through_engine, task)
               for task in ("cmr", "mrfr") for stage in (1, 2, 3)}
    if dist.is_main:
        torch.save(results, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
