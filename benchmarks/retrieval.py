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

The paper's Table 7 setting is its own table (`--table7`, on by default; `--table7-only` runs just it):
text queries in batches of 400, from token ids on the host to top-10 image ids on the host, encoding
included: a BERT-base query encoder (12 layers, 16 tokens, random weights: the time is what matters) with
the original's [CLS] projection, bf16 on a GPU, then exact inner-product search over 1k-123k images,
timed per batch and divided by 400. On a GPU the search is torch matmul + top-k (exact, the same brute
force as faiss-gpu's IndexFlatIP, which the benchmark machine does not have: no faiss-gpu wheel fits
what can be carried there), fp32 and fp16 pools; FAISS's GPU index when faiss-gpu is importable. The
paper's figures are for a TITAN RTX: 0.64 ms (1k), 2.0 ms (123k). Earlier runs also set batch-1 CPU
latency beside them ("ours / paper 97×"): that compared a 2-core CPU at batch 1 with a GPU at batch 400,
and is gone.
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

from results import append_run, device  # noqa: E402

# FAISS (ldot.eval.index) is imported where it is used: the Table 7 setting runs without it (the GPU
# benchmark machine has no FAISS).

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
    from ldot.eval.index import search

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
    from ldot.eval.metrics import retrieval_recall
    from ldot.eval.recall import recall_from_embeddings

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


def query_encoder(device: str):
    """BERT-base (12 layers, hidden 768, random weights) with the original's [CLS] projection, for
    inference: bf16 weights on a GPU, fp32 on a CPU. (encode(ids, mask) -> unit vectors [B, 768] fp32.)"""
    from transformers import BertConfig, BertModel

    from ldot.model import ProjectionHead
    from ldot.model.dual_encoder import attention_mask_4d

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bert = BertModel(BertConfig(vocab_size=28996), add_pooling_layer=False).to(device, dtype).eval()
    bert.set_attn_implementation("sdpa")
    proj = ProjectionHead(768).to(device, dtype).eval()

    @torch.inference_mode()
    def encode(ids, mask):
        states = bert(input_ids=ids, attention_mask=attention_mask_4d(bert.config, mask, dtype)).last_hidden_state
        return torch.nn.functional.normalize(proj(states[:, 0]).float(), dim=-1)

    return encode


