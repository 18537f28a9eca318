"""Training throughput: a plain torch DDP loop against DeepSpeed ZeRO-1/2/3 on the same model and batch.

    python benchmarks/train.py                          # CPU: demo-size model, 2 ranks, fp32
    python benchmarks/train.py --size paper --precision bf16 --nproc 1   # GPU: the paper's 2x12-layer model

Both sides run the trainer's own pieces: the DualEncoder, the cross-rank CMR loss (kernels/), and for
DeepSpeed ldot.train.engine.build_engine + ldot.train.step.train_step. Batches are synthetic tensors of the
configured shape made once on the device, so the figure is the trainer's rate, not the loader's.
Prints a Markdown table of samples/s with the ratio against DDP (and model FLOPs utilization on GPU)
and appends it, with device, date and command, to benchmarks/RESULTS.md. --grad-checkpointing turns on
the encoders' activation checkpointing (model.grad_checkpointing); the "activations" column counts the
bytes autograd holds for the backward after one rank's forward (saved-tensor hooks, parameters
excluded), which any device can measure.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from results import append_run, bf16_peak_tflops  # noqa: E402

SIZES = {
    # hidden, layers, heads, ffn, vocab, image layers, feature dim, regions, text tokens
    "demo": dict(hidden=384, layers=6, heads=12, ffn=1536, vocab=30522, image_layers=2, feat=1280, regions=49, text=24),
    "paper": dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=28996, image_layers=12, feat=2048, regions=36, text=32),
}


def model_flops_per_pair(s: dict) -> float:
    """Training FLOPs (3x forward) per image-caption pair: projections and FFN 24*S*H^2, attention 4*S^2*H
    per layer, plus the region feature projection."""
    h = s["hidden"]

    def encoder(seq, layers):
        return layers * (24 * seq * h * h + 4 * seq * seq * h)

    fwd = encoder(s["text"], s["layers"]) + encoder(s["regions"] + 1, s["image_layers"]) + 2 * s["regions"] * s["feat"] * h
    return 3.0 * fwd


def build_model(s: dict, seed: int):
    import torch
    from transformers import BertConfig, BertModel

    from ldot.kernels import ContrastiveLoss
    from ldot.model import DualEncoder, ImageEncoder

    torch.manual_seed(seed)
    common = dict(hidden_size=s["hidden"], num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    text = BertModel(BertConfig(vocab_size=s["vocab"], num_hidden_layers=s["layers"], **common), add_pooling_layer=False)
    image = ImageEncoder(BertConfig(vocab_size=1, num_hidden_layers=s["image_layers"], feature_dim=s["feat"], **common))
    return DualEncoder(text, image, projection=True, normalize=True, contrastive=ContrastiveLoss("learnable")).train()


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
    import torch

    g = torch.Generator().manual_seed(seed)
    b = {"input_ids": torch.randint(1000, s["vocab"], (batch, s["text"]), generator=g),
         "attention_mask": torch.ones(batch, s["text"], dtype=torch.long),
         "img_feat": torch.randn(batch, s["regions"], s["feat"], generator=g),
         "img_pos": torch.rand(batch, s["regions"], 7, generator=g),
         "img_mask": torch.ones(batch, s["regions"], dtype=torch.long),
         "group_ids": torch.arange(batch) + seed * batch}
    return {k: v.to(device) for k, v in b.items()}


def worker(args) -> None:
    import torch

    from ldot.train.config import EngineConfig, OptimConfig
    from ldot.distributed import init_distributed
    from ldot.train.engine import build_engine
    from ldot.train.step import train_step
    from ldot.model import enable_grad_checkpointing
    from ldot.train.objectives import Objectives

    class _Tok:  # Objectives only needs these for the masked-word task, which this benchmark never runs
        mask_token_id, all_special_ids = 103, [0, 101, 102, 103]

        def __len__(self):
            return SIZES[args.size]["vocab"]

    dist = init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    s = SIZES[args.size]
    batch = synthetic_batch(s, args.batch, dist.device, seed=dist.rank)
    float_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    results = []

    def timed(step_fn) -> float:
        for _ in range(args.warmup):
            step_fn()
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()
        return time.perf_counter() - t0

    for engine_name in args.engines.split(","):
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build_model(s, seed=0).to(dist.device)
        if args.grad_checkpointing:
            enable_grad_checkpointing(model)
        held = held_activation_bytes(model, batch, float_dtype, dist.device) / 2**20
        if engine_name == "ddp":
            from ldot import kernels

            ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.world_size > 1 else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01,
                                    fused=dist.device.type == "cuda")

            def step():
                with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    t, i, scale = ddp(batch["input_ids"], batch["attention_mask"], batch["img_feat"],
                                      batch["img_pos"], batch["img_mask"])
                    loss = kernels.global_contrastive_loss(t, i, scale, group_ids=batch["group_ids"])
                (loss * dist.world_size).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            stage = int(engine_name.removeprefix("zero"))
            engine, _ = build_engine(model, OptimConfig(lr=1e-5, max_steps=10**6),
                                     EngineConfig(deepspeed_config=str(ROOT / f"deepspeed_configs/zero{stage}.json"),
                                                  precision=args.precision), args.batch)
            objectives = Objectives(engine.module, _Tok())
            counter = iter(range(10**9))

            def step():
                train_step(engine, objectives, "cmr", iter([batch]), world=dist.world_size, seed=0,
                           step=next(counter), rank=dist.rank, device=dist.device, float_dtype=float_dtype,
                           rank_sizes=lambda n: [n] * dist.world_size)
        try:
            seconds = timed(step)
        except Exception as exc:  # one engine failing (e.g. an op that cannot build) must not hide the others
            print(f"[rank {dist.rank}] {engine_name} failed: {exc!r}", file=sys.stderr)
            results.append({"engine": engine_name, "seconds": float("nan"), "samples_per_s": float("nan"),
                            "peak_gib": float("nan"), "held_mib": held, "error": repr(exc)[:200]})
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if dist.device.type == "cuda" else float("nan")
        results.append({"engine": engine_name, "seconds": seconds,
                        "samples_per_s": args.steps * args.batch * dist.world_size / seconds, "peak_gib": peak,
                        "held_mib": held})
        del model
    if dist.is_main:
        Path(args.result).write_text(json.dumps(results))


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="pairs per rank")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--engines", default="ddp,zero1,zero2,zero3")
    p.add_argument("--grad-checkpointing", action="store_true", help="encoders recompute activations in the backward")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               __file__, "--worker", f"--result={result}", f"--size={args.size}", f"--precision={args.precision}",
               f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--engines={args.engines}"]
        cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))}
        subprocess.run(cmd, check=True, env=env)
        rows = json.loads(result.read_text())

    s, name = SIZES[args.size], device_name(device)
    peak_tflops = bf16_peak_tflops(name) if device == "cuda" else None
    peak = peak_tflops * 1e12 if peak_tflops else None
    base = next(r["samples_per_s"] for r in rows if r["engine"] == "ddp") if any(r["engine"] == "ddp" for r in rows) else None
    flops = model_flops_per_pair(s)
    head = "| engine | samples/s | vs DDP | model TFLOP/s | MFU (bf16 peak) | peak GiB | activations MiB/rank |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        tflops = r["samples_per_s"] * flops / 1e12
        mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak and args.precision == "bf16" else "—"
        ratio = f"{r['samples_per_s'] / base:.2f}×" if base else "—"
        gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] == r["peak_gib"] else "—"
        lines.append(f"| {r['engine']} | {r['samples_per_s']:.1f} | {ratio} | {tflops:.2f} | {mfu} | {gib} "
                     f"| {r['held_mib']:.0f} |")
    table = "\n".join(lines)
    command = "python benchmarks/train.py " + " ".join(sys.argv[1:])
    header = (f"### {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {name}\n\n`{command}` — model `{args.size}` "
              f"({s['layers']}+{s['image_layers']} layers, hidden {s['hidden']}, {s['text']} tokens + {s['regions']} regions), "
              f"{args.nproc} rank(s) × {args.batch} pairs, {args.precision}, {args.steps} timed steps after {args.warmup}, "
              f"activation checkpointing {'on' if args.grad_checkpointing else 'off'}; "
              f"DDP = plain torch loop{' with bf16 autocast' if args.precision == 'bf16' else ''}, fused AdamW on GPU; "
              f"model FLOPs {flops / 1e9:.1f} GFLOP per pair.\n")
    print("\n" + header + "\n" + table)
    if not args.no_record:
        append_run("train", header + "\n" + table)  # under "## train", wherever that section stands


if __name__ == "__main__":
    main()
