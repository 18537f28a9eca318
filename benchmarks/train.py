"""Training throughput: a plain torch loop against DeepSpeed ZeRO-1/2/3 on the same model and batch, eager and
with regional torch.compile, from device-resident synthetic batches and from the real loader.

    python benchmarks/train.py                          # CPU: demo-size model, 2 ranks, fp32
    python benchmarks/train.py --size paper --precision bf16 --nproc 1 --batch 128 1024 --compile both
    python benchmarks/train.py --size paper --precision bf16 --nproc 1 \\
        --runs ddp@128 zero1+compile@128 zero1+compile+loader@128 --profile-dir out/traces

A run is ENGINE[+compile][+loader]@PAIRS_PER_RANK: ENGINE is ddp (the plain loop) or zero0..zero3 (a
deepspeed_configs/ file); +compile applies model.compile (regional torch.compile: each encoder layer and
head); +loader feeds the step from ldot.data.loader.TrainLoader reading synthetic shards of the model's
shape written to local disk first (captions of 8-30 words tokenized on the fly, region features from
disk), so the figure is what a job gets; without it the batch is made once on the device (the model's
step alone). --runs lists runs; otherwise they are --engines x --batch x --compile (off, on or both).

Both sides run the trainer's own pieces: the DualEncoder (SDPA attention, --attention), the cross-rank CMR
loss (kernels/), and for DeepSpeed ldot.train.engine.build_engine + ldot.train.step.train_step with the
forward through the engine, as the Trainer does. Each run's result is written as soon as it is measured
(a run that fails is reported, the others go on). --profile-dir saves a torch.profiler trace of one
step of each run (after the timed steps; rank 0) as RUN.json.gz, Chrome's trace format
(chrome://tracing or https://ui.perfetto.dev). Prints a Markdown table of samples/s with the ratio
against the plain loop of the same batch and compile setting (and model FLOPs utilization on GPU) and
appends it, with device, date and command, to benchmarks/RESULTS.md. --grad-checkpointing turns on the
encoders' activation checkpointing (model.grad_checkpointing); the "activations" column counts the bytes
autograd holds for the backward after one rank's forward (saved-tensor hooks, parameters excluded),
which any device can measure.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from results import append_run, bf16_peak_tflops  # noqa: E402

SIZES = {
    # hidden, layers, heads, ffn, vocab, image layers, feature dim, regions, text tokens
    "demo": dict(hidden=384, layers=6, heads=12, ffn=1536, vocab=30522, image_layers=2, feat=1280, regions=49, text=24),
    "paper": dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=28996, image_layers=12, feat=2048, regions=36, text=32),
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=128, vocab=2000, image_layers=1, feat=32, regions=6, text=12),
}
ENGINES = ("ddp", "zero0", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class Run:
    engine: str
    batch: int
    compile: bool = False
    loader: bool = False

    @property
    def name(self) -> str:
        return f"{self.engine}{'+compile' if self.compile else ''}{'+loader' if self.loader else ''}@{self.batch}"

    @classmethod
    def parse(cls, spec: str) -> "Run":
        m = re.fullmatch(r"(\w+)((?:\+(?:compile|loader))*)@(\d+)", spec)
        if not m or m[1] not in ENGINES:
            raise SystemExit(f"--runs {spec!r}: expected ENGINE[+compile][+loader]@PAIRS, ENGINE one of {ENGINES}")
        flags = m[2].split("+")
        return cls(m[1], int(m[3]), "compile" in flags, "loader" in flags)


def model_flops_per_pair(s: dict) -> float:
    """Training FLOPs (3x forward) per image-caption pair: projections and FFN 24*S*H^2, attention 4*S^2*H
    per layer, plus the region feature projection."""
    h = s["hidden"]

    def encoder(seq, layers):
        return layers * (24 * seq * h * h + 4 * seq * seq * h)

    fwd = encoder(s["text"], s["layers"]) + encoder(s["regions"] + 1, s["image_layers"]) + 2 * s["regions"] * s["feat"] * h
    return 3.0 * fwd


def build_model(s: dict, seed: int, attention: str = "sdpa"):
    import torch
    from transformers import BertConfig, BertModel

    from ldot.kernels import ContrastiveLoss
    from ldot.model import DualEncoder, ImageEncoder

    torch.manual_seed(seed)
    common = dict(hidden_size=s["hidden"], num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    text = BertModel(BertConfig(vocab_size=s["vocab"], num_hidden_layers=s["layers"], **common), add_pooling_layer=False)
    image = ImageEncoder(BertConfig(vocab_size=1, num_hidden_layers=s["image_layers"], feature_dim=s["feat"], **common))
    return DualEncoder(text, image, projection=True, normalize=True, contrastive=ContrastiveLoss("learnable"),
                       attention=attention).train()


def held_activation_bytes(model, batch: dict, float_dtype, device) -> int:
    """Bytes autograd keeps for the backward after a forward and the local CMR loss: each saved storage once,
    parameters excluded. With activation checkpointing only each layer's input is kept."""
    import torch

    from ldot import kernels

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=float_dtype == torch.bfloat16):
            t, i, scale = model(batch["input_ids"], batch["attention_mask"], batch["img_feat"], batch["img_pos"],
                                batch["img_mask"])
            loss = kernels.contrastive_loss(t, i, scale)
    held = sum(storages.values())
    del loss, t, i, scale
    return held


