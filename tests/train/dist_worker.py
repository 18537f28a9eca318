"""Worker for the distributed training tests, launched with torchrun; writes its results as a torch file.

Every rank builds the same global batches from a seed and trains on its own slice of each, through the
trainer's own pieces (build_dual_encoder, build_engine, Objectives, train_step, CheckpointManager).

  equivalence OUT TEXT_ENCODER          ZeRO-2, 5 CMR steps on a 16-pair global batch split over the ranks;
                                        each step's full gradients (before clipping) and global grad norm
  resume OUT TEXT_ENCODER CKPT_DIR      per ZeRO stage 1, 2, 3, dropout on: 4 steps straight vs 2 + save +
                                        reload + 2
  checkpointing OUT TEXT_ENCODER        ZeRO-3, 3 steps with dropout, without and with activation checkpointing
"""
import sys

import torch

from ldot.train.checkpoint import CheckpointManager
from ldot.train.config import EngineConfig, LossConfig, ModelConfig, OptimConfig
from ldot.distributed import init_distributed
from ldot.train.engine import build_engine
from ldot.train.engine import export_from_engine
from ldot.train.step import train_step
from ldot.train.model_setup import build_dual_encoder
from ldot.train.objectives import Objectives

GLOBAL, D, N, SEED = 16, 12, 4, 0


def global_batches(tok, steps):
    g = torch.Generator().manual_seed(123)
    texts = [f"picture {i} shows a {c} thing" for i, c in enumerate(["red", "green", "blue", "small"] * 4)]
    enc = tok(texts, padding="max_length", max_length=12, return_tensors="pt")
    out = []
    for _ in range(steps):
        perm = torch.randperm(GLOBAL, generator=g)
        out.append({"input_ids": enc["input_ids"][perm], "attention_mask": enc["attention_mask"][perm],
                    "img_feat": torch.randn(GLOBAL, N, D, generator=g), "img_pos": torch.rand(GLOBAL, N, 7, generator=g),
                    "img_mask": torch.ones(GLOBAL, N, dtype=torch.long), "group_ids": perm.clone()})
    return out


def local(batch, rank, world):
    per = GLOBAL // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def make(text_encoder, stage, dist, dropout=0.0, grad_checkpointing=False):
    torch.manual_seed(SEED)
    tok, model = build_dual_encoder(ModelConfig(text_encoder=text_encoder, image_layers=1, dropout=dropout,
                                                projection=True, grad_checkpointing=grad_checkpointing),
                                    LossConfig(scale="learnable", normalize=True), D)
    model.to(dist.device)
    engine, _ = build_engine(model, OptimConfig(lr=1e-3, max_steps=8, warmup_ratio=0.25, grad_clip=1.0),
                             EngineConfig(deepspeed_config=f"deepspeed_configs/zero{stage}.json"), GLOBAL // dist.world_size)
    return tok, engine, Objectives(engine.module, tok)


def run_steps(engine, objectives, batches, first_step, dist):
    losses = []
    for i, b in enumerate(batches):
        stats = train_step(engine, objectives, "cmr", iter([local(b, dist.rank, dist.world_size)]),
                           world=dist.world_size, seed=SEED, step=first_step + i, rank=dist.rank,
                           device=dist.device, float_dtype=torch.float32)
        losses.append(stats.loss.item())
    return losses


def capture_gradients(engine, into):
    """Records every parameter's full gradient of each step, after the backward and before the step (so
    before clipping and the optimizer), by wrapping the engine's own step. Under ZeRO the gradients are
    partitioned: DeepSpeed's safe_get_full_grad assembles them (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_grad

    step = engine.step

    def step_capturing(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            into.append({name: safe_get_full_grad(p).detach().clone().cpu()
                         for name, p in engine.module.named_parameters()})
        return step(*args, **kwargs)

    engine.step = step_capturing


def full_weights(engine, tok, tmp, dist):
    """The whole model's weights on rank 0 (gathered under ZeRO-3), via the trainer's export."""
    import deepspeed

    params = list(engine.module.parameters()) if engine.zero_optimization_stage() == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        state = {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}
    return state


def main():
    mode, out, text_encoder = sys.argv[1:4]
    dist = init_distributed()
    result = {}
    if mode == "equivalence":
        tok, engine, obj = make(text_encoder, 2, dist)
        result["grads"], result["grad_norms"] = [], []
        capture_gradients(engine, result["grads"])
        result["losses"] = []
        for i, batch in enumerate(global_batches(tok, 5)):
            result["losses"] += run_steps(engine, obj, [batch], 1 + i, dist)
            result["grad_norms"].append(float(engine.get_global_grad_norm()))  # DeepSpeed's, before clipping
        result["weights"] = full_weights(engine, tok, None, dist)
    elif mode == "resume":
        ckpt_dir = sys.argv[4]
        # Dropout on: steps 3-4 after the reload draw the same dropout masks as the straight run's only
        # if the checkpoint restores each rank's RNG streams (with dropout 0 a checkpoint without them
        # resumed exactly too).
        for stage in (1, 2, 3):
            tok, engine, obj = make(text_encoder, stage, dist, dropout=0.1)
            torch.manual_seed(100 + dist.rank)  # each rank's own stream, as each rank's own file must restore
            batches = global_batches(tok, 4)
            straight = run_steps(engine, obj, batches, 1, dist)
            w_straight = full_weights(engine, tok, None, dist)

            tok, engine, obj = make(text_encoder, stage, dist, dropout=0.1)
            torch.manual_seed(100 + dist.rank)
            first = run_steps(engine, obj, batches[:2], 1, dist)
            mgr = CheckpointManager(f"{ckpt_dir}/zero{stage}", keep_last=1, rank=dist.rank)
            mgr.save(engine, 2, {"step": 2}, {"position": 2})
            # a fresh engine, as after a restart (the trainer seeds, then builds the model, then loads)
            tok, engine, obj = make(text_encoder, stage, dist, dropout=0.1)
            trainer_state, loader_state = mgr.load(engine, mgr.resolve("auto"))
            second = run_steps(engine, obj, batches[2:], 3, dist)
            result[stage] = {"straight": straight, "resumed": first + second, "state": trainer_state,
                             "loader": loader_state, "w_straight": w_straight,
                             "w_resumed": full_weights(engine, tok, None, dist)}
            export_from_engine(engine, tok, f"{ckpt_dir}/export{stage}", {"feature_dim": D}, dist.is_main)
    elif mode == "checkpointing":
        for ckpt in (False, True):
            tok, engine, obj = make(text_encoder, 3, dist, dropout=0.1, grad_checkpointing=ckpt)
            calls = []  # a module inside the layer runs again in the backward when the layer is recomputed
            engine.module.text.encoder.layer[0].output.dense.register_forward_hook(lambda *_: calls.append(1))
            torch.manual_seed(100 + dist.rank)  # the same dropout masks in both runs, different per rank
            result[ckpt] = {"losses": run_steps(engine, obj, global_batches(tok, 3), 1, dist),
                            "weights": full_weights(engine, tok, None, dist), "calls": len(calls)}
    if dist.is_main:
        torch.save(result, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
