"""`ldot eval recall`: the recall table of an exported dual encoder on a dataset directory.

Prints R@1/5/10 (any --ks) both ways with the chance level, writes JSON, Markdown and two pictures
(recall at every K; the top-10 images of a few queries with the ground truth framed) beside the
checkpoint, and records all of it in the MLflow run that trained the checkpoint. --pool adds the
paper's full setting: the split's queries against every image and caption of more dataset
directories, R@5/10/20. Under torchrun (WORLD_SIZE > 1) every rank encodes and searches a slice.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("recall", help="Recall@K of an exported dual encoder on a dataset directory")
    p.add_argument("--checkpoint", required=True, help="exported encoders (e.g. <output_dir>/checkpoints/final)")
    p.add_argument("--data", required=True, help="dataset directory (shards + manifest.json): the queries")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--pool", nargs="+", default=[], metavar="DIR",
                   help="more dataset directories whose images and captions join the candidates: the paper's "
                        "full setting (e.g. Flickr30k's 31k or COCO's 123k images)")
    p.add_argument("--pool-ks", type=int, nargs="+", default=[5, 10, 20], help="K for the full setting")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dense", action="store_true",
                   help="rank from the full n_captions x n_images score matrix (small splits; a cross-check)")
    p.add_argument("--curve-k", type=int, default=50, help="largest K of the recall-at-K picture")
    p.add_argument("--figure-queries", type=int, default=4, help="text queries in the top-10 picture (0: none)")
    p.add_argument("--rerank", metavar="CKPT", help="also re-rank each query's top M with this re-ranker (a "
                   "cross-encoder trained with task=rerank, or a second dual encoder) and report recall after")
    p.add_argument("--rerank-top", type=int, default=20, metavar="M", help="candidates re-ranked (paper: 20 or 50)")
    p.add_argument("--rerank-weight", type=float, default=0.0,
                   help="re-ranked score = re-ranker's score + this x first-stage score")
    p.add_argument("--rerank-val", metavar="DIR",
                   help="choose --rerank-weight on this dataset directory (a validation split, never the test "
                        "queries): the weight of --rerank-weights whose re-ranked AR is highest there")
    p.add_argument("--rerank-weights", type=float, nargs="+", metavar="W",
                   help="the weights --rerank-val tries (default: eval/rerank.py WEIGHT_GRID, 0 to 100)")
    p.add_argument("--cpu-index", action="store_true", help="keep FAISS on the CPU even with faiss-gpu and CUDA")
    p.add_argument("--out", help="recall JSON path (default: CHECKPOINT/recall.json; .md and .png files beside it)")
    p.add_argument("--no-log", action="store_true", help="do not record in the checkpoint's MLflow run")
    p.set_defaults(func=run)


def rank_world_device() -> tuple[int, int, str]:
    """(rank, world size, device) — a process group only when launched with several ranks."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world > 1:
        from ldot.distributed import init_distributed

        info = init_distributed()
        return info.rank, info.world_size, str(info.device)
    return 0, 1, "cuda" if torch.cuda.is_available() else "cpu"


