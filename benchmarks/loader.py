"""Loader benchmark: samples/s of TrainLoader (0, 1, 2 workers) against what the demo trainer consumes, and the
padding efficiency of token-budget batches against fixed-size ones. Appends a "## loader" run to RESULTS.md.

    PYTHONPATH=. python benchmarks/loader.py [--images 1000] [--no-record]

Data: Flickr30k-shaped samples (36 × 2048 float16 features, real Flickr30k training captions from
../shared/data/flickr30k, bert-base-cased tokenizer), written to a temporary directory. The trainer
figure is the demo model (train/configs/demo.yaml) doing forward + CMR loss + backward + AdamW step on
demo-shaped batches (49 × 1280) in this process: compute only, an upper bound on what a rank consumes.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from ldot.data.convert.captions import multi30k_files, read_multi30k  # noqa: E402  (after the path fix)
from ldot.data.loader import TrainLoader  # noqa: E402
from ldot.data.writer import DatasetWriter  # noqa: E402

from results import append_run, device  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def write_data(out: Path, captions: list[list[str]], *, regions, dim: int, seed: int = 0) -> Path:
    """Random features (fixed or variable region counts) paired with real captions."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, feature_dim=dim, source="benchmark", split="train", shard_size=250, command="benchmark",
                       verify=False) as w:
        for k, caps in enumerate(captions):
            n = regions if isinstance(regions, int) else int(rng.integers(regions[0], regions[1] + 1))
            xy = rng.uniform(0, 0.6, (n, 2)).astype(np.float32)
            box = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (n, 2)).astype(np.float32)], 1)
            w.write(rng.standard_normal((n, dim)).astype(np.float16), box,
                    {"image_id": str(k), "captions": caps, "split": "train", "source": "benchmark"})
    return out


def loader_rate(data: Path, tokenizer, *, batch_size: int, workers: int, batches: int) -> float:
    """Samples/s after warm-up (worker start and the first shuffle buffer are not counted)."""
    loader = TrainLoader(data, tokenizer, batch_size=batch_size, num_workers=workers, shuffle_buffer=256)
    it = iter(loader)
    for _ in range(3):
        next(it)
    t = time.perf_counter()
    n = sum(next(it)["input_ids"].shape[0] for _ in range(batches))
    return n / (time.perf_counter() - t)


def trainer_rate(data: Path, steps: int) -> tuple[float, int]:
    """Demo model, one process: forward + CMR + backward + AdamW on demo-shaped batches; (samples/s, batch)."""
    from ldot.train.config import load_config
    from ldot.train.model_setup import build_dual_encoder
    from ldot.train.objectives import Objectives

    cfg = load_config(REPO / "train" / "configs" / "demo.yaml")
    tokenizer, model = build_dual_encoder(cfg.model, cfg.loss, feature_dim=1280)
    objectives = Objectives(model, tokenizer)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    it = iter(TrainLoader(data, tokenizer, batch_size=cfg.data.batch_size, max_text_len=cfg.data.max_text_len))
    batches = [{k: v for k, v in next(it).items() if isinstance(v, torch.Tensor)} for _ in range(steps + 2)]
    for i, batch in enumerate(batches):
        if i == 2:
            t = time.perf_counter()
        optim.zero_grad()
        objectives("cmr", batch, None).backward()
        optim.step()
    return steps * cfg.data.batch_size / (time.perf_counter() - t), cfg.data.batch_size


def padding(data: Path, tokenizer, *, budget: int, samples: int, buffer: int) -> tuple[float, float, float]:
    """(token-budget efficiency, fixed-size efficiency at the same mean batch size, that mean size)."""
    loader = TrainLoader(data, tokenizer, batch_size=None, token_budget=budget, bucket_buffer=buffer)
    tb = list(itertools.islice(iter(loader), max(1, samples * 2 // buffer)))
    mean = max(1, round(np.mean([b["input_ids"].shape[0] for b in tb])))
    fixed = list(itertools.islice(iter(TrainLoader(data, tokenizer, batch_size=mean)), len(tb)))

    def eff(bs):
        real = sum(int(b["attention_mask"].sum() + b["img_mask"].sum()) for b in bs)
        slots = sum(b["input_ids"].shape[0] * (b["input_ids"].shape[1] + b["img_mask"].shape[1]) for b in bs)
        return real / slots

    return eff(tb), eff(fixed), mean


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="Flickr30k training images to shape the data")
    p.add_argument("--batch-size", type=int, default=96, help="loader batch (the paper's fine-tuning batch)")
    p.add_argument("--batches", type=int, default=15, help="timed batches per configuration")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--token-budget", type=int, default=10240, help="tokens + regions per batch (the paper's)")
    p.add_argument("--trainer-steps", type=int, default=5)
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    from transformers import BertTokenizerFast

    if not (SHARED / "flickr30k").is_dir():
        sys.exit(f"needs the real captions in {SHARED / 'flickr30k'}")
    tokenizer = BertTokenizerFast(vocab_file=str(SHARED / "vocab" / "bert-base-cased-vocab.txt"), do_lower_case=False)
    images, files = multi30k_files(SHARED / "flickr30k" / "train")
    captions = [r.captions for r in read_multi30k(images, files)[:args.images]]

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        f30k = write_data(tmp / "f30k", captions, regions=36, dim=2048)
        demo = write_data(tmp / "demo", captions[:400], regions=49, dim=1280)
        varied = write_data(tmp / "varied", captions, regions=(10, 100), dim=64)
        notes.append(f"data written in {time.perf_counter() - t:.1f}s ({args.images} images)")
        trainer, trainer_batch = trainer_rate(demo, args.trainer_steps)
        demo_loader = loader_rate(demo, tokenizer, batch_size=trainer_batch, workers=0, batches=args.batches)
        for w in args.workers:
            rate = loader_rate(f30k, tokenizer, batch_size=args.batch_size, workers=w, batches=args.batches)
            rows.append(("Flickr30k-shaped, 36 × 2048", w, args.batch_size, rate))
        rows.append(("demo-shaped, 49 × 1280", 0, trainer_batch, demo_loader))
        pad_rows = []
        for name, data in (("Flickr30k-shaped, 36 regions", f30k), ("detector-like, 10–100 regions", varied)):
            tb, fixed, mean = padding(data, tokenizer, budget=args.token_budget, samples=args.images, buffer=512)
            pad_rows.append((name, tb, fixed, mean))

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"### {stamp} · {device(gpu=False)}", "",
           f"`PYTHONPATH=. python {shlex.join(['benchmarks/loader.py', *sys.argv[1:]])}` — one rank, fixed-size "
           f"batches; trainer = demo model forward + CMR + backward + AdamW, batch {trainer_batch}, one process: "
           f"**{trainer:.0f} samples/s**.", "",
           "| data | workers | batch | loader samples/s | loader / trainer |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {d} | {w} | {b} | {r:,.0f} | {r / trainer:.1f}× |" for d, w, b, r in rows]
    out += ["", f"Padding efficiency (real tokens + regions / padded slots), token budget {args.token_budget} "
                "with length bucketing (buffer 512) against fixed-size batches of the same mean size:", "",
            "| data | token budget | fixed size | mean batch | gain |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {n} | {tb:.1%} | {fx:.1%} | {m} | {tb / fx:.2f}× |" for n, tb, fx, m in pad_rows]
    out += ["", *[f"- {n}" for n in notes]]
    text = "\n".join(out)
    print(text)
    if not args.no_record:
        append_run("loader", text)


if __name__ == "__main__":
    main()
