"""The training recipe: build data, model, engine and tracker, run the steps, export the encoders."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ldot.data.loader import TrainLoader
from ldot.data.progress import progress_bar
from ldot.data.schema import read_manifest
from ldot.train.checkpoint import CheckpointManager
from ldot.train.config import TrainConfig, dump_config, to_dict
from ldot.distributed import DistInfo, init_distributed
from ldot.train.errors import ConfigError
from ldot.train.engine import build_engine, loss_scale
from ldot.model import export_dual_encoder
from ldot.train.model_setup import build_dual_encoder
from ldot.train.objectives import Objectives, TaskSampler, mask_generator
from ldot.train.preemption import PreemptionWatch
from ldot.tracking import Tracker
from ldot.train.job_tracking import start_job_tracking

log = logging.getLogger("ldot.train")

_FLOAT_KEYS = ("img_feat", "img_pos", "img_cls")


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    for k in _FLOAT_KEYS:
        if k in out:
            out[k] = out[k].to(float_dtype)
    return out


def train_step(engine, objectives: Objectives, task: str, micro_batches, *, world: int, seed: int, step: int,
               rank: int, device: torch.device, float_dtype: torch.dtype) -> tuple[float, int, int]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, pairs, tokens+regions)."""
    step_loss, pairs, tokens = 0.0, 0, 0
    n = engine.gradient_accumulation_steps()
    for micro in range(n):
        batch = to_device(next(micro_batches), device, float_dtype)
        loss = objectives(task, batch, mask_generator(device, seed, step, rank, micro))
        # CMR's backward hands each rank its share of the global-batch gradient and DeepSpeed averages
        # over ranks, so scale by the world size to get the sum. The other tasks are per-rank means,
        # which DeepSpeed's average combines as they are.
        engine.backward(loss * world if task == "cmr" else loss)
        engine.step()
        step_loss += loss.detach().float().item() / n
        pairs += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum() + batch["img_mask"].sum())
    return step_loss, pairs, tokens


def export_from_engine(engine, tokenizer, out_dir: Path, meta: dict, is_main: bool) -> None:
    """Export the encoders; under ZeRO-3 every rank joins the gather of the partitioned weights."""
    import deepspeed

    params = list(engine.module.parameters()) if engine.zero_optimization_stage() == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if is_main:
            export_dual_encoder(engine.module, tokenizer, out_dir, meta)


class Validator:
    """Recall on the validation split during training; exports the best-AR encoders to checkpoints/best.

    Every rank runs the encoders (under ZeRO-3 each forward gathers weights from all ranks); rank 0
    records. The split is loaded once."""

    def __init__(self, cfg: TrainConfig, tokenizer, out: Path, manifest_meta: dict, is_main: bool):
        from ldot.data.loader import load_eval_split

        self.cfg, self.tokenizer, self.is_main = cfg, tokenizer, is_main
        self.split = load_eval_split(cfg.data.val)
        self.best_dir, self.meta, self.best = out / "checkpoints" / "best", manifest_meta, -1.0

    def __call__(self, engine, step: int, tracker: Tracker) -> dict:
        from ldot.eval.recall import evaluate_split

        recall = evaluate_split(engine.module, self.split, self.tokenizer, ks=self.cfg.eval.ks,
                                batch_size=self.cfg.eval.batch_size, max_text_len=self.cfg.data.max_text_len,
                                device=next(engine.module.parameters()).device, progress=False)
        tracker.log_metrics({f"val/{k}": v for k, v in recall.items()}, step)
        if recall["ar"] > self.best:
            self.best = recall["ar"]
            export_from_engine(engine, self.tokenizer, self.best_dir, {**self.meta, "steps": step,
                                                                       "val_ar": recall["ar"]}, self.is_main)
            tracker.log_metrics({"val/best_ar": self.best}, step)
            tracker.set_tags({"ldot.best_checkpoint": str(self.best_dir.resolve()), "ldot.best_step": str(step)})
        log.info("step %d: val AR %.4f (best %.4f)", step, recall["ar"], self.best)
        return recall


