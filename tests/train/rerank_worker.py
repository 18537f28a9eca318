"""Worker for tests/train/test_rerank_distributed.py, launched with torchrun; writes its results as a torch file.

  equivalence OUT TEXT_ENCODER TRAIN_DIR MINED   ZeRO-2, 4 rerank steps on an 8-image global batch split
                                                 over the ranks (each rank builds its share's pairs with the
                                                 trainer's RerankBatches); each step's loss, full gradients
                                                 before clipping and DeepSpeed's global grad norm; the weights
  resume OUT TEXT_ENCODER TRAIN_DIR MINED         the Trainer (what `ldot train` runs) with task=rerank, dropout
                                                 on: 6 steps straight vs 3 steps, a checkpoint and exit (as a
                                                 preemption does), then --resume auto for steps 4-6
  precision OUT TEXT_ENCODER TRAIN_DIR MINED      the Trainer with task=rerank, dropout off, 4 steps at
                                                 engine.precision fp32, bf16 and amp_bf16: each step's loss,
                                                 the weights before training and the exports
"""
import gc
import sys
from pathlib import Path

import numpy as np
import torch

from dist_worker import capture_gradients, full_weights
from ldot.distributed import init_distributed
from ldot.train.config import EngineConfig, ModelConfig, OptimConfig, RerankConfig

ROOT = Path(__file__).resolve().parents[2]
GLOBAL, SEED, STEPS = 8, 0, 4


def equivalence(text_encoder, train_dir, mined, dist):
    from ldot.data.loader import load_eval_split
    from ldot.eval.image_store import ImageStore
    from ldot.train.engine import build_engine
    from ldot.train.model_setup import build_cross_encoder
    from ldot.train.objectives import Objectives
    from ldot.train.rerank import MinedNegatives, RerankBatches
    from ldot.train.step import train_step

    torch.manual_seed(SEED)
    rcfg = RerankConfig(mined=mined, negatives=2, layers=1)
    tok, model = build_cross_encoder(ModelConfig(text_encoder=text_encoder, dropout=0.0), rcfg, feature_dim=8)
    model.to(dist.device)
    per = GLOBAL // dist.world_size
    engine, _ = build_engine(model, OptimConfig(lr=1e-3, max_steps=8, warmup_ratio=0.25, grad_clip=1.0),
                             EngineConfig(deepspeed_config="deepspeed_configs/zero2.json"), per)
    obj = Objectives(engine.module, tok)
    split = load_eval_split(train_dir)
    rb = RerankBatches(None, MinedNegatives(mined, split), ImageStore(train_dir, split.keys), tok,
                       negatives=rcfg.negatives, from_top=None, seed=SEED, max_text_len=16)
    result = {"grads": [], "grad_norms": [], "losses": []}
    capture_gradients(engine, result["grads"])
    rng = np.random.default_rng(5)
    # the global batches, the same on every rank; the last step repeats the first (same images, same
    # loader index, so the same draws), so that its loss shows the training
    steps = [rng.permutation(split.num_images)[:GLOBAL].tolist() for _ in range(STEPS - 1)]
    for step, (index, rows) in enumerate([*enumerate(steps), (0, steps[0])], start=1):
        mine = rows[dist.rank * per:(dist.rank + 1) * per]
        batch = rb.make(mine, [split.image_ids[r] for r in mine], index=index)
        stats = train_step(engine, obj, "rerank", iter([batch]), world=dist.world_size, seed=SEED, step=step,
                           rank=dist.rank, device=dist.device, float_dtype=torch.float32)
        loss = stats.loss.to(torch.float64)
        torch.distributed.all_reduce(loss)  # each rank's mean over its lists; their mean is the global one
        result["losses"].append(loss.item() / dist.world_size)
        result["grad_norms"].append(float(engine.get_global_grad_norm()))
    result["weights"] = full_weights(engine, tok, None, dist)
    return result


