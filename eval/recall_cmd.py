"""`python -m eval recall`: the recall table of an exported dual encoder on a dataset directory."""
from __future__ import annotations

import json
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("recall", help="Recall@K of an exported dual encoder on a dataset directory")
    p.add_argument("--checkpoint", required=True, help="exported encoders (e.g. <output_dir>/checkpoints/final)")
    p.add_argument("--data", required=True, help="dataset directory (shards + manifest.json)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", help="recall JSON path (default: CHECKPOINT/recall.json; a .md beside it)")
    p.add_argument("--no-log", action="store_true", help="do not record in the checkpoint's MLflow run")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from data.loader import load_eval_split
    from eval.metrics import chance_recall, format_table
    from eval.recall import evaluate_split
    from train.model import load_dual_encoder
    from train.tracking import RUN_FILE, Tracker

    ks = tuple(args.ks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    tokenizer, model, meta = load_dual_encoder(args.checkpoint, device=device)
    split = load_eval_split(args.data)
    recall = evaluate_split(model, split, tokenizer, ks=ks, batch_size=args.batch_size,
                            max_text_len=meta.get("max_text_len", 32), device=device)
    chance = chance_recall(split.caption_image, split.num_images, ks)
    seconds = time.perf_counter() - t0

    table = format_table(recall, chance, ks)
    print(f"\nRecall on {args.data}: {split.num_images} images, {len(split.captions)} captions "
          f"(percent; TR = image->text, IR = text->image; {seconds:.1f} s)\n")
    print(table)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "recall.json"
    out.write_text(json.dumps({"data": str(args.data), "num_images": split.num_images,
                               "num_captions": len(split.captions), "recall": recall, "chance": chance},
                              indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwritten: {out} and {out.with_suffix('.md')}")

    run_file = Path(args.checkpoint) / RUN_FILE
    if not args.no_log and run_file.is_file():
        info = json.loads(run_file.read_text())
        tracker = Tracker.attach(info)
        tracker.log_metrics({f"test/{k}": v for k, v in recall.items()}, step=int(meta.get("steps", 0)))
        tracker.log_metrics({f"test/chance_{k}": v for k, v in chance.items()}, step=int(meta.get("steps", 0)))
        tracker.flush()
        tracker.log_text(table + "\n", "recall/recall.md")
        tracker.log_artifact(out, "recall")
        uri = info["tracking_uri"]
        print(f"recorded in MLflow run {info['run_id']} ({uri})")
        print(f"open the runs:  mlflow ui --backend-store-uri {uri}")
    return 0