def _precision_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train(cfg: TrainConfig, resume: str | None = None) -> tuple[str, Path | None]:
    """Runs the configured job. Returns ("finished", export dir) or ("preempted", checkpoint dir)."""
    dist: DistInfo = init_distributed()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    manifest = read_manifest(cfg.data.train)
    pretrain = cfg.task == "pretrain"
    ratios = cfg.pretrain.ratios() if pretrain else {"cmr": 1.0}
    num_classes = manifest.class_dim or 0
    if ratios.get("mrckl", 0) > 0 and not num_classes:
        raise ConfigError(f"{cfg.data.train} has no class distributions (cls.npy) for MRC-kl: set pretrain.mrckl=0")
    tokenizer, model = build_dual_encoder(cfg.model, cfg.loss, feature_dim=manifest.feature_dim,
                                          pretrain=pretrain, num_classes=num_classes)
    model.to(dist.device)
    engine, ds_config = build_engine(model, cfg.optim, cfg.engine, cfg.data.batch_size)
    loader = TrainLoader(cfg.data.train, tokenizer,
                         batch_size=None if cfg.data.token_budget else cfg.data.batch_size,
                         token_budget=cfg.data.token_budget, max_text_len=cfg.data.max_text_len, seed=cfg.seed,
                         rank=dist.rank, world_size=dist.world_size, num_workers=cfg.data.num_workers,
                         on_error=cfg.data.on_error, with_cls=ratios.get("mrckl", 0) > 0)
    checkpoints = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last, dist.rank)
    tag = checkpoints.resolve(resume)
    start_step = 0
    if tag is not None:
        trainer_state, loader_state = checkpoints.load(engine, tag)
        loader.load_state_dict(loader_state)
        start_step = trainer_state["step"]
        log.info("resumed from %s at step %d", checkpoints.dir / tag, start_step)

    # Rank 0 starts (or continues) the run, records params and config artifacts, writes config.yaml
    # and mlflow_run.json; the other ranks record only their system metrics.
    tracker = start_job_tracking(cfg, out, dist, ds_config, manifest, resuming=tag is not None)
    if tag is not None:
        tracker.replay(trainer_state.get("records", []))

    def save(step: int) -> Path:
        # The step records since the last checkpoint travel with it: a crash after the save but before
        # they reach MLflow is mended by the replay on resume.
        state = {"step": step, "config": to_dict(cfg), "records": tracker.pending(),
                 "best_val_ar": validator.best if validator else None}
        return checkpoints.save(engine, step, state, loader.state_dict())

    objectives = Objectives(engine.module, tokenizer, mask_prob=cfg.pretrain.mask_prob)
    sampler = TaskSampler(ratios, cfg.seed)
    export_meta = {"feature_dim": manifest.feature_dim, "max_text_len": cfg.data.max_text_len}
    validator = Validator(cfg, tokenizer, out, export_meta, dist.is_main) if cfg.eval.every_steps else None
    if validator and tag is not None:
        validator.best = trainer_state.get("best_val_ar") or -1.0
    preemption = PreemptionWatch(dist.device)
    float_dtype = _precision_dtype(cfg.engine.precision)
    world = dist.world_size
    batches = iter(loader)
    bar = progress_bar(total=cfg.optim.max_steps, initial=start_step, desc="train", unit="step",
                       disable=not dist.is_main, every_s=cfg.tracking.progress_every_s)
    status = "FAILED"
    try:
        for step in range(start_step + 1, cfg.optim.max_steps + 1):
            t0 = time.perf_counter()
            task = sampler.task_for(step)
            step_loss, pairs, tokens = train_step(engine, objectives, task, batches, world=world, seed=cfg.seed,
                                                  step=step, rank=dist.rank, device=dist.device,
                                                  float_dtype=float_dtype)
            dt = time.perf_counter() - t0
            grad_norm = engine.get_global_grad_norm()
            scale = objectives.last_scale if task == "cmr" else None
            record = {f"loss/{task}": step_loss, "lr": engine.get_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                      "loss_scale": loss_scale(engine),
                      # local counts x world: exact for fixed-size batches, an estimate under a token budget
                      "samples_per_s": pairs * world / dt, "tokens_per_s": tokens * world / dt}
            if scale is not None:
                record["logit_scale"] = float(scale)
            if step % cfg.tracking.log_every == 0 or step == cfg.optim.max_steps:
                tracker.log_metrics(record, step)
            bar.set_postfix(ordered_dict={"task": task, "loss": f"{step_loss:.4f}", "lr": f"{record['lr']:.2e}",
                                          "samples/s": f"{record['samples_per_s']:.1f}"}, refresh=False)
            bar.update()
            if validator and (step % cfg.eval.every_steps == 0 or step == cfg.optim.max_steps):
                validator(engine, step, tracker)
            every = cfg.checkpoint.every_steps
            # Metrics are sent after the checkpoint that covers them: a crash before it loses them with
            # the steps, which the resumed run retrains and records once; a crash after it is mended
            # by the replay of the records the checkpoint holds.
            if preemption.any_rank_requested():
                path = save(step)
                tracker.finish("KILLED")
                log.warning("preempted: checkpoint %s written at step %d", path, step)
                torch.distributed.barrier()  # leave together: a launcher may stop the others at the first exit
                return "preempted", path
            if every and (step % every == 0 or step == cfg.optim.max_steps):
                save(step)
                tracker.flush()
        status = "FINISHED"
    finally:
        bar.close()
        skipped = getattr(loader, "skipped", None) or {}
        if skipped:
            tracker.log_metrics({f"skipped/{k}": v for k, v in skipped.items()}, cfg.optim.max_steps)
        if status != "FINISHED":
            tracker.finish(status)

    final = out / "checkpoints" / "final"
    export_from_engine(engine, tokenizer, final, {**export_meta, "steps": cfg.optim.max_steps}, dist.is_main)
    if dist.is_main:
        tracker.write_info(final)
        dump_config(cfg, final / "config.yaml")
        tracker.set_tags({"ldot.checkpoint": str(final.resolve())})
    tracker.finish("FINISHED")
    torch.distributed.barrier()
    return "finished", final
