"""The training recipe: build data, model, engine and tracker, run the steps, export the encoders."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

import kernels
from data.loader import TrainLoader
from data.schema import read_manifest
from train.config import TrainConfig, dump_config, flatten, to_dict
from train.distributed import DistInfo, init_distributed
from train.engine import build_engine, loss_scale
from train.model import DualEncoder, build_dual_encoder, export_dual_encoder
from train.tracking import Tracker, git_state, resolve_tracking_uri

log = logging.getLogger("ldot.train")

_FLOAT_KEYS = ("img_feat", "img_pos")
_TENSOR_KEYS = ("input_ids", "attention_mask", "img_feat", "img_pos", "img_mask", "group_ids")


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    out = {k: batch[k].to(device, non_blocking=True) for k in _TENSOR_KEYS}
    for k in _FLOAT_KEYS:
        out[k] = out[k].to(float_dtype)
    return out


def cmr_loss(model: DualEncoder, batch: dict) -> torch.Tensor:
    """CMR over the global batch: every rank's texts are scored against every rank's images."""
    text, image = model(batch["input_ids"], batch["attention_mask"], batch["img_feat"], batch["img_pos"],
                        batch["img_mask"])
    return kernels.global_contrastive_loss(text, image, model.contrastive.logit_scale(),
                                           group_ids=batch["group_ids"], impl=model.contrastive.impl)


def _precision_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train(cfg: TrainConfig) -> Path:
    """Runs the configured job; returns the exported checkpoint directory."""
    dist: DistInfo = init_distributed()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    manifest = read_manifest(cfg.data.train)
    tokenizer, model = build_dual_encoder(cfg.model, cfg.loss, feature_dim=manifest["feature_dim"])
    model.to(dist.device)
    engine, ds_config = build_engine(model, cfg.optim, cfg.engine, cfg.data.batch_size)
    loader = TrainLoader(cfg.data.train, tokenizer, batch_size=cfg.data.batch_size,
                         max_text_len=cfg.data.max_text_len, seed=cfg.seed, rank=dist.rank,
                         world_size=dist.world_size, num_workers=cfg.data.num_workers)

    tracker = Tracker(resolve_tracking_uri(cfg.tracking.tracking_uri, out), cfg.tracking.experiment,
                      enabled=dist.is_main)
    tracker.start(cfg.tracking.run_name, tags={**git_state(), "ldot.task": cfg.task})
    tracker.log_params({**flatten(to_dict(cfg)), "world_size": dist.world_size,
                        "zero_stage": ds_config["zero_optimization"].get("stage", 0),
                        "data.train.images": manifest.get("num_samples", manifest.get("count", "?"))})
    tracker.write_info(out)
    if dist.is_main:
        dump_config(cfg, out / "config.yaml")
        tracker.log_artifact(out / "config.yaml")

    float_dtype = _precision_dtype(cfg.engine.precision)
    world = dist.world_size
    batches = iter(loader)
    bar = tqdm(total=cfg.optim.max_steps, desc="train", disable=not dist.is_main, mininterval=2.0)
    status = "FAILED"
    try:
        for step in range(1, cfg.optim.max_steps + 1):
            t0 = time.perf_counter()
            step_loss, pairs, tokens = 0.0, 0, 0
            for _ in range(cfg.optim.grad_accum):
                batch = to_device(next(batches), dist.device, float_dtype)
                loss = cmr_loss(engine.module, batch)
                # The loss's backward hands each rank its share of the global gradient; DeepSpeed
                # averages over ranks, so scale by the world size to get the sum.
                engine.backward(loss * world)
                engine.step()
                step_loss += loss.detach().float().item() / cfg.optim.grad_accum
                pairs += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum() + batch["img_mask"].sum())
            dt = time.perf_counter() - t0
            grad_norm = engine.get_global_grad_norm()
            scale = engine.module.contrastive.logit_scale()
            record = {"loss/cmr": step_loss, "lr": engine.get_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                      "loss_scale": loss_scale(engine),
                      # local counts x world: ranks hold equal batches under fixed-size batching
                      "samples_per_s": pairs * world / dt, "tokens_per_s": tokens * world / dt}
            if scale is not None:
                record["logit_scale"] = float(scale)
            if step % cfg.tracking.log_every == 0 or step == cfg.optim.max_steps:
                tracker.log_metrics(record, step)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}")
            bar.update()
        status = "FINISHED"
    finally:
        bar.close()
        skipped = getattr(loader, "skipped", None) or {}
        if skipped:
            tracker.log_metrics({f"skipped/{k}": v for k, v in skipped.items()}, cfg.optim.max_steps)
        if status != "FINISHED":
            tracker.finish(status)

    final = out / "checkpoints" / "final"
    if dist.is_main:
        export_dual_encoder(engine.module, tokenizer, final,
                            {"feature_dim": manifest["feature_dim"], "max_text_len": cfg.data.max_text_len,
                             "steps": cfg.optim.max_steps})
        tracker.write_info(final)
        dump_config(cfg, final / "config.yaml")
        tracker.set_tags({"ldot.checkpoint": str(final.resolve())})
    tracker.finish("FINISHED")
    torch.distributed.barrier()
    return final
