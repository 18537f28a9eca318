"""Recall on the validation split during training; the best-AR encoders are exported to checkpoints/best.

Every rank runs the encoders (under ZeRO-3 each forward gathers weights from all ranks); rank 0
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
            export_from_engine(engine, self.tokenizer, self.best_dir, {**self.meta, "steps": step,
                                                                       "val_ar": recall["ar"]}, self.is_main)
            tracker.log_metrics({"val/best_ar": self.best}, step)
            tracker.set_tags({"ldot.best_checkpoint": str(self.best_dir.resolve()), "ldot.best_step": str(step)})
        log.info("step %d: val AR %.4f (best %.4f)", step, recall["ar"], self.best)
        return recall

    def state_dict(self) -> dict:
        return {"best_val_ar": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best_val_ar") or -1.0
