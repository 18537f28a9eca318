"""`ldot eval mine`: hard negatives of a dataset under an exported dual encoder, for re-ranker training.

Encodes the split, searches it exactly both ways (FAISS, as `recall` does) and writes, per caption, the
K images ranked highest that are not its own, and per image, the K captions of other images ranked
highest: ``txt2img.jsonl`` and ``img2txt.jsonl`` in --out, with a ``mine.json`` summary. Under
torchrun every rank encodes and searches a slice. Near-duplicate images in a dataset make some mined
"negatives" true matches; the summary's score gap says how close the hardest ones come. --exclude-same-text
drops those that are matches by the words alone: an image holding a caption of the query's very text, a
caption whose text the query image holds (generic captions recur across images; the summary counts them).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("mine", help="Hard negatives (top-ranked non-matches, both directions) for re-ranker training")
    p.add_argument("--checkpoint", required=True, help="exported encoders (e.g. <output_dir>/checkpoints/final)")
    p.add_argument("--data", required=True, help="dataset directory (shards + manifest.json), usually the train split")
    p.add_argument("--out", required=True, help="directory for txt2img.jsonl, img2txt.jsonl and mine.json")
    p.add_argument("--k", type=int, default=20, help="negatives per query (the paper re-ranks the top 20 or 50)")
    p.add_argument("--exclude-same-text", action="store_true",
                   help="never mine an image that holds a caption of the query's text, nor a caption whose text "
                        "the query image holds (case and spacing aside)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cpu-index", action="store_true", help="keep FAISS on the CPU even with faiss-gpu and CUDA")
    p.set_defaults(func=run)


def run(args) -> int:
    from ldot.data.loader import load_eval_split
    from ldot.eval.errors import EvalError
    from ldot.eval.hard_negatives import (mine, positive_ranks, same_text_fractions, shared_texts, skip_depth,
                                          text_keys, write_jsonl)
    from ldot.eval.index import gpu_available
    from ldot.eval.recall import encode_split, topk_from_embeddings
    from ldot.eval.recall_cmd import rank_world_device
    from ldot.model import load_dual_encoder

    if args.k < 1:
        raise EvalError(f"--k must be positive, not {args.k}")
    rank, world, device = rank_world_device()
    t0 = time.perf_counter()
    tokenizer, model, meta = load_dual_encoder(args.checkpoint, device=device)
    split = load_eval_split(args.data)
    if split.num_images < 2:
        raise EvalError(f"{args.data}: {split.num_images} image(s); mining needs at least two")
    text_emb, image_emb = encode_split(model, split, tokenizer, batch_size=args.batch_size,
                                       max_text_len=meta.get("max_text_len", 32), device=device,
                                       progress=rank == 0, distributed=world > 1)
    texts = text_keys(split.captions) if args.exclude_same_text else None
    # deep enough that k negatives remain after a row's matches (its own image's, and by text) are passed over
    depth = args.k + (skip_depth(split.caption_image, np.arange(split.num_images), texts) if texts is not None else 0)
    top = topk_from_embeddings(text_emb, image_emb, split.caption_image, depth,
                               gpu=gpu_available() and not args.cpu_index, sharded=world > 1)
    if rank != 0:
        return 0
    mined = mine(top, split.caption_image, args.k, text_key=texts)
    files = write_jsonl(args.out, split, mined)

    # How hard: where each caption's own image ranks, and how the hardest negative scores against it.
    ranks = positive_ranks(top, split.caption_image)
    own = np.einsum("ij,ij->i", text_emb, image_emb[split.caption_image])
    hardest = mined["txt2img_scores"][:, 0]
    said_t2i, said_i2t = same_text_fractions(mined, texts if texts is not None else text_keys(split.captions),
                                             split.caption_image)
    summary = {"checkpoint": str(args.checkpoint), "data": str(args.data), "k": args.k,
               "num_images": split.num_images, "num_captions": len(split.captions),
               "captions_whose_image_ranks_first": round(float(np.mean(ranks == 1)), 4),
               "captions_with_a_negative_above_their_image": round(float(np.mean(hardest > own)), 4),
               "mean_gap_own_minus_hardest": round(float(np.nanmean(own - hardest)), 5),
               "exclude_same_text": args.exclude_same_text,
               "captions_sharing_their_text_with_another_image":
                   None if texts is None else int(shared_texts(texts, split.caption_image).sum()),
               # matches by the words alone among what was mined: what --exclude-same-text would drop
               "txt2img_negatives_holding_the_query_text": round(said_t2i, 4),
               "img2txt_negatives_saying_an_own_caption": round(said_i2t, 4),
               "files": [str(f) for f in files], "seconds": round(time.perf_counter() - t0, 2)}
    summary_path = Path(args.out) / "mine.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"mined {args.k} hard negatives per caption ({len(split.captions)}) and per image ({split.num_images}) "
          f"of {args.data} in {summary['seconds']:.1f} s; "
          f"{100 * summary['captions_with_a_negative_above_their_image']:.1f}% of captions rank a negative above "
          f"their own image")
    if not args.exclude_same_text and said_t2i + said_i2t > 0:
        print(f"{100 * said_t2i:.1f}% of the caption negatives hold the caption's very text, {100 * said_i2t:.1f}% of "
              "the image negatives say one of the image's own captions: matches by the words alone "
              "(--exclude-same-text leaves them out)")
    print("written: " + ", ".join(map(str, [*files, summary_path])))
    return 0
