"""One optimizer step: its micro-batches through the task's objective, the engine's backward and step.

Nothing here reads a value back from the device: the loss stays a device tensor and the counts come
from the host copies of the batches, so the host can queue the next step while the device works on
this one (the trainer reads the metrics every `tracking.log_every` steps; ldot.train.metrics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldot.train.objectives import Objectives, mask_generator

_FLOAT_KEYS = ("img_feat", "img_pos", "img_cls", "hard_img_feat", "hard_img_pos")


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    for k in _FLOAT_KEYS:
        if k in out:
            out[k] = out[k].to(float_dtype)
    return out


@dataclass
class StepStats:
    loss: torch.Tensor  # mean over the micro-batches, on the device, detached
    pairs: int          # this rank's image-caption pairs
    tokens: torch.Tensor  # this rank's tokens + regions (padding excluded): a 0-d tensor where the batch was
    # made (the loader's host copy, so reading it costs no device sync; read at log steps only)


def train_step(engine, objectives: Objectives, task: str, micro_batches, *, world: int, seed: int, step: int,
               rank: int, device: torch.device, float_dtype: torch.dtype, rank_sizes=None) -> StepStats:
    """One optimizer step over `grad_accum` micro-batches drawn from `micro_batches`.

    rank_sizes(local_pairs) -> every rank's pairs this micro-step, for CMR's cross-rank gather; None
    lets the loss ask the ranks itself (a collective whose result the host must read)."""
    loss_sum, pairs, tokens = None, 0, None
    n = engine.gradient_accumulation_steps()
    for micro in range(n):
        host = next(micro_batches)
        local = int(host["input_ids"].shape[0])
        batch = to_device(host, device, float_dtype)
        sizes = rank_sizes(local) if (task == "cmr" and rank_sizes is not None) else None
        loss = objectives(task, batch, mask_generator(device, seed, step, rank, micro), sizes=sizes)
        # CMR's backward hands each rank its share of the global-batch gradient and DeepSpeed averages
        # over ranks, so scale by the world size to get the sum. The other tasks are per-rank means,
        # which DeepSpeed's average combines as they are.
        engine.backward(loss * world if task == "cmr" else loss)
        engine.step()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        pairs += local
        count = sum(host[k].sum() for k in ("attention_mask", "img_mask", "hard_attention_mask", "hard_img_mask")
                    if k in host)
        tokens = count if tokens is None else tokens + count
    return StepStats(loss=loss_sum.float() / n, pairs=pairs, tokens=tokens)
