"""Retrieval latency and recall across pool sizes, and the wall time of a full recall table.

Query latency at batch 1 and batch 1,000 over pools of 768-d image embeddings (default 1k, 5k, 31k,
123k: the paper's Flickr30k/COCO test and full pools) for FAISS exact inner product, torch matmul +
top-k, IVF and HNSW (with their top-10 overlap with exact search), on the GPU too when there is one
(faiss-gpu for FAISS, CUDA for torch); the paper's Table 7 figures beside them. Then the seconds to
rank 25k captions against 5k images both ways and score R@1/5/10 (the COCO 5k table), through the
top-k searches eval uses and through the dense score matrix, which must agree.

The pools are random unit vectors by default (exact-search latency does not depend on the values);
queries are pool vectors plus noise, normalized, so each has a true nearest neighbour. Random
high-dimensional vectors are the hard case for IVF/HNSW (no cluster structure): their recall there is
a floor; `--pool-kind clustered` draws the pool around n/50 centres for a recall that means more.
Appends a "## retrieval" run to RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from ldot.eval.index import build_index, gpu_available, overlap_at_k, search, to_gpu  # noqa: E402
from ldot.eval.metrics import retrieval_recall  # noqa: E402
from ldot.eval.recall import recall_from_embeddings  # noqa: E402

from results import append_run, device  # noqa: E402

# LightningDOT Table 7: ms per text query on a TITAN RTX, query encoding included.
PAPER_MS = {1_000: 0.64, 123_000: 2.0}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_pool(n: int, d: int, n_queries: int, seed: int, kind: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """(pool [n, d], queries [n_queries, d]), unit vectors. random: i.i.d. directions; clustered: around
    n/50 centres (cosine ~0.5 within a cluster), as embeddings of similar images group together."""
    rng = np.random.default_rng(seed)
    if kind == "clustered":
        centres = unit(rng.standard_normal((max(1, n // 50), d), dtype=np.float32))
        pool = unit(centres[rng.integers(0, len(centres), n)]
                    + rng.standard_normal((n, d), dtype=np.float32) / math.sqrt(d))
    else:
        pool = unit(rng.standard_normal((n, d), dtype=np.float32))
    near = pool[rng.integers(0, n, n_queries)]
    # noise of norm ~0.7: the source vector stays the clear nearest neighbour
    queries = unit(near + 0.7 * rng.standard_normal(near.shape, dtype=np.float32) / math.sqrt(d))
    return pool, queries


def time_batches(fn, queries: np.ndarray, single: int, repeats: int) -> tuple[float, float]:
    """(median ms per query at batch 1, best ms per query at batch len(queries))."""
    fn(queries[:1])
    fn(queries[: min(len(queries), 64)])  # warm-up (allocations, GPU kernels)
    one = []
    for q in queries[:single]:
        t = time.perf_counter()
        fn(q[None])
        one.append(time.perf_counter() - t)
    full = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(queries)
        full.append(time.perf_counter() - t)
    return 1000 * statistics.median(one), 1000 * min(full) / len(queries)


def torch_searcher(pool: np.ndarray, k: int, device: str):
    p = torch.from_numpy(pool).to(device)

    def fn(q: np.ndarray):
        s = torch.from_numpy(q).to(device) @ p.T
        out = torch.topk(s, k, dim=1)
        ids = out.indices.cpu().numpy()  # the result on the host, as FAISS returns it
        return out.values.cpu().numpy(), ids

    return fn


def faiss_searcher(index, k: int):
    return lambda q: search(index, q, k)


def text_encoder_ms(device: str, repeats: int = 20) -> float | None:
    """Batch-1 latency of a BERT-base text encoder (random weights: the time is what matters), 16 tokens."""
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        return None
    model = BertModel(BertConfig(), add_pooling_layer=False).to(device).eval()
    ids = torch.randint(1000, 20000, (1, 16), device=device)
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                           else torch.autocast("cpu", enabled=False)):
        for i in range(repeats + 3):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float().cpu()
            if i >= 3:
                times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def recall_table_timing(n_images: int, per_image: int, d: int, seed: int, gpu: bool, dense_max: int) -> list[tuple]:
    """Seconds to rank n_images x per_image captions both ways and score R@1/5/10 (encoding excluded)."""
    rng = np.random.default_rng(seed)
    img = unit(rng.standard_normal((n_images, d), dtype=np.float32))
    cap_img = np.repeat(np.arange(n_images), per_image)
    # caption = its image + noise of norm ~7: recall well below 100% at 5k images, as a real model
    txt = unit(img[cap_img] + 0.25 * rng.standard_normal((len(cap_img), d), dtype=np.float32))
    rows = []
    t = time.perf_counter()
    top = recall_from_embeddings(txt, img, cap_img, gpu=gpu)
    rows.append(("FAISS top-k both ways (eval's path)" + (" on GPU" if gpu else ""), time.perf_counter() - t, top))
    if n_images * len(cap_img) <= dense_max:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        t = time.perf_counter()
        scores = (torch.from_numpy(txt).to(dev) @ torch.from_numpy(img).to(dev).T).cpu()
        dense = retrieval_recall(scores, cap_img)
        rows.append((f"torch matmul ({dev}) + dense retrieval_recall", time.perf_counter() - t, dense))
        for k in top:
            if abs(top[k] - dense[k]) > 1e-9:
                raise SystemExit(f"recall paths disagree on {k}: top-k {top[k]} vs dense {dense[k]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pools", type=int, nargs="+", default=[1_000, 5_000, 31_000, 123_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--pool-kind", choices=["random", "clustered"], default="random",
                   help="random unit vectors (latency), or clustered ones (IVF/HNSW recall that means something)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000, help="the large query batch")
    p.add_argument("--single", type=int, default=100, help="batch-1 queries timed (median reported)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of the large batch (best reported)")
    p.add_argument("--methods", nargs="+", default=["exact", "torch", "ivf", "hnsw"],
                   choices=["exact", "torch", "ivf", "hnsw"])
    p.add_argument("--approx-max", type=int, default=10**9, help="skip IVF/HNSW above this pool size")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--nprobe", type=int, help="IVF lists probed (default: eval.index's max(8, nlist/8))")
    p.add_argument("--table", type=int, nargs=2, default=[5000, 5], metavar=("IMAGES", "CAPTIONS_PER_IMAGE"),
                   help="the recall table to time (default: COCO 5k test, 25k captions)")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--dense-max", type=int, default=200_000_000, help="largest score matrix the dense check builds")
    p.add_argument("--no-encoder", action="store_true", help="skip timing a BERT-base query encoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    fgpu = gpu_available()
    torch_dev = "cuda" if cuda else "cpu"
    rows = []
    notes = ["random pool vectors have no cluster structure, the worst case for IVF and HNSW: their overlap "
             "there is a floor; clustered ones (n/50 centres, cosine ~0.5 inside a cluster) are closer to real "
             "embeddings" if args.pool_kind == "random" else
             "clustered pool: n/50 centres, cosine ~0.5 inside a cluster (synthetic, not real embeddings)",
             "the paper's Table 7 times encoding + search on a TITAN RTX; the first table is search only",
             f"CPU threads: torch {torch.get_num_threads()}; on a CPU shared with other jobs the timings, the "
             "encoder's above all, vary run to run"]
    enc_ms = None if args.no_encoder else text_encoder_ms(torch_dev)
    for n in args.pools:
        pool, queries = make_pool(n, args.dim, args.batch, args.seed, args.pool_kind)
        exact_cpu, _ = build_index(pool, "exact")
        _, truth = search(exact_cpu, queries, args.k)
        methods = []
        for m in args.methods:
            if m in ("ivf", "hnsw") and n > args.approx_max:
                continue
            t = time.perf_counter()
            if m == "torch":
                fn, name, params = torch_searcher(pool, args.k, torch_dev), f"torch matmul + top-k ({torch_dev})", {}
            else:
                index, params = (exact_cpu, {}) if m == "exact" else build_index(
                    pool, m, nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                    ef_search=args.ef_search)
                on_gpu = fgpu and m != "hnsw"
                fn, name = faiss_searcher(to_gpu(index) if on_gpu else index, args.k), \
                    f"FAISS {m}{' (GPU)' if on_gpu else ''}"
            build = time.perf_counter() - t
            one, many = time_batches(fn, queries, args.single, args.repeats)
            _, ids = fn(queries)
            rec = (overlap_at_k(np.asarray(ids), truth, 1), overlap_at_k(np.asarray(ids), truth, args.k))
            methods.append((name, params, build, one, many, rec))
            print(f"pool {n:>7,}: {name:<28} build {build:7.2f} s  batch-1 {one:8.3f} ms/q  "
                  f"batch-{args.batch} {many:7.4f} ms/q  overlap@1 {rec[0]:.3f} @{args.k} {rec[1]:.3f}", flush=True)
        base = next((m for m in methods if m[0].startswith("FAISS exact")), methods[0])
        for name, params, build, one, many, rec in methods:
            rows.append((n, name, params, build, one, many, rec, base[3] / one, base[4] / many))
        del pool, queries, exact_cpu

    table_rows = [] if args.no_table else recall_table_timing(args.table[0], args.table[1], args.dim, args.seed,
                                                              fgpu, args.dense_max)
    for name, s, r in table_rows:
        print(f"recall table {args.table[0]:,} x {args.table[0] * args.table[1]:,}: {name}: {s:.2f} s  AR {r['ar']:.4f}")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = shlex.join(["benchmarks/retrieval.py", *sys.argv[1:]])
    out = [f"### {stamp} · {device()}", "",
           f"`python {cmd}` — {args.dim}-d {args.pool_kind} unit vectors (queries = pool vectors + noise); top-{args.k}; "
           f"batch-1 = median of {args.single} single queries, batch-{args.batch} = best of {args.repeats}, "
           f"both in ms per query, search only (results on the host); overlap = share of exact search's top "
           f"{args.k} found. FAISS {'on GPU (faiss-gpu)' if fgpu else 'on CPU'}"
           f"{'' if fgpu else ' (no faiss-gpu here)'}; FAISS threads {__import__('faiss').omp_get_max_threads()}.",
           "", f"| pool | method | params | build s | batch-1 ms/q | batch-{args.batch} ms/q | overlap@1 / @{args.k} "
               f"| speed vs FAISS exact (batch 1 / {args.batch}) | paper Table 7 ms/q (TITAN RTX, with encoding) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, name, params, build, one, many, rec, r1, rb in rows:
        paper = f"{PAPER_MS[n]:.2f}" if n in PAPER_MS else ""
        ptxt = ", ".join(f"{k}={v}" for k, v in params.items())
        out.append(f"| {n:,} | {name} | {ptxt} | {build:.2f} | {one:.3f} | {many:.4f} | {rec[0]:.3f} / {rec[1]:.3f} | "
                   f"{r1:.2f}× / {rb:.2f}× | {paper} |")
    if enc_ms is not None:
        out += ["", f"Query encoder (BERT-base, 12 layers, 16 tokens, batch 1, {torch_dev}): **{enc_ms:.2f} ms**. "
                    "Ours with encoding against the paper's Table 7 (encoding + FAISS exact, batch 1):", "",
                "| pool | ours ms/q | paper ms/q | ours / paper |", "| --- | --- | --- | --- |"]
        for n, name, _, _, one, *_ in rows:
            if n in PAPER_MS and name.startswith("FAISS exact"):
                ours = enc_ms + one
                out.append(f"| {n:,} | {ours:.2f} | {PAPER_MS[n]:.2f} | {ours / PAPER_MS[n]:.1f}× |")
    if table_rows:
        n_img, per = args.table
        out += ["", f"Full recall table, {n_img:,} images × {n_img * per:,} captions (R@1/5/10 both ways, embeddings "
                    "given: encoding excluded; both paths give the same numbers, checked):", "",
                "| ranking | seconds | AR |", "| --- | --- | --- |"]
        out += [f"| {name} | {s:.2f} | {100 * r['ar']:.2f} |" for name, s, r in table_rows]
        if len(table_rows) > 1:
            out.append(f"| top-k path speed-up over dense | {table_rows[1][1] / table_rows[0][1]:.2f}× | |")
    out += ["", *[f"- {n}" for n in notes]]
    text = "\n".join(out)
    print("\n" + text)
    if not args.no_record:
        append_run("retrieval", text)


if __name__ == "__main__":
    main()
