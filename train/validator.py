"""Recall on the validation split during training; the best-AR encoders are exported to checkpoints/best.
For task=rerank, the list loss on the validation split's mined lists instead (RerankValidator); the
lowest-loss re-ranker is exported.

Every rank runs the model (under ZeRO-3 each forward gathers weights from all ranks); rank 0
records. The split is loaded once. Runs every `eval.every_steps` steps and at the last step.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ldot.train.config import EvalConfig
from ldot.train.engine import export_from_engine

log = logging.getLogger("ldot.train")


class Validator:
    def __init__(self, cfg: EvalConfig, val_dir: str, tokenizer, *, max_text_len: int, best_dir: Path,
                 export_meta: dict, max_steps: int, is_main: bool):
        from ldot.data.loader import load_eval_split

        self.cfg, self.tokenizer, self.max_text_len, self.is_main = cfg, tokenizer, max_text_len, is_main
        self.split = load_eval_split(val_dir)
        self.best_dir, self.meta, self.max_steps, self.best = best_dir, export_meta, max_steps, -1.0

    def due(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0 or step == self.max_steps

    def maybe_run(self, engine, step: int, tracker) -> dict | None:
        return self.run(engine, step, tracker) if self.due(step) else None

    def run(self, engine, step: int, tracker) -> dict:
        from ldot.eval.recall import evaluate_split

        recall = evaluate_split(engine.module, self.split, self.tokenizer, ks=self.cfg.ks,
                                batch_size=self.cfg.batch_size, max_text_len=self.max_text_len,
                                device=next(engine.module.parameters()).device, progress=False)
        tracker.log_metrics({f"val/{k}": v for k, v in recall.items()}, step)
        if recall["ar"] > self.best:
            self.best = recall["ar"]
            self._export_best(engine, step, tracker, "ar")
        log.info("step %d: val AR %.4f (best %.4f)", step, recall["ar"], self.best)
        return recall

    def _export_best(self, engine, step: int, tracker, name: str) -> None:
        """Export the model as checkpoints/best (self.best is its val/<name>) and record where it is."""
        export_from_engine(engine, self.tokenizer, self.best_dir, {**self.meta, "steps": step, f"val_{name}": self.best},
                           self.is_main)
        tracker.log_metrics({f"val/best_{name}": self.best}, step)
        tracker.set_tags({"ldot.best_checkpoint": str(self.best_dir.resolve()), "ldot.best_step": str(step)})

    def state_dict(self) -> dict:
        return {"best_val_ar": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best_val_ar") or -1.0


class RerankValidator(Validator):
    """task=rerank: val/list_loss and val/list_top1 over every data.val image's two lists, drawn from
    rerank.val_mined as the training lists are from rerank.mined (train/rerank.py, list_metrics); the
    lowest list loss is exported to checkpoints/best. The loss rather than recall: recall after
    re-ranking needs the first stage's top M of every query, a full `ldot eval recall --rerank`."""

    def __init__(self, cfg: EvalConfig, val_dir: str, tokenizer, *, rerank, seed: int, batch_images: int,
                 max_text_len: int, best_dir: Path, export_meta: dict, max_steps: int, is_main: bool):
        from ldot.data.loader import load_eval_split
        from ldot.eval.image_store import ImageStore
        from ldot.train.rerank import MinedNegatives, RerankBatches

        self.cfg, self.tokenizer, self.is_main, self.batch_images = cfg, tokenizer, is_main, batch_images
        split = load_eval_split(val_dir)
        mined = MinedNegatives(rerank.val_mined, split, key="rerank.val_mined", data_key="data.val")
        self.lists = RerankBatches(None, mined, ImageStore(val_dir, split.keys), tokenizer, negatives=rerank.negatives,
                                   from_top=rerank.from_top, seed=seed, max_text_len=max_text_len, random=rerank.random)
        self.rows = list(range(split.num_images))
        self.best_dir, self.meta, self.max_steps, self.best = best_dir, export_meta, max_steps, float("inf")

    def run(self, engine, step: int, tracker) -> dict:
        from ldot.train.rerank import list_metrics

        metrics = list_metrics(engine.module, self.lists, self.rows, batch_images=self.batch_images)
        tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
        if metrics["list_loss"] < self.best:
            self.best = metrics["list_loss"]
            self._export_best(engine, step, tracker, "list_loss")
        log.info("step %d: val list loss %.4f, top-1 %.3f (best loss %.4f)", step, metrics["list_loss"],
                 metrics["list_top1"], self.best)
        return metrics

    def state_dict(self) -> dict:
        return {"best_val_list_loss": self.best}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best_val_list_loss")
        self.best = float("inf") if best is None else best
