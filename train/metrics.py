"""The step records and the progress line: the only place the trainer reads values back from the device.

Each step hands over its loss as a device tensor; every `tracking.log_every` steps (and at the last)
the processor reads the window at once and records, per task, the mean loss over the window's steps
of that task, plus lr, grad norm and loss scale (as of the last step), the logit scale (as of the
last CMR step), and samples/s and tokens/s over the window. Between records the host never waits on
the device, so it can queue the next step's work while the device runs this one.

The window's losses travel in checkpoints (state_dict), so a resumed run records exactly what the
uninterrupted run would have.
"""
from __future__ import annotations

import time

import torch

from ldot.data.progress import progress_bar
from ldot.train.config import TrackingConfig
from ldot.train.engine import loss_scale
from ldot.train.step import StepStats


class MetricsProcessor:
    def __init__(self, tc: TrackingConfig, tracker, *, world: int, max_steps: int, start_step: int, is_main: bool):
        self.every, self.tracker, self.world, self.max_steps = tc.log_every, tracker, world, max_steps
        self.bar = progress_bar(total=max_steps, initial=start_step, desc="train", unit="step", disable=not is_main,
                                every_s=tc.progress_every_s)
        self.saved: dict[str, list[float]] = {}  # the window's losses restored from a checkpoint
        self._reset()

    def _reset(self) -> None:
        self.losses: dict[str, list[torch.Tensor]] = {}
        self.scale: torch.Tensor | None = None
        self.pairs, self.tokens = 0, []
        self.t0 = time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def record(self, step: int, task: str, stats: StepStats, engine, logit_scale: torch.Tensor | None) -> None:
        self.losses.setdefault(task, []).append(stats.loss)
        self.last_task = task
        if logit_scale is not None:
            self.scale = logit_scale
        self.pairs += stats.pairs
        self.tokens.append(stats.tokens)
        self.bar.update()
        if self.due(step):
            self._write(step, engine)

    def _window(self) -> dict[str, list[float]]:
        """Every task's losses of the window as floats, restored ones first (one device read for all)."""
        tasks = list(self.losses)
        values = torch.cat([torch.stack(self.losses[t]) for t in tasks]).tolist() if tasks else []
        out = {t: list(v) for t, v in self.saved.items()}
        for t in tasks:
            n = len(self.losses[t])
            out.setdefault(t, []).extend(values[:n])
            values = values[n:]
        return out

    def _write(self, step: int, engine) -> None:
        window = self._window()
        tokens = sum(int(t) for t in self.tokens)
        dt = time.perf_counter() - self.t0  # after the reads: the device has finished the window's work
        grad_norm = engine.get_global_grad_norm()
        record = {f"loss/{t}": float(torch.tensor(v, dtype=torch.float32).mean()) for t, v in window.items()}
        record.update({"lr": engine.get_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "loss_scale": loss_scale(engine),
                       # local counts x world: exact for fixed-size batches, an estimate under a token budget
                       "samples_per_s": self.pairs * self.world / dt, "tokens_per_s": tokens * self.world / dt})
        if self.scale is not None:
            record["logit_scale"] = float(self.scale)
        self.tracker.log_metrics(record, step)
        # the last step's task and its window's mean loss
        self.bar.set_postfix(ordered_dict={"task": self.last_task, "loss": f"{record[f'loss/{self.last_task}']:.4f}",
                                           "lr": f"{record['lr']:.2e}", "samples/s": f"{record['samples_per_s']:.1f}"},
                             refresh=False)
        self.saved = {}
        self._reset()

    def state_dict(self) -> dict:
        """The window's losses so far (read from the device: called at checkpoints only)."""
        return {"losses": self._window()}

    def load_state_dict(self, state: dict) -> None:
        self.saved = {t: [float(x) for x in v] for t, v in (state or {}).get("losses", {}).items()}

    def close(self) -> None:
        self.bar.close()
