"""The training recipe: build data, model, engine, tracker and the parts that keep their own time,
then run the steps and export the encoders.

    trainer = Trainer(cfg, resume="auto")
    outcome, path = trainer.train()   # ("finished", export dir) or ("preempted", checkpoint dir)

Each part receives its own config section and decides when it acts: the metrics processor records
every `tracking.log_every` steps, the validator runs every `eval.every_steps`, the checkpoint manager
saves every `checkpoint.every_steps`, and the preemption watch answers every step.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldot.data.loader import TrainLoader
from ldot.data.mixing import MixedLoader
from ldot.data.schema import read_manifest
from ldot.distributed import init_distributed
from ldot.train.checkpoint import CheckpointManager
from ldot.train.config import TrainConfig, dump_config, to_dict
from ldot.train.engine import build_engine, export_from_engine
from ldot.train.errors import ConfigError
from ldot.train.hard_negatives import FILE as HARD_NEGATIVES_FILE, HardNegativeBatches, HardNegatives
from ldot.train.job_tracking import JobRecord, start_job_tracking
from ldot.train.metrics import MetricsProcessor
from ldot.train.mixing import MixSampler
from ldot.train.model_setup import build_cross_encoder, build_dual_encoder
from ldot.train.objectives import Objectives, TaskSampler
from ldot.train.preemption import PreemptionWatch
from ldot.train.rerank import rerank_batches
from ldot.train.step import train_step
from ldot.train.validator import RerankValidator, Validator

log = logging.getLogger("ldot.train")

# the dtype of a batch's float inputs (amp_bf16: float32, autocast casts inside the forward)
PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "amp_bf16": torch.float32}


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.dist = dist = init_distributed()
        # First, so that a preemption signal during the minutes of set-up below is not fatal: it is
        # honoured at the first step boundary.
        self.preemption = PreemptionWatch(dist)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.out = out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.max_steps = cfg.optim.max_steps

        # data and model
        sets = cfg.data.train_sets(cfg.pretrain.ratios())
        self.mixed = isinstance(cfg.data.train, list)
        manifest = self._check_sets(sets)
        micro = cfg.data.micro_batch(dist.world_size, cfg.optim.grad_accum)
        pretrain, rerank = cfg.task == "pretrain", cfg.task == "rerank"
        ratios = cfg.pretrain.ratios() if pretrain else {"rerank" if rerank else "cmr": 1.0}
        if self.mixed:  # every task some set trains; the sets' own ratios are drawn by self.tasks
            ratios = {t: sum(r[t] for _, r in sets) for t in ratios}
        num_classes = manifest.class_dim or 0
        if ratios.get("mrckl", 0) > 0 and not num_classes:
            raise ConfigError(f"{cfg.data.train} has no class distributions (cls.npy) for MRC-kl: set pretrain.mrckl=0")
        if rerank:
            self.tokenizer, model = build_cross_encoder(cfg.model, cfg.rerank, feature_dim=manifest.feature_dim)
        else:
            self.tokenizer, model = build_dual_encoder(cfg.model, cfg.loss, feature_dim=manifest.feature_dim,
                                                       pretrain=pretrain, num_classes=num_classes)
        model.to(dist.device)
        self.engine, ds_config = build_engine(model, cfg.optim, cfg.engine, micro)
        loaders = [TrainLoader(path, self.tokenizer, batch_size=None if cfg.data.token_budget else micro,
                               token_budget=cfg.data.token_budget, max_text_len=cfg.data.max_text_len,
                               seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                               num_workers=cfg.data.num_workers, on_error=cfg.data.on_error,
                               with_cls=(set_ratios if self.mixed else ratios).get("mrckl", 0) > 0)
                   for path, set_ratios in sets]
        self.loader = MixedLoader(loaders) if self.mixed else loaders[0]
        if rerank:  # each image of a batch becomes its two query lists of mined negatives
            self.loader = rerank_batches(self.loader, cfg.rerank, cfg.data.train, self.tokenizer, seed=cfg.seed,
                                         max_text_len=cfg.data.max_text_len)
        # the forward through the engine: DeepSpeed's per-micro-batch bookkeeping (ldot.train.objectives)
        self.objectives = Objectives(self.engine.module, self.tokenizer, mask_prob=cfg.pretrain.mask_prob,
                                     forward=self.engine, region_reduction=cfg.pretrain.region_loss_reduction)
        self.tasks = MixSampler([r for _, r in sets], cfg.seed) if self.mixed else TaskSampler(ratios, cfg.seed)
        self.hard = None
        if cfg.hard_negatives.num_hard_negatives:  # each batch's pairs with their mined negatives
            epoch = self.loader.batches_per_epoch
            self.hard = HardNegatives(cfg.hard_negatives, cfg.data.train, self.tokenizer,
                                      max_text_len=cfg.data.max_text_len, seed=cfg.seed,
                                      steps_per_epoch=None if epoch is None else epoch // cfg.optim.grad_accum)
            self.loader = HardNegativeBatches(self.loader, self.hard)
        self.float_dtype = PRECISION[cfg.engine.precision]
        self.export_meta = {"feature_dim": manifest.feature_dim, "max_text_len": cfg.data.max_text_len}

        # resume
        self.checkpoints = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last, dist.rank,
                                             every_steps=cfg.checkpoint.every_steps, max_steps=self.max_steps)
        tag = self.checkpoints.resolve(resume)
        trainer_state: dict = {}
        self.start_step = 0
        if tag is not None:
            trainer_state, loader_state = self.checkpoints.load(self.engine, tag)
            self.loader.load_state_dict(loader_state)
            self.start_step = trainer_state["step"]
            if self.hard:
                self.hard.load(self.checkpoints.dir / tag)
            log.info("resumed from %s at step %d", self.checkpoints.dir / tag, self.start_step)

        # records: rank 0 starts (or continues) the run; the other ranks record only their system metrics
        if dist.is_main:
            dump_config(cfg, out / "config.yaml")
        job = JobRecord(config=to_dict(cfg), task=cfg.task, ds_config=ds_config,
                        deepspeed_source=Path(cfg.engine.deepspeed_config),
                        datasets={**({f"train{i}": p for i, (p, _) in enumerate(sets)} if self.mixed else
                                     {"train": cfg.data.train}), "val": cfg.data.val},
                        num_train_images=self.num_train_images, world_size=dist.world_size)
        self.tracker = start_job_tracking(cfg.tracking, out, dist, job, hold_metrics=bool(cfg.checkpoint.every_steps),
                                          resuming=tag is not None)
        if tag is not None:
            self.tracker.replay(trainer_state.get("records", []))
        self.metrics = MetricsProcessor(cfg.tracking, self.tracker, world=dist.world_size, max_steps=self.max_steps,
                                        start_step=self.start_step, is_main=dist.is_main)
        self.metrics.load_state_dict(trainer_state.get("metrics"))
        self.validator = None
        if cfg.eval.every_steps and rerank:
            self.validator = RerankValidator(cfg.eval, cfg.data.val, self.tokenizer, rerank=cfg.rerank, seed=cfg.seed,
                                             batch_images=cfg.data.batch_size, max_text_len=cfg.data.max_text_len,
                                             best_dir=out / "checkpoints" / "best", export_meta=self.export_meta,
                                             max_steps=self.max_steps, is_main=dist.is_main)
        elif cfg.eval.every_steps:
            self.validator = Validator(cfg.eval, cfg.data.val, self.tokenizer, max_text_len=cfg.data.max_text_len,
                                       best_dir=out / "checkpoints" / "best", export_meta=self.export_meta,
                                       max_steps=self.max_steps, is_main=dist.is_main)
        if self.validator:
            self.validator.load_state_dict(trainer_state)

    def _check_sets(self, sets: list[tuple[str, dict]]):
        """The first training set's manifest, once every set is found to fit it (feature dim; cls.npy where
        a set trains MRC-kl)."""
        manifests = [read_manifest(path) for path, _ in sets]
        self.num_train_images = sum(m.num_samples for m in manifests)
        for (path, ratios), m in zip(sets, manifests):
            if m.feature_dim != manifests[0].feature_dim:
                raise ConfigError(f"data.train: {path} has {m.feature_dim}-d features, {sets[0][0]} "
                                  f"{manifests[0].feature_dim}-d")
            if self.mixed and ratios.get("mrckl", 0) > 0 and not m.class_dim:
                raise ConfigError(f"data.train: {path} has no class distributions (cls.npy) for MRC-kl: set its mrckl: 0")
        classes = {m.class_dim for (_, r), m in zip(sets, manifests) if r.get("mrckl", 0) > 0}
        if len(classes) > 1:
            raise ConfigError(f"data.train: the sets that train MRC-kl have {sorted(classes)} classes: one head needs one")
        # the model's MRC-kl head is sized by a set that trains it
        return next((m for (_, r), m in zip(sets, manifests) if r.get("mrckl", 0) > 0), manifests[0])

    def rank_sizes(self, local: int) -> list[int]:
        """Every rank's pairs this micro-step, for CMR's gather: known on the host for fixed batches, else
        exchanged on the host (token budgets make local batch sizes differ)."""
        if not self.cfg.data.token_budget:
            return [local] * self.dist.world_size
        return self.dist.all_gather_int(local)

    def train(self) -> tuple[str, Path]:
        batches = iter(self.loader)
        status = "FAILED"
        try:
            for step in range(self.start_step + 1, self.max_steps + 1):
                self.step(step, batches)
                # Metrics are sent after the checkpoint that covers them: a crash before it loses them with
                # the steps, which the resumed run retrains and records once; a crash after it is mended
                # by the replay of the records the checkpoint holds.
                if self.preemption.any_rank_requested():
                    return "preempted", self.preempt(step)
                if self.checkpoints.due(step):
                    self.save(step)
                    self.tracker.flush()
            status = "FINISHED"
        finally:
            self.metrics.close()
            skipped = getattr(self.loader, "skipped", None) or {}
            if skipped:
                self.tracker.log_metrics({f"skipped/{k}": v for k, v in skipped.items()}, self.max_steps)
            if status != "FINISHED":
                self.tracker.finish(status)
        return "finished", self.finish()

    def step(self, step: int, batches) -> None:
        """One optimizer step of the step's task, then whatever of recording and validation is due."""
        if self.hard and self.hard.due(step):
            world = self.dist.world_size
            self.hard.mine(self.engine.module, step, device=self.dist.device, sharded=world > 1,
                           distributed=world > 1 and self.engine.zero_optimization_stage() < 3)
        if self.mixed:  # the step's training set and task (ldot.train.mixing)
            which, task = self.tasks.draw(step)
            batches = batches.select(which)
        else:
            task = self.tasks.task_for(step)
        stats = train_step(self.engine, self.objectives, task, batches, world=self.dist.world_size,
                           seed=self.cfg.seed, step=step, rank=self.dist.rank, device=self.dist.device,
                           float_dtype=self.float_dtype, rank_sizes=self.rank_sizes)
        self.metrics.record(step, task, stats, self.engine, self.objectives.last_scale if task == "cmr" else None)
        if self.validator:
            self.validator.maybe_run(self.engine, step, self.tracker)

    def save(self, step: int) -> Path:
        # The step records since the last checkpoint travel with it: a crash after the save but before
        # they reach MLflow is mended by the replay on resume.
        state = {"step": step, "config": to_dict(self.cfg), "records": self.tracker.pending(),
                 "metrics": self.metrics.state_dict(), **(self.validator.state_dict() if self.validator else {})}
        lists = self.hard.state_bytes() if self.hard else None
        return self.checkpoints.save(self.engine, step, state, self.loader.state_dict(),
                                     files={HARD_NEGATIVES_FILE: lists} if lists else None)

    def preempt(self, step: int) -> Path:
        path = self.save(step)
        self.tracker.finish("KILLED")
        log.warning("preempted: checkpoint %s written at step %d", path, step)
        torch.distributed.barrier()  # leave together: a launcher may stop the others at the first exit
        return path

    def finish(self) -> Path:
        final = self.out / "checkpoints" / "final"
        export_from_engine(self.engine, self.tokenizer, final, {**self.export_meta, "steps": self.max_steps},
                           self.dist.is_main)
        if self.dist.is_main:
            self.tracker.write_info(final)
            dump_config(self.cfg, final / "config.yaml")
            self.tracker.set_tags({"ldot.checkpoint": str(final.resolve())})
        self.tracker.finish("FINISHED")
        torch.distributed.barrier()
        return final


def train(cfg: TrainConfig, resume: str | None = None) -> tuple[str, Path]:
    """Runs the configured job. Returns ("finished", export dir) or ("preempted", checkpoint dir)."""
    return Trainer(cfg, resume).train()
