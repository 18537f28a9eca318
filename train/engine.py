"""DeepSpeed engine setup: ZeRO settings from deepspeed_configs/, everything else from the typed config.

The JSON files hold ZeRO, offload and communication settings only. Batch size, optimizer, schedule,
clipping and precision are filled in here from the typed config so no hyperparameter is written twice.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import deepspeed
import torch
from torch import nn

from ldot.model import CrossEncoder, export_cross_encoder, export_dual_encoder
from ldot.train.config import EngineConfig, OptimConfig
from ldot.train.errors import ConfigError

# Keys the typed config owns; a DeepSpeed JSON that sets them would silently disagree with the run's record.
_OWNED_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "optimizer", "scheduler", "gradient_clipping", "bf16", "fp16", "torch_autocast"}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, LayerNorm weights and the logit scale (1-d tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(optim: OptimConfig, engine: EngineConfig, micro_batch: int) -> dict:
    path = Path(engine.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"engine.deepspeed_config: {path} not found")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    clash = sorted(_OWNED_KEYS & set(ds))
    if clash:
        raise ConfigError(f"{path} sets {', '.join(clash)}: these come from the training config, remove them")
    warmup = math.ceil(optim.warmup_ratio * optim.max_steps)
    ds.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            # DeepSpeed's fused Adam needs CUDA; on CPU-only ranks use torch's AdamW.
            **({} if torch.cuda.is_available() else {"torch_adam": True}),
        }},
        # Linear warm-up from 0 to lr, then linear decay to 0 at max_steps (the paper's schedule).
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": optim.max_steps, "warmup_num_steps": max(warmup, 1),
            "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_type": "linear"}},
        "bf16": {"enabled": engine.precision == "bf16"},
        # DeepSpeed runs the engine's forward under torch.autocast itself (and reduces Linear gradients in bf16)
        "torch_autocast": {"enabled": engine.precision == "amp_bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronizes the device in every engine forward and
        # step, once per micro-batch each: the step must not wait on the device (ldot.train.step).
        "timers": {"throughput": {"enabled": False}},
    })
    return ds


def check_precision(precision: str) -> None:
    """DeepSpeed refuses a precision its accelerator lacks (fp16 on a CPU without AVX512-FP16/AMX-FP16,
    bf16 on an older GPU) with a traceback from inside deepspeed.initialize: say so in one line instead."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported,
                 "amp_bf16": acc.is_bf16_supported}.get(precision)
    if supported is not None and not supported():
        hint = " (a CPU needs AVX512-FP16 or AMX-FP16)" if precision == "fp16" and acc.device_name() == "cpu" else ""
        raise ConfigError(f"engine.precision={precision}: DeepSpeed does not support {precision} on this machine's "
                          f"{acc.device_name()}{hint}; use {'bf16' if precision == 'fp16' else 'fp16'} or fp32")


def build_engine(model: nn.Module, optim: OptimConfig, engine: EngineConfig, micro_batch: int):
    check_precision(engine.precision)
    ds = deepspeed_config(optim, engine, micro_batch)
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, optim.weight_decay),
                                        config=ds)
    return eng, ds


def loss_scale(engine) -> float:
    """Current dynamic loss scale (fp16), 1.0 otherwise."""
    opt = getattr(engine, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    return 1.0


def export_from_engine(engine, tokenizer, out_dir: Path, meta: dict, is_main: bool) -> None:
    """Export the encoders (or the re-ranker); under ZeRO-3 every rank joins the gather of the partitioned weights."""
    params = list(engine.module.parameters()) if engine.zero_optimization_stage() == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if is_main:
            export = export_cross_encoder if isinstance(engine.module, CrossEncoder) else export_dual_encoder
            export(engine.module, tokenizer, out_dir, meta)