def table7(pools: list[int], d: int, batch: int, k: int, repeats: int, seed: int, tokens: int = 16) -> list[tuple]:
    """The paper's Table 7 setting: ms per query, queries in batches of `batch`, host token ids in, host top-k
    image ids out, encoding included. Rows: (pool, search, encode ms/q, search ms/q, total ms/q)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    encode = query_encoder(dev)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 28000, (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    if dev == "cuda":
        ids, mask = ids.pin_memory(), mask.pin_memory()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def median_ms(fn) -> float:
        for _ in range(3 if dev == "cuda" else 1):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    def encoded():
        return encode(ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True))

    enc_ms = median_ms(lambda: encoded().cpu())  # the embeddings on the host: what a CPU index is given
    z = encoded()
    rows = []
    for n in pools:
        pool, _ = make_pool(n, d, 1, seed)
        searches = []
        if dev == "cuda":
            for dtype in (torch.float32, torch.float16):
                p = torch.from_numpy(pool).to(dev, dtype)
                searches.append((f"torch matmul + top-k (GPU, {str(dtype).removeprefix('torch.')} pool)",
                                 lambda q, p=p: torch.topk(q.to(p.dtype) @ p.T, k, dim=1).indices))
            try:
                from ldot.eval.index import build_index, gpu_available, search, to_gpu
            except ImportError:  # no FAISS at all
                gpu_available = bool
            if gpu_available():
                index = to_gpu(build_index(pool, "exact")[0])
                searches.append(("FAISS exact (GPU)", lambda q, index=index: torch.from_numpy(
                    search(index, q.cpu().numpy(), k)[1])))
        else:
            p = torch.from_numpy(pool)
            searches.append(("torch matmul + top-k (CPU)", lambda q, p=p: torch.topk(q @ p.T, k, dim=1).indices))
            try:
                from ldot.eval.index import build_index, search

                index = build_index(pool, "exact")[0]
                searches.append(("FAISS exact (CPU)", lambda q, index=index: search(index, q.numpy(), k)[1]))
            except ImportError:
                pass
        for name, fn in searches:
            search_ms = median_ms(lambda: torch.as_tensor(fn(z)).cpu())
            # on a GPU the two together (their launches overlap); a CPU's encoder is too slow to time twice
            total_ms = median_ms(lambda: torch.as_tensor(fn(encoded())).cpu()) if dev == "cuda" else enc_ms + search_ms
            rows.append((n, name, enc_ms / batch, search_ms / batch, total_ms / batch))
            print(f"table 7, pool {n:>7,}: {name:<40} encode {enc_ms / batch:.4f}  search {search_ms / batch:.4f}  "
                  f"total {total_ms / batch:.4f} ms/q", flush=True)
        del pool, searches
    return rows


def table7_text(rows: list[tuple], batch: int, k: int) -> list[str]:
    dev = "GPU, " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    out = [f"The paper's Table 7 setting ({dev}): ms per query, queries in batches of {batch}, 16 tokens, from host "
           f"token ids to host top-{k} ids; encoding = BERT-base + [CLS] projection "
           f"({'bf16' if torch.cuda.is_available() else 'fp32'}), search = exact inner product:", "",
           "| pool | search | encode ms/q | search ms/q | total ms/q | paper ms/q (TITAN RTX) | ours / paper |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, name, enc, srch, total in rows:
        paper = PAPER_MS.get(n)
        out.append(f"| {n:,} | {name} | {enc:.4f} | {srch:.4f} | {total:.4f} | "
                   f"{f'{paper:.2f}' if paper else ''} | {f'{total / paper:.2f}×' if paper else ''} |")
    return out


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
    p.add_argument("--no-table7", action="store_true", help="skip the paper's Table 7 setting")
    p.add_argument("--table7-only", action="store_true", help="only the paper's Table 7 setting (needs no FAISS)")
    p.add_argument("--table7-batch", type=int, default=400, help="queries a batch in the Table 7 setting (the paper's)")
    p.add_argument("--table7-pools", type=int, nargs="+", default=[1_000, 5_000, 31_000, 123_000])
    p.add_argument("--table7-repeats", type=int, default=20)
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    torch_dev = "cuda" if cuda else "cpu"
    t7 = [] if args.no_table7 else table7(args.table7_pools, args.dim, args.table7_batch, args.k,
                                            args.table7_repeats, args.seed)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = shlex.join(["benchmarks/retrieval.py", *sys.argv[1:]])
    if args.table7_only:
        text = "\n".join([f"### {stamp} · {device()}", "", f"`python {cmd}`", "", *table7_text(t7, args.table7_batch,
                                                                                                   args.k)])
        print("\n" + text)
        if not args.no_record:
            append_run("retrieval", text)
        return

    from ldot.eval.index import build_index, gpu_available, overlap_at_k, search, to_gpu

    fgpu = gpu_available()
    rows = []
    notes = ["random pool vectors have no cluster structure, the worst case for IVF and HNSW: their overlap "
             "there is a floor; clustered ones (n/50 centres, cosine ~0.5 inside a cluster) are closer to real "
             "embeddings" if args.pool_kind == "random" else
             "clustered pool: n/50 centres, cosine ~0.5 inside a cluster (synthetic, not real embeddings)",
             "the paper's Table 7 times encoding + search on a TITAN RTX, queries in batches of 400; the first table is "
             "search only, its last column the paper's figure for reference",
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
        out += ["", f"Query encoder alone at batch 1 (BERT-base, 12 layers, 16 tokens, {torch_dev}): {enc_ms:.2f} ms "
                    "(latency of one query; not the paper's setting, which the table below reproduces)."]
    if t7:
        out += ["", *table7_text(t7, args.table7_batch, args.k)]
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
