"""`ldot eval search`: answer a text query from an index directory, as the paper's real-time
retrieval: one text-encoder pass, one top-K search, optionally a re-ranker on the top M.

Prints the top K with scores and the time split into encode / search / re-rank (steady state: the
encoders run once on the query before the timed pass, so one-off start-up costs are not counted).
"""
from __future__ import annotations

import json
import time


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="Top-K images for a text query from an index directory")
    p.add_argument("--index", required=True, help="index directory (ldot eval index)")
    p.add_argument("--checkpoint", required=True, help="the exported encoders that built the index")
    p.add_argument("--query", required=True, action="append", help="query text (repeat for several)")
    p.add_argument("-k", type=int, default=10, help="results to print")
    p.add_argument("--rerank", metavar="CKPT", help="re-rank the top M with this re-ranker (a cross-encoder trained "
                   "with task=rerank, or another exported dual encoder)")
    p.add_argument("--rerank-top", type=int, default=20, metavar="M", help="candidates re-ranked (paper: 20 or 50)")
    p.add_argument("--rerank-weight", type=float, default=0.0,
                   help="final score = re-ranker score + this x first-stage score")
    p.add_argument("--data", help="dataset directory for the re-ranker's region features (default: the index's)")
    p.add_argument("--nprobe", type=int, help="IVF: lists searched per query")
    p.add_argument("--ef-search", type=int, help="HNSW: search breadth")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ldot.eval.errors import EvalError
    from ldot.eval.index import load_index, search, set_search_params
    from ldot.eval.recall import encode_queries
    from ldot.model import load_dual_encoder

    if args.k < 1 or args.rerank_top < 1:
        raise EvalError("-k and --rerank-top must be at least 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    idx = load_index(args.index, checkpoint=args.checkpoint)
    set_search_params(idx.index, {"nprobe": args.nprobe, "efSearch": args.ef_search})
    tokenizer, model, meta = load_dual_encoder(args.checkpoint, device=device)
    max_len = meta.get("max_text_len", 32)
    reranker = None
    if args.rerank:
        from ldot.eval.image_store import ImageStore
        from ldot.eval.rerank import load_reranker

        data = args.data or idx.meta.get("data")
        if not data:
            raise EvalError(f"{args.index}: records no dataset directory; pass --data for the re-ranker")
        store = ImageStore(data, [it["key"] for it in idx.items])
        reranker = load_reranker(args.rerank, store, device=device)
    t_load = time.perf_counter() - t0

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = []
    depth = max(args.k, args.rerank_top if reranker else 0)
    for query in args.query:
        encode_queries(model, tokenizer, [query], max_text_len=max_len, device=device)  # warm-up
        t = time.perf_counter()
        q = encode_queries(model, tokenizer, [query], max_text_len=max_len, device=device)
        sync()
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        scores, ids = search(idx.index, q, depth)
        t_search = time.perf_counter() - t
        scores, ids = scores[0], ids[0]
        first_rank = {int(i): r for r, i in enumerate(ids)}
        t_rerank = 0.0
        if reranker:
            from ldot.eval.rerank import rerank_row

            m = min(args.rerank_top, int((ids >= 0).sum()))
            reranker.score(query, ids[:1])  # warm-up; then the timed pass scores every candidate afresh
            reranker.reset()
            t = time.perf_counter()
            new = reranker.score(query, ids[:m])
            ids, scores = rerank_row(ids, scores, new, m, args.rerank_weight)
            sync()
            t_rerank = time.perf_counter() - t
        hits = [{"rank": r + 1, "score": float(scores[r]), "first_stage_rank": first_rank[int(i)] + 1,
                 **{k: idx.items[int(i)][k] for k in ("image_id", "key")},
                 "caption": (idx.items[int(i)]["captions"] or [""])[0]}
                for r, i in enumerate(ids[:args.k]) if i >= 0]
        results.append({"query": query, "hits": hits, "reranked": m if reranker else 0,
                        "ms": {"encode": 1000 * t_enc, "search": 1000 * t_search, "rerank": 1000 * t_rerank}})

    if args.json:
        print(json.dumps({"index": str(args.index), "load_s": t_load, "results": results}, indent=2))
        return 0
    kind = f"{idx.meta['type']} {idx.meta.get('params') or ''}".strip()
    print(f"index {args.index}: {idx.index.ntotal} images ({kind}); loaded with the encoders in {t_load:.1f} s")
    for res in results:
        print(f"\nquery: {res['query']!r}")
        head = "| rank | score | image id | a caption of it |"
        if reranker:
            head = "| rank | score | was | image id | a caption of it |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for h in res["hits"]:
            was = f" {h['first_stage_rank']} |" if reranker else ""
            print(f"| {h['rank']} | {h['score']:.4f} |{was} {h['image_id']} | {h['caption']} |")
        ms = res["ms"]
        split = f"encode {ms['encode']:.2f} ms · search {ms['search']:.3f} ms"
        if reranker:
            split += f" · re-rank top {res['reranked']} {ms['rerank']:.2f} ms"
        print(f"time: {split} · total {sum(ms.values()):.2f} ms")
    return 0
