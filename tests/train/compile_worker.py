"""Worker for tests/train/test_compile_zero.py, launched with torchrun: one ZeRO stage, the same model
trained eagerly and with model.compile (both with activation checkpointing, dropout off) through the
trainer's own pieces (build_dual_encoder, build_engine, Objectives, train_step), a CMR, a VMLM and an
MRFR step on each rank's own batch; writes both runs' losses and gathered weights.

  compile_worker.py OUT TEXT_ENCODER STAGE
"""
import sys

import deepspeed
import torch
from torch._dynamo.utils import counters

from ldot.distributed import init_distributed
from ldot.train.config import EngineConfig, LossConfig, ModelConfig, OptimConfig
from ldot.train.engine import build_engine
from ldot.train.model_setup import build_dual_encoder
from ldot.train.objectives import Objectives
from ldot.train.step import train_step

PAIRS, D, N = 4, 12, 5
TASKS = ("cmr", "vmlm", "mrfr")


def batch(tok, step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    words = ["red", "green", "blue", "small", "large", "circle", "square", "left"]
    texts = [" ".join(words[int(j)] for j in torch.randint(0, 8, (3 + i,), generator=g)) for i in range(PAIRS)]
    enc = tok(texts, padding="max_length", max_length=10, return_tensors="pt")
    regions = torch.tensor([N, 2, 4, 3])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "img_feat": torch.randn(PAIRS, N, D, generator=g), "img_pos": torch.rand(PAIRS, N, 7, generator=g),
            "img_mask": (torch.arange(N) < regions[:, None]).long(),
            "group_ids": torch.arange(PAIRS) + 100 * step + PAIRS * rank}


def run(text_encoder, stage, compiled, dist):
    torch.manual_seed(0)
    tok, model = build_dual_encoder(ModelConfig(text_encoder=text_encoder, image_layers=2, dropout=0.0, projection=True,
                                                grad_checkpointing=True, compile=compiled),
                                    LossConfig(scale="learnable", normalize=True), D, pretrain=True)
    model.to(dist.device)
    engine, _ = build_engine(model, OptimConfig(lr=1e-4, max_steps=8, warmup_ratio=0.0, grad_clip=1.0),
                             EngineConfig(deepspeed_config=f"deepspeed_configs/zero{stage}.json"), PAIRS)
    objectives = Objectives(engine.module, tok, forward=engine)  # as the Trainer does
    losses = []
    for step, task in enumerate(TASKS, start=1):
        stats = train_step(engine, objectives, task, iter([batch(tok, step, dist.rank)]), world=dist.world_size,
                           seed=0, step=step, rank=dist.rank, device=dist.device, float_dtype=torch.float32,
                           rank_sizes=lambda n: [n] * dist.world_size)
        losses.append(float(stats.loss))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    frames = dict(counters["frames"])  # what dynamo compiled (0 frames: the "compiled" run ran eagerly)
    return {"losses": losses, "weights": weights, "frames": frames, "graph_breaks": sum(counters["graph_break"].values())}


def main():
    out, text_encoder, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist = init_distributed()
    results = {compiled: run(text_encoder, stage, compiled, dist) for compiled in (False, True)}
    if dist.is_main:
        torch.save(results, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
