"""DeepSpeed config assembly: the typed config owns batch, optimizer, schedule and precision."""
import json

import pytest

from ldot.train.config import EngineConfig, OptimConfig
from ldot.train.engine import deepspeed_config, param_groups
from ldot.train.errors import ConfigError


def test_config_filled_from_typed_sections():
    ds = deepspeed_config(OptimConfig(lr=2e-5, max_steps=100, warmup_ratio=0.1, grad_accum=3),
                          EngineConfig(deepspeed_config="deepspeed_configs/zero3.json", precision="bf16"), 16)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and not ds["torch_autocast"]["enabled"]
    sched = ds["scheduler"]["params"]
    assert sched["warmup_num_steps"] == 10 and sched["total_num_steps"] == 100 and sched["warmup_max_lr"] == 2e-5
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98]


def test_amp_bf16_is_deepspeeds_torch_autocast_over_float32_weights():
    ds = deepspeed_config(OptimConfig(), EngineConfig(precision="amp_bf16"), 8)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_precision_in_deepspeed_json_is_refused(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 1}, "torch_autocast": {"enabled": True}}))
    with pytest.raises(ConfigError, match="torch_autocast"):
        deepspeed_config(OptimConfig(), EngineConfig(deepspeed_config=str(p)), 8)


def test_batch_in_deepspeed_json_is_refused(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(OptimConfig(), EngineConfig(deepspeed_config=str(p)), 8)


def test_no_weight_decay_on_biases_and_norms():
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.01)
    assert [p.shape for p in decay["params"]] == [(4, 3)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_a_precision_the_device_lacks_is_one_line():
    """DeepSpeed on a CPU without AVX512-FP16/AMX-FP16 has no fp16 (deepspeed.initialize raises deep in its
    sanity check); the trainer refuses it as a bad config instead. Where fp16 exists, it is accepted."""
    from deepspeed.accelerator import get_accelerator

    from ldot.train.engine import check_precision

    check_precision("fp32")
    if get_accelerator().is_fp16_supported():
        check_precision("fp16")
    else:
        with pytest.raises(ConfigError, match=r"^engine.precision=fp16: DeepSpeed does not support fp16 on this "
                                              r"machine's \w+.*; use bf16 or fp32$"):
            check_precision("fp16")