def synthetic_batch(s: dict, batch: int, device, seed: int) -> dict:
    """Fixed-shape batch: every caption s["text"] tokens, every image s["regions"] regions (no padding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b = {"input_ids": torch.randint(1000, s["vocab"], (batch, s["text"]), generator=g),
         "attention_mask": torch.ones(batch, s["text"], dtype=torch.long),
         "img_feat": torch.randn(batch, s["regions"], s["feat"], generator=g),
         "img_pos": torch.rand(batch, s["regions"], 7, generator=g),
         "img_mask": torch.ones(batch, s["regions"], dtype=torch.long),
         "group_ids": torch.arange(batch) + seed * batch}
    return {k: v.to(device) for k, v in b.items()}


# ---------------------------------------------------------------------------------------- real loader data

WORDS = ("a an the two three some small large red green blue yellow white black dark bright old young man woman "
         "child dog cat horse bird car bus train bike boat table chair street field beach road water tree building "
         "shirt hat ball frisbee kite umbrella plate pizza sits stands walks runs rides holds looks plays eats near "
         "on in under next to behind front of with and while at top side corner group crowd city park room").split()


def write_loader_data(out: Path, s: dict, images: int, seed: int = 0) -> tuple[Path, Path]:
    """Shards of `images` samples with the model's region count and feature size (random float16 features,
    grid boxes, 5 captions of 8-30 words each), and a WordPiece vocabulary of the caption words. Returns
    (data dir, vocab file)."""
    import numpy as np

    from ldot.data.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    vocab = out / "vocab.txt"
    out.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    n, dim = s["regions"], s["feat"]
    xy = rng.uniform(0, 0.6, (n, 2)).astype(np.float32)
    box = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (n, 2)).astype(np.float32)], 1)
    data = out / "train"
    with DatasetWriter(data, feature_dim=dim, source="benchmark", split="train", shard_size=500, command="benchmark",
                       verify=False) as w:
        for k in range(images):
            caps = [" ".join(rng.choice(WORDS, int(rng.integers(8, 31)))) for _ in range(5)]
            w.write(rng.standard_normal((n, dim)).astype(np.float16), box,
                    {"image_id": str(k), "captions": caps, "split": "train", "source": "benchmark"})
    return data, vocab


def loader_batches(data: Path, vocab: Path, s: dict, batch: int, dist, workers: int):
    """The trainer's loader over the shards: host batches, as TrainLoader yields them to train_step."""
    from transformers import BertTokenizerFast

    from ldot.data.loader import TrainLoader

    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=False)
    loader = TrainLoader(data, tok, batch_size=batch, max_text_len=s["text"], seed=0, rank=dist.rank,
                         world_size=dist.world_size, num_workers=workers)
    return iter(loader)


# ---------------------------------------------------------------------------------------- the worker


