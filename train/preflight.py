"""Checks every path a training job will need before anything heavy is imported or built.

A job that would fail after minutes of start-up (or, for the output directory, at its first
checkpoint) fails here in a fraction of a second with one line naming the key and the path. Imports
only the standard library: `ldot train` and slurm's batch-node check both call it before torch.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ldot.train.config import TrainConfig
from ldot.train.errors import ConfigError

MANIFEST = "manifest.json"  # ldot.data.schema.MANIFEST, not imported: that module pulls in webdataset
EXPORT_META = "ldot.json"   # ldot.model.EXPORT_META, likewise (transformers)
CROSS_FORMAT = "ldot-cross-encoder"  # ldot.model.cross_encoder.CROSS_FORMAT, likewise


def check_dataset(key: str, path: str | None) -> None:
    if not path:
        return
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{key}: no dataset directory at {p}")
    manifest = p / MANIFEST
    if not manifest.is_file():
        raise ConfigError(f"{key}: {p} is not a dataset directory (no {MANIFEST}; make one with `ldot data`)")
    try:
        json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {manifest} is not readable JSON: {exc}") from None


def check_export(key: str, path: str | None) -> None:
    if path and not (Path(path) / EXPORT_META).is_file():
        raise ConfigError(f"{key}: {path} is not an exported ldot checkpoint (no {EXPORT_META})")


def check_writable_dir(key: str, path: str | os.PathLike) -> Path:
    """Creates `path` if needed and proves a file can be written there; returns it resolved."""
    p = Path(path).expanduser()
    for parent in [p, *p.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}: {p} cannot be created: {parent} is a file")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".ldot-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: {p} is not writable ({exc.strerror or exc})") from None
    return p.resolve()


def check_rerank_layers(init_from: str | None, layers: int | None) -> None:
    """rerank.layers below the layer count of a trained re-ranker that rerank.init_from names would cut off what its
    ITM head reads (rerank-demo.yaml's layers: 1 under a 2-layer export did, silently): refused, not obeyed."""
    if not init_from or layers is None:
        return
    try:
        meta = json.loads((Path(init_from) / EXPORT_META).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"rerank.init_from: {Path(init_from) / EXPORT_META} is not readable JSON: {exc}") from None
    trained = meta.get("layers") if isinstance(meta, dict) and meta.get("format") == CROSS_FORMAT else None
    if isinstance(trained, int) and layers < trained:
        raise ConfigError(f"rerank.layers={layers}: rerank.init_from={init_from} is a trained {trained}-layer re-ranker, "
                          f"whose ITM head reads its last layer; set rerank.layers={trained} (or null) to start from all "
                          f"of it")


def check_paths(cfg: TrainConfig) -> None:
    """Every input path of the job exists and is what it should be; the output directory is writable."""
    for i, (path, _) in enumerate(cfg.data.train_sets({})):
        check_dataset("data.train" if isinstance(cfg.data.train, str) else f"data.train[{i}].path", path)
    check_dataset("data.val", cfg.data.val)
    # a global batch that cannot divide over the launcher's ranks (or, outside one, the accumulation steps)
    cfg.data.micro_batch(int(os.environ.get("WORLD_SIZE", "1")), cfg.optim.grad_accum)
    check_export("model.init_from", cfg.model.init_from)
    if cfg.task == "rerank":
        check_export("rerank.init_from", cfg.rerank.init_from)
        check_rerank_layers(cfg.rerank.init_from, cfg.rerank.layers)
        for key in ("mined", "val_mined"):
            if getattr(cfg.rerank, key) and not Path(getattr(cfg.rerank, key)).is_dir():
                raise ConfigError(f"rerank.{key}: no `ldot eval mine` output directory at {getattr(cfg.rerank, key)}")
        if cfg.rerank.uniter and not Path(cfg.rerank.uniter).is_file():
            raise ConfigError(f"rerank.uniter: {cfg.rerank.uniter} not found")
    for key in ("image_init", "text_init"):
        if getattr(cfg.model, key) and not Path(getattr(cfg.model, key)).is_file():
            raise ConfigError(f"model.{key}: {getattr(cfg.model, key)} not found")
    if cfg.model.tokenizer and not Path(cfg.model.tokenizer).exists():
        raise ConfigError(f"model.tokenizer: {cfg.model.tokenizer} not found")
    if (not cfg.model.text_init and cfg.model.text_encoder != "minilm"
            and not (Path(cfg.model.text_encoder) / "config.json").is_file()):
        raise ConfigError(f"model.text_encoder: {cfg.model.text_encoder} is not a Hugging Face model directory "
                          "(no config.json)")
    if not Path(cfg.engine.deepspeed_config).is_file():
        raise ConfigError(f"engine.deepspeed_config: {cfg.engine.deepspeed_config} not found")
    check_writable_dir("output_dir", cfg.output_dir)
