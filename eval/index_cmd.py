"""`ldot eval index`: encode a split's images once into a FAISS index directory for `search`.

For the approximate types (IVF, HNSW) the build also searches with the split's captions through the
new index and an exact one and reports how much of the exact top-k it finds and the image-retrieval
recall either way, so the speed is never bought blind.
"""
from __future__ import annotations

import json
import time

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("index", help="Encode a dataset's images into a FAISS index directory")
    p.add_argument("--checkpoint", required=True, help="exported encoders")
    p.add_argument("--data", required=True, help="dataset directory (shards + manifest.json)")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--type", choices=("exact", "ivf", "hnsw"), default="exact")
    p.add_argument("--nlist", type=int, help="IVF: inverted lists (default ~4 sqrt(n))")
    p.add_argument("--nprobe", type=int, help="IVF: lists searched per query (default max(8, nlist/8))")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW: links per node")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW: search breadth")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=run)


def index_items(split) -> list[dict]:
    """Row i of the index = image i of the split: its id, shard key and captions."""
    captions: list[list[str]] = [[] for _ in range(split.num_images)]
    for text, owner in zip(split.captions, split.caption_image):
        captions[owner].append(text)
    return [{"image_id": iid, "key": key, "captions": caps}
            for iid, key, caps in zip(split.image_ids, split.keys, captions)]


def approximate_report(index, image_emb: np.ndarray, text_emb: np.ndarray, caption_image, ks=(1, 5, 10)) -> dict:
    """Overlap with exact search at 1 and 10, and IR recall through each index, on the captions as queries."""
    from ldot.eval.index import build_exact_index, overlap_at_k, search
    from ldot.eval.metrics import TopK, retrieval_recall

    depth = min(max(ks) + 1, len(image_emb))
    exact = build_exact_index(image_emb)
    t = time.perf_counter()
    a_scores, a_ids = search(index, text_emb, depth)
    approx_ms = 1000 * (time.perf_counter() - t) / len(text_emb)
    t = time.perf_counter()
    e_scores, e_ids = search(exact, text_emb, depth)
    exact_ms = 1000 * (time.perf_counter() - t) / len(text_emb)
    # text retrieval is not what this index serves: its rows come from an exact caption search, and
    # only the ir_* numbers are reported
    no_tr = (np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32))

    def ir(ids, scores):
        top = TopK(ids, scores, *no_tr, num_images=len(image_emb), num_captions=len(text_emb),
                   tr_query=np.zeros(0, np.int64))
        r = retrieval_recall(top, caption_image, ks)
        return {k: v for k, v in r.items() if k.startswith("ir_")}

    return {"overlap@1": overlap_at_k(a_ids, e_ids, 1), "overlap@10": overlap_at_k(a_ids, e_ids, min(10, depth)),
            "ir_recall": ir(a_ids, a_scores), "ir_recall_exact": ir(e_ids, e_scores),
            "ms_per_query": approx_ms, "exact_ms_per_query": exact_ms, "queries": len(text_emb)}


def run(args) -> int:
    import torch

    from ldot.data.loader import load_eval_split
    from ldot.eval.index import build_index, save_index
    from ldot.eval.recall import encode_split
    from ldot.model import load_dual_encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    tokenizer, model, meta = load_dual_encoder(args.checkpoint, device=device)
    split = load_eval_split(args.data)
    text_emb, image_emb = encode_split(model, split, tokenizer, batch_size=args.batch_size,
                                       max_text_len=meta.get("max_text_len", 32), device=device)
    t_encode = time.perf_counter() - t0
    t = time.perf_counter()
    index, params = build_index(image_emb, args.type, nlist=args.nlist, nprobe=args.nprobe,
                                hnsw_m=args.hnsw_m, ef_search=args.ef_search)
    t_build = time.perf_counter() - t
    report = {"encode_s": round(t_encode, 3), "build_s": round(t_build, 3)}
    if args.type != "exact":
        report.update(approximate_report(index, image_emb, text_emb, split.caption_image))
    out = save_index(args.out, index, index_items(split), kind=args.type, params=params,
                     checkpoint=args.checkpoint, data=args.data, report=report)

    print(f"index: {out} — {args.type}{' ' + json.dumps(params) if params else ''}, {index.ntotal} images x {index.d} dims "
          f"(encode {t_encode:.1f} s, build {t_build:.2f} s)")
    if args.type != "exact":
        r = report
        print(f"against exact search on the {r['queries']} captions: overlap@1 {100 * r['overlap@1']:.1f}%, "
              f"overlap@10 {100 * r['overlap@10']:.1f}%; {r['ms_per_query']:.3f} ms/query vs exact "
              f"{r['exact_ms_per_query']:.3f} (batched)")
        names = sorted(r["ir_recall"], key=lambda k: int(k[4:]))
        print("IR recall  " + "  ".join(f"{k[3:].upper()}: {100 * r['ir_recall'][k]:.1f} "
                                         f"(exact {100 * r['ir_recall_exact'][k]:.1f})" for k in names))
    return 0