def worker(args) -> None:
    import torch

    from ldot import kernels
    from ldot.distributed import init_distributed
    from ldot.model import compile_regions, enable_grad_checkpointing
    from ldot.train.config import EngineConfig, OptimConfig
    from ldot.train.engine import build_engine
    from ldot.train.objectives import Objectives
    from ldot.train.step import to_device, train_step

    class _Tok:  # Objectives only needs these for the masked-word task, which this benchmark never runs
        mask_token_id, all_special_ids = 103, [0, 101, 102, 103]

        def __len__(self):
            return SIZES[args.size]["vocab"]

    dist = init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    s = SIZES[args.size]
    float_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    runs = [Run.parse(r) for r in args.runs]
    cuda = dist.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(step_fn) -> float:
        for _ in range(args.warmup):
            step_fn()
        sync()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        sync()
        torch.distributed.barrier()
        return time.perf_counter() - t0

    def record(row: dict) -> None:
        if dist.is_main:
            with open(args.result, "a") as f:
                f.write(json.dumps(row) + "\n")

    # Every run builds a new model: with many runs in one process the compiled layers' guards can fail more
    # often than dynamo's default limit (8) allows before it silently falls back to eager.
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    else:  # torch < 2.7
        torch._dynamo.config.cache_size_limit = 64
    from torch._dynamo.utils import counters

    for run in runs:
        frames_before, breaks_before = counters["frames"]["ok"], sum(counters["graph_break"].values())
        t_setup = time.perf_counter()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build_model(s, seed=0, attention=args.attention).to(dist.device)
        if args.grad_checkpointing:
            enable_grad_checkpointing(model)
        batch = synthetic_batch(s, run.batch, dist.device, seed=dist.rank)
        held = held_activation_bytes(model, batch, float_dtype, dist.device) / 2**20 if args.activations else float("nan")
        if run.compile:  # after the eager activation count: compiling changes what is held, not what a layer needs
            compile_regions(model)
        if run.loader:
            micro = loader_batches(Path(args.loader_data), Path(args.loader_vocab), s, run.batch, dist, args.workers)
        else:
            micro = itertools.repeat(batch)
        try:
            if run.engine == "ddp":
                ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01,
                                        fused=cuda)

                def step():
                    b = next(micro)
                    if run.loader:
                        b = to_device(b, dist.device, torch.float32)
                    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                        t, i, scale = ddp(b["input_ids"], b["attention_mask"], b["img_feat"], b["img_pos"],
                                          b["img_mask"])
                        loss = kernels.global_contrastive_loss(t, i, scale, group_ids=b["group_ids"],
                                                               sizes=[run.batch] * dist.world_size)
                    (loss * dist.world_size).backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                optimizer_name = type(opt).__name__ + (" (fused)" if cuda else "")
            else:
                engine, _ = build_engine(model, OptimConfig(lr=1e-5, max_steps=10**6),
                                         EngineConfig(deepspeed_config=str(ROOT / f"deepspeed_configs/{run.engine}.json"),
                                                      precision=args.precision), run.batch)
                objectives = Objectives(engine.module, _Tok(), forward=engine)
                counter = itertools.count(1)
                optimizer_name = type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__

                def step():
                    train_step(engine, objectives, "cmr", micro, world=dist.world_size, seed=0, step=next(counter),
                               rank=dist.rank, device=dist.device, float_dtype=float_dtype,
                               rank_sizes=lambda n: [n] * dist.world_size)
            setup = time.perf_counter() - t_setup
            t_first = time.perf_counter()
            step()  # the first step: optimizer state, kernels, and with +compile the compilation
            sync()
            first = time.perf_counter() - t_first
            seconds = timed(step)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            syncs = count_syncs(step) if cuda else None
            profiled = args.profile_dir and (not args.profile_runs or run.name in args.profile_runs)
            trace = profile_one_step(step, run, args, dist, sync) if profiled else None
        except Exception as exc:  # one run failing (e.g. an op that cannot build) must not hide the others
            print(f"[rank {dist.rank}] {run.name} failed: {exc!r}", file=sys.stderr, flush=True)
            record({**asdict(run), "name": run.name, "error": repr(exc)[:300], "held_mib": held})
        else:
            row = {**asdict(run), "name": run.name, "seconds": seconds, "first_step_s": first, "setup_s": setup,
                   "samples_per_s": args.steps * run.batch * dist.world_size / seconds, "peak_gib": peak,
                   "held_mib": held, "optimizer": optimizer_name, "trace": trace,
                   "syncs": None if syncs is None else sum(syncs.values()), "sync_sites": syncs,
                   "dynamo_frames": counters["frames"]["ok"] - frames_before,
                   "graph_breaks": sum(counters["graph_break"].values()) - breaks_before}
            record(row)
            if dist.is_main:
                print(f"{run.name}: {row['samples_per_s']:.1f} samples/s (first step {first:.1f} s, set-up {setup:.1f} s)",
                      flush=True)
        finally:  # free this run's model, engine, optimizer and loader workers before the next run
            model = batch = micro = step = engine = ddp = opt = objectives = None  # noqa: F841
            import gc

            gc.collect()


