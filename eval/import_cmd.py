"""`ldot eval import CKPT --out DIR --tokenizer VOCAB_OR_DIR`: a released LightningDOT checkpoint
(LightningDot.pt, coco-ft.pt, flickr-ft.pt) as an export directory that recall, index, search, mine and
model.init_from take. The conversion itself is the model library's (ldot.model.lightningdot)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="turn a released LightningDOT checkpoint into an export directory")
    p.add_argument("checkpoint", help="LightningDot.pt (pretrained) or coco-ft.pt / flickr-ft.pt (fine-tuned)")
    p.add_argument("--out", required=True, help="the export directory to write")
    p.add_argument("--tokenizer", required=True,
                   help="the text encoder's vocab file or tokenizer directory (bert-base-cased for the released "
                        "files; the checkpoints carry none)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (not in a state dict; default hidden/64: 12 for base, 16 for large)")
    p.add_argument("--max-text-len", type=int, default=60, help="tokens per caption at encoding (the original's 60)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ldot.eval.errors import EvalError
    from ldot.model import EXPORT_META
    from ldot.model.lightningdot import import_lightningdot

    out = Path(args.out)
    if (out / EXPORT_META).exists() and not args.overwrite:
        raise EvalError(f"{out}: already holds an export ({EXPORT_META}); pass --overwrite to replace it")
    info = import_lightningdot(args.checkpoint, out, args.tokenizer, num_heads=args.num_heads,
                               max_text_len=args.max_text_len)
    print(f"import: {args.checkpoint} ({info['layout']}, {info['dtype']}) → {out}: text {info['text_layers']} "
          f"layers, image {info['image_layers']} layers, hidden {info['hidden']}, {info['heads']} heads, "
          f"{info['feature_dim']}-d regions, embeddings {info['embed_dim']}-d")
    return 0