def rerank_config(name, text_encoder, train_dir, mined, out_dir, *overrides):
    """rerank-demo.yaml made small (1 layer, K = 2, 2 images a rank), run `name` under out_dir, plus overrides."""
    from ldot.train.config import load_config

    return load_config(ROOT / "train" / "configs" / "rerank-demo.yaml", [
        f"output_dir={out_dir}/{name}", f"data.train={train_dir}", f"rerank.mined={mined}",
        f"model.text_encoder={text_encoder}", "rerank.layers=1", "rerank.negatives=2", "data.batch_size=2",
        "data.max_text_len=16", "tracking.system_metrics_every_s=0", f"tracking.experiment=rerank-{name}", *overrides])


def resume(text_encoder, train_dir, mined, out_dir, dist):
    from ldot.model import load_cross_encoder
    from ldot.train.trainer import Trainer

    def trainer(name, resume=None):
        cfg = rerank_config(name, text_encoder, train_dir, mined, out_dir,
                            "optim.max_steps=6", "checkpoint.every_steps=3", "model.dropout=0.1",
                            # validation on the training split's own lists (the lists are what is checked, not
                            # generalization)
                            f"data.val={train_dir}", f"rerank.val_mined={mined}", "eval.every_steps=2")
        t = Trainer(cfg, resume)
        losses = {}
        record = t.metrics.record
        validate = t.validator.run

        def validating(engine, step, tracker):
            metrics = validate(engine, step, tracker)
            losses[f"val{step}"] = (metrics["list_loss"], metrics["list_top1"], t.validator.best)
            return metrics

        t.validator.run = validating

        def recording(step, task, stats, *args):
            losses[step] = (task, stats.loss.item())
            return record(step, task, stats, *args)

        t.metrics.record = recording
        return t, losses

    t, straight = trainer("straight")
    outcome, final = t.train()
    assert outcome == "finished"
    del t
    gc.collect()
    torch.distributed.barrier()

    t, first = trainer("resumed")
    batches = iter(t.loader)
    for step in (1, 2, 3):
        t.step(step, batches)
    t.metrics.close()
    t.preempt(3)  # a checkpoint at the step boundary, then the job ends
    del t, batches
    gc.collect()
    torch.distributed.barrier()
    t, second = trainer("resumed", resume="auto")
    start = t.start_step
    second["best_at_resume"] = t.validator.best  # the validation's state travels in the checkpoint
    outcome, final_resumed = t.train()
    assert outcome == "finished"
    result = {"straight": straight, "resumed": {**first, **second}, "start": start,
              "best": (out_dir / "straight" / "checkpoints" / "best" / "ldot.json").is_file()}
    if dist.is_main:
        for name, path in (("w_straight", final), ("w_resumed", final_resumed)):
            result[name] = {k: v.clone() for k, v in load_cross_encoder(path)[1].state_dict().items()}
    return result


def precision(text_encoder, train_dir, mined, out_dir, dist):
    from ldot.train.trainer import Trainer

    result = {}
    for name in ("fp32", "bf16", "amp_bf16"):
        cfg = rerank_config(name, text_encoder, train_dir, mined, out_dir, "optim.max_steps=4", "optim.lr=1e-3",
                            "optim.warmup_ratio=0", "model.dropout=0.0", f"engine.precision={name}")
        t = Trainer(cfg)
        # ZeRO-2 keeps the whole model on every rank (its optimizer state is what is partitioned)
        init = {k: v.detach().float().clone() for k, v in t.engine.module.state_dict().items()}
        losses, record = [], t.metrics.record

        def recording(step, task, stats, *args, losses=losses, record=record):
            losses.append(stats.loss.item())
            return record(step, task, stats, *args)

        t.metrics.record = recording
        outcome, final = t.train()
        assert outcome == "finished"
        result[name] = {"losses": losses, "init": init, "final": str(final)}
        del t
        gc.collect()
        torch.distributed.barrier()
    return result


def main():
    mode, out, text_encoder, train_dir, mined = sys.argv[1:6]
    dist = init_distributed()
    if mode == "equivalence":
        result = equivalence(text_encoder, train_dir, mined, dist)
    elif mode == "precision":
        result = precision(text_encoder, train_dir, mined, Path(out).parent / "runs", dist)
    else:
        result = resume(text_encoder, train_dir, mined, Path(out).parent / "runs", dist)
    if dist.is_main:
        torch.save(result, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