def count_syncs(step) -> dict[str, int]:
    """One more step under torch.cuda.set_sync_debug_mode("warn"): the device->host synchronizations it
    makes (ours, torch's and DeepSpeed's), counted by the Python line that caused each."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
            sites[where] = sites.get(where, 0) + 1
    return sites


def profile_one_step(step, run: Run, args, dist, sync) -> str | None:
    """One more step under torch.profiler (CPU and CUDA activity); rank 0 writes RUN.json.gz."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    if not dist.is_main:
        return None
    out = Path(args.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{run.name.replace('@', '_').replace('+', '-')}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return f"{raw.name}.gz"


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"


def runs_from(args) -> list[Run]:
    if args.runs:
        return [Run.parse(r) for r in args.runs]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return [Run(e, b, c) for b in args.batch for c in compiles for e in args.engines.split(",")]


def table(rows: list[dict], s: dict, args, peak: float | None) -> str:
    flops = model_flops_per_pair(s)
    ok = {(r["engine"], r["batch"], r["compile"], r["loader"]): r for r in rows if "error" not in r}
    head = ("| run | pairs/rank | samples/s | vs plain loop | compile speed-up | model TFLOP/s | MFU (bf16 peak) "
            "| peak GiB | first step s | syncs/step | activations MiB/rank |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['batch']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        tflops = r["samples_per_s"] * flops / 1e12
        mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak and args.precision == "bf16" else "—"
        base = ok.get(("ddp", r["batch"], r["compile"], False))
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}×" if base else "—"
        eager = ok.get((r["engine"], r["batch"], False, r["loader"])) if r["compile"] else None
        speedup = f"{r['samples_per_s'] / eager['samples_per_s']:.2f}×" if eager else ""
        gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] == r["peak_gib"] else "—"
        held = f"{r['held_mib']:.0f}" if r["held_mib"] == r["held_mib"] else "—"
        syncs = "—" if r.get("syncs") is None else str(r["syncs"])
        lines.append(f"| {r['name']} | {r['batch']} | {r['samples_per_s']:.1f} | {ratio} | {speedup} | {tflops:.2f} | "
                     f"{mfu} | {gib} | {r['first_step_s']:.1f} | {syncs} | {held} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[16], help="pairs per rank (each a run)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps after the first (which is timed on its own)")
    p.add_argument("--engines", default="ddp,zero1,zero2,zero3")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="model.compile (regional torch.compile) for the --engines x --batch runs")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="ENGINE[+compile][+loader]@PAIRS ... (instead of the "
                                                             "--engines x --batch x --compile grid)")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--grad-checkpointing", action="store_true", help="encoders recompute activations in the backward")
    p.add_argument("--no-activations", dest="activations", action="store_false",
                   help="skip counting the activations autograd holds (one extra forward a run)")
    p.add_argument("--loader-images", type=int, default=0,
                   help="images in the +loader runs' shards (default: enough for the runs' steps, at least 2,000)")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="loader workers per rank in +loader runs")
    p.add_argument("--data-dir", help="where +loader runs write their shards (default: a temporary directory)")
    p.add_argument("--profile-dir", help="save one step of each run as a gzipped Chrome trace here (rank 0)")
    p.add_argument("--profile-runs", nargs="+", metavar="RUN", help="only these runs (default: all)")
    p.add_argument("--json", help="write the rows here too, one JSON object a run, each as soon as it is measured "
                                  "(what was measured survives a run that is stopped)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--one-process", action="store_true",
                   help="all runs in one worker process (compiled graphs carry over; memory a run leaves behind too)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--loader-data", help=argparse.SUPPRESS)
    p.add_argument("--loader-vocab", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        from ldot.distributed import close_distributed

        worker(args)
        close_distributed()  # else the exit may abort (see there) and count as a failed run
        return None

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = runs_from(args)
    s = SIZES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(args.json) if args.json else Path(tmp) / "result.jsonl"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               __file__, "--worker", f"--result={result}", f"--size={args.size}", f"--precision={args.precision}",
               f"--steps={args.steps}", f"--warmup={args.warmup}", f"--attention={args.attention}",
               f"--workers={args.workers}"]
        cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
        cmd += [] if args.activations else ["--no-activations"]
        cmd += [f"--profile-dir={args.profile_dir}"] if args.profile_dir else []
        cmd += ["--profile-runs", *args.profile_runs] if args.profile_runs else []
        notes = []
        if any(r.loader for r in runs):
            need = max(r.batch for r in runs if r.loader) * args.nproc * (args.steps + args.warmup + 3)
            images = args.loader_images or max(2000, need)
            t = time.perf_counter()
            data, vocab = write_loader_data(Path(args.data_dir or tmp) / "loader-data", s, images)
            notes.append(f"+loader: {images:,} images ({s['regions']} × {s['feat']} float16 features, 5 captions of 8–30 "
                         f"words) written to local disk in {time.perf_counter() - t:.1f} s, read by TrainLoader with "
                         f"{args.workers} worker(s) a rank (just written: from the page cache, as a job's second epoch)")
            cmd += [f"--loader-data={data}", f"--loader-vocab={vocab}"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))}
        # A process per run by default: a run's model, engine and optimizer state are not all freed when the next
        # run starts in the same process (on an H100 the peak grew by 4-6 GiB a run and the 1,024-pair runs ran
        # out of memory), so later rows would measure a fuller GPU. --one-process keeps the compiled layers'
        # graphs from run to run instead, for quick looks.
        groups = [runs] if args.one_process else [[r] for r in runs]
        failed = []
        for group in groups:
            proc = subprocess.run(cmd + ["--runs", *[r.name for r in group]], env=env)
            if proc.returncode:
                failed.append(f"{', '.join(r.name for r in group)} (exit {proc.returncode})")
        rows = [json.loads(line) for line in result.read_text().splitlines()] if result.exists() else []
    if not rows:
        raise SystemExit(f"no run finished: {'; '.join(failed)}")

    name = device_name(device)
    peak_tflops = bf16_peak_tflops(name) if device == "cuda" else None
    peak = peak_tflops * 1e12 if peak_tflops else None
    opt = sorted({r["optimizer"] for r in rows if "optimizer" in r})
    command = "python benchmarks/train.py " + " ".join(sys.argv[1:])
    header = (f"### {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {name}\n\n`{command}` — model `{args.size}` "
              f"({s['layers']}+{s['image_layers']} layers, hidden {s['hidden']}, {s['text']} tokens + {s['regions']} regions), "
              f"{args.nproc} rank(s), {args.precision}, {args.steps} timed steps after the first and {args.warmup} more, "
              f"attention {args.attention}, activation checkpointing {'on' if args.grad_checkpointing else 'off'}; "
              f"plain loop = torch module{' with bf16 autocast' if args.precision == 'bf16' else ''} (DDP over ranks), "
              f"AdamW{' fused' if device == 'cuda' else ''}; optimizers: {', '.join(opt)}; model FLOPs "
              f"{model_flops_per_pair(s) / 1e9:.1f} GFLOP per pair. \"vs plain loop\": against `ddp` at the same pairs "
              f"and compile setting; \"compile speed-up\": against the same run eager.\n")
    text = header + "\n" + table(rows, s, args, peak) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    if args.profile_dir:
        text += f"\n- profiler traces (one step a run, rank 0): {', '.join(r['trace'] for r in rows if r.get('trace'))}"
    sites = {}
    for r in rows:
        for where, n in (r.get("sync_sites") or {}).items():
            sites.setdefault(where, []).append(f"{r['name']} {n}")
    if sites:
        text += "\n- syncs/step (torch.cuda.set_sync_debug_mode, one step a run) by the line that caused them: " + "; ".join(
            f"`{w}` ({', '.join(v)})" for w, v in sorted(sites.items()))
    compiled = [f"{r['name']} {r['dynamo_frames']} frames / {r['graph_breaks']} graph breaks" for r in rows
                if r.get("compile") and "error" not in r]
    if compiled:
        text += f"\n- compiled in each +compile run (torch._dynamo counters; graphs cached by an earlier run count 0): " \
                f"{'; '.join(compiled)}"
    print("\n" + text)
    if not args.no_record:
        append_run("train", text)  # under "## train", wherever that section stands
    if failed:
        raise SystemExit(f"a worker failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