def pick_figure_queries(ir_ids: np.ndarray, gt: np.ndarray, n: int) -> list[int]:
    """Caption rows for the top-10 picture: spread over the split, half found first and half not
    (where the split has both), one per image."""
    hit = ir_ids[:, 0] == gt
    chosen: list[int] = []
    seen: set[int] = set()
    for want, count in ((True, (n + 1) // 2), (False, n // 2)):
        rows = np.flatnonzero(hit == want)
        for r in rows[np.linspace(0, len(rows) - 1, min(len(rows), 4 * n)).astype(int)] if len(rows) else []:
            if count and int(gt[r]) not in seen:
                chosen.append(int(r))
                seen.add(int(gt[r]))
                count -= 1
    for r in np.linspace(0, len(gt) - 1, min(len(gt), 8 * n)).astype(int):  # top up from anywhere
        if len(chosen) < n and int(gt[r]) not in seen:
            chosen.append(int(r))
            seen.add(int(gt[r]))
    return sorted(chosen)


def run(args) -> int:
    from ldot.data.loader import load_eval_split
    from ldot.eval.errors import EvalError
    from ldot.eval.index import gpu_available
    from ldot.eval.metrics import chance_recall, format_table, retrieval_recall
    from ldot.eval.recall import encode_split, recall_from_embeddings, topk_from_embeddings
    from ldot.model import load_dual_encoder
    from ldot.tracking import RUN_FILE, Tracker

    if (args.rerank_val or args.rerank_weights) and not args.rerank:
        raise EvalError("--rerank-val and --rerank-weights choose how to mix a re-ranker's score: they need --rerank CKPT")
    if args.rerank_weights and not args.rerank_val:
        raise EvalError("--rerank-weights needs --rerank-val DIR, the validation split the weight is chosen on")
    rank, world, device = rank_world_device()
    ks, pool_ks = tuple(args.ks), tuple(args.pool_ks)
    gpu = gpu_available() and not args.cpu_index
    t0 = time.perf_counter()
    tokenizer, model, meta = load_dual_encoder(args.checkpoint, device=device)
    max_len = meta.get("max_text_len", 32)

    def encode(split):
        return encode_split(model, split, tokenizer, batch_size=args.batch_size, max_text_len=max_len,
                            device=device, progress=rank == 0, distributed=world > 1)

    split = load_eval_split(args.data)
    val = load_eval_split(args.rerank_val) if args.rerank_val else None  # a bad directory fails before any work
    text_emb, image_emb = encode(split)
    t_encode = time.perf_counter() - t0
    cap_img = split.caption_image
    curve_k = min(max(args.curve_k, *ks), split.num_images)
    # the search depth is not capped by the images: TR ranks captions, more of them than images
    # (topk_from_embeddings caps each direction by its own pool)
    depth = max(curve_k, *ks, args.rerank_top if args.rerank else 0)
    top = topk_from_embeddings(text_emb, image_emb, cap_img, depth, gpu=gpu, sharded=world > 1)

    full = None
    if args.pool:
        texts, images, owners = [text_emb], [image_emb], [cap_img]
        for d in args.pool:
            s = load_eval_split(d)
            t, i = encode(s)
            owners.append(s.caption_image + sum(len(x) for x in images))  # image rows follow the earlier ones
            texts.append(t)
            images.append(i)
        pool_cap_img = np.concatenate(owners)
        pool_top = topk_from_embeddings(np.concatenate(texts), np.concatenate(images), pool_cap_img, max(pool_ks),
                                        query_captions=np.arange(len(cap_img)),
                                        query_images=np.arange(split.num_images), gpu=gpu, sharded=world > 1)
        n_pool = sum(len(x) for x in images)
        full = {"pool": [str(args.data), *map(str, args.pool)], "num_images": n_pool,
                "num_captions": len(pool_cap_img), "ks": list(pool_ks),
                "recall": retrieval_recall(pool_top, pool_cap_img, pool_ks),
                "chance": chance_recall(pool_cap_img, n_pool, pool_ks, query_images=np.arange(split.num_images))}
    val_top = None
    if val is not None:  # every rank encodes and searches its slice, as above
        val_top = topk_from_embeddings(*encode(val), val.caption_image, max(args.rerank_top, *ks), gpu=gpu,
                                       sharded=world > 1)
    if rank != 0:
        return 0

    recall = (recall_from_embeddings(text_emb, image_emb, cap_img, ks, dense=True) if args.dense
              else retrieval_recall(top, cap_img, ks))
    chance = chance_recall(cap_img, split.num_images, ks)
    reranked = _rerank(args, split, top, ks, device, val, val_top) if args.rerank else None
    seconds = time.perf_counter() - t0

    table = format_table(recall, chance, ks)
    print(f"\nRecall on {args.data}: {split.num_images} images, {len(split.captions)} captions "
          f"(percent; TR = image->text, IR = text->image; {seconds:.1f} s, encoding {t_encode:.1f} s, "
          f"{world} rank{'s' if world > 1 else ''}, FAISS on {'GPU' if gpu else 'CPU'})\n")
    print(table)
    md = table + "\n"
    if full:
        full_table = format_table(full["recall"], full["chance"], pool_ks)
        print(f"\nFull setting: these queries against {full['num_images']} images and {full['num_captions']} "
              f"captions ({', '.join(full['pool'])})\n")
        print(full_table)
        md += f"\nFull setting ({full['num_images']} images, {full['num_captions']} captions):\n\n{full_table}\n"

    if reranked:  # the first stage's row, then the re-ranked ones beside it
        def row(values: dict, label: str) -> str:
            return format_table(values, None, ks).splitlines()[-1].replace("| model |", f"| {label} |")

        top_m, w = args.rerank_top, reranked["weight"]
        rows = [format_table(recall, None, ks).replace("| model |", "| first stage |")]
        if "recall_alone" in reranked:
            rows.append(row(reranked["recall_alone"], f"re-ranked top {top_m}, re-ranker alone"))
        rows.append(row(reranked["recall"], f"re-ranked top {top_m}" + (f", + {w:g} x first stage" if w else "")))
        rr_table = "\n".join(rows)
        print(f"\nAfter re-ranking each query's top {args.rerank_top} with {args.rerank} ({reranked['kind']}, "
              f"{reranked['seconds']:.1f} s):\n")
        print(rr_table)
        md += f"\nAfter re-ranking the top {args.rerank_top} with {args.rerank} ({reranked['kind']}):\n\n{rr_table}\n"

    out = Path(args.out) if args.out else Path(args.checkpoint) / "recall.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"data": str(args.data), "checkpoint": str(args.checkpoint), "num_images": split.num_images,
              "num_captions": len(split.captions), "ks": list(ks), "recall": recall, "chance": chance,
              "seconds": round(seconds, 3), "ranks": world, "faiss_gpu": gpu}
    if full:
        record["full"] = full
    if reranked:
        record["rerank"] = reranked
    out.write_text(json.dumps(record, indent=2))
    out.with_suffix(".md").write_text(md)
    written = [out, out.with_suffix(".md")]
    written += _figures(args, split, top, curve_k, out, model_name=Path(args.checkpoint).name)
    print("\nwritten: " + ", ".join(map(str, written)))

    run_file = Path(args.checkpoint) / RUN_FILE
    if not args.no_log and run_file.is_file():
        info = json.loads(run_file.read_text())
        tracker = Tracker.attach(info)
        step = int(meta.get("steps", 0))
        tracker.log_metrics({f"test/{k}": v for k, v in recall.items()}, step=step)
        tracker.log_metrics({f"test/chance_{k}": v for k, v in chance.items()}, step=step)
        if full:
            tracker.log_metrics({f"test/full_{k}": v for k, v in full["recall"].items()}, step=step)
        if reranked:
            tracker.log_metrics({f"test/rerank_{k}": v for k, v in reranked["recall"].items()}, step=step)
        tracker.flush()
        tracker.log_text(md, "recall/recall.md")
        for path in written:
            if path.suffix != ".md":
                tracker.log_artifact(path, "recall")
        uri = info["tracking_uri"]
        # records go out in the background: wait for them here, so they are in the run when we return
        sent = tracker.drain() if hasattr(tracker, "drain") else True
        print(f"recorded in MLflow run {info['run_id']} ({uri})" if sent else
              f"MLflow at {uri} did not answer; the records wait in the outbox (ldot eval sync sends them)")
        print(f"open the runs:  mlflow ui --backend-store-uri {uri}")
    return 0


def _rerank(args, split, top, ks, device, val, val_top) -> dict:
    """Recall after re-ranking each row's top M (both directions) with the re-ranker the export holds, at
    --rerank-weight or at the weight chosen on --rerank-val's split (val, val_top: its split and first-stage
    top k); where the weight is not 0, the re-ranker's order alone beside it."""
    from ldot.eval.image_store import ImageStore
    from ldot.eval.metrics import retrieval_recall
    from ldot.eval.rerank import (WEIGHT_GRID, CrossEncoderReranker, apply_rerank, choose_first_weight,
                                  load_reranker, rerank_scores)

    m, weight, choice = args.rerank_top, args.rerank_weight, None
    if val is not None:
        val_reranker = load_reranker(args.rerank, ImageStore(val.data_dir, val.keys), device=device)
        weights = args.rerank_weights or WEIGHT_GRID
        weight, sweep = choose_first_weight(val_top, rerank_scores(val_top, val.captions, val_reranker, m),
                                            val.caption_image, m, weights, ks)
        first_ar = retrieval_recall(val_top, val.caption_image, ks)["ar"]
        choice = {"data": str(args.rerank_val), "ar": {f"{w:g}": a for w, a in sweep.items()}, "first_stage_ar": first_ar}
        print(f"mixing weight chosen on {args.rerank_val}: {weight:g} (AR there by weight: "
              + ", ".join(f"{w:g}: {100 * a:.1f}" for w, a in sweep.items()) + f"; first stage alone: {100 * first_ar:.1f})")
    t = time.perf_counter()  # the test queries' re-ranking alone (the paper's Table 7 cost)
    reranker = load_reranker(args.rerank, ImageStore(split.data_dir, split.keys), device=device)
    new = rerank_scores(top, split.captions, reranker, m)
    kind = "cross-encoder" if isinstance(reranker, CrossEncoderReranker) else "dual-encoder"
    out = {"checkpoint": str(args.rerank), "kind": kind, "top": m, "weight": weight,
           "recall": retrieval_recall(apply_rerank(top, new, m, weight), split.caption_image, ks)}
    if weight != 0:  # what the mix adds, from the same scores
        out["recall_alone"] = retrieval_recall(apply_rerank(top, new, m, 0.0), split.caption_image, ks)
    if choice:
        out["weight_chosen_on"] = choice
    out["seconds"] = time.perf_counter() - t
    return out


def _figures(args, split, top, curve_k: int, out: Path, model_name: str) -> list[Path]:
    from ldot.eval.figures import plot_recall_curve, plot_topk_grid
    from ldot.eval.image_store import ImageStore
    from ldot.eval.metrics import chance_recall, recall_curve

    cap_img = split.caption_image
    curve = recall_curve(top, cap_img, curve_k)
    ch = chance_recall(cap_img, split.num_images, tuple(range(1, curve_k + 1)))
    chance = {"tr": [ch[f"tr_r{k}"] for k in curve["k"]], "ir": [ch[f"ir_r{k}"] for k in curve["k"]]}
    curve_png = plot_recall_curve(curve, out.with_name(out.stem + "_curve.png"), chance=chance,
                                  title=f"{model_name} on {Path(args.data).name}: {split.num_images} images, "
                                        f"{len(split.captions)} captions")
    paths = [curve_png]
    if args.figure_queries > 0:
        n_top = min(10, split.num_images)
        rows = pick_figure_queries(top.ir_ids, cap_img[top.ir_query], args.figure_queries)
        ids, scores = top.ir_ids[rows, :n_top], top.ir_scores[rows, :n_top]
        store = ImageStore(split.data_dir, split.keys)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        pictures = dict(zip(wanted, store.thumbnails(wanted)))
        kind = "thumbnails" if all(store.has_thumbnail(r) for r in wanted) else "feature-map pictures"
        grid = plot_topk_grid([split.captions[int(top.ir_query[r])] for r in rows], ids, scores,
                              [int(cap_img[top.ir_query[r]]) for r in rows], pictures,
                              out.with_name(out.stem + "_top10.png"),
                              labels={r: split.image_ids[r] for r in wanted},
                              title=f"Top {n_top} images per query ({kind}); ground truth framed in green")
        paths.append(grid)
    return paths
