"""`ldot data convert --format FMT`: the formats users hold → validated shards (one module per format)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldot.data.errors import DataError
from ldot.data.reader import POLICIES, ErrorPolicy

FORMATS = ("precomp", "karpathy", "multi30k", "flickr8k", "lmdb", "images", "uniter")
CAPTION_FORMATS = ("multi30k", "flickr8k", "karpathy")


def add_convert_parser(sub, func) -> None:
    p = sub.add_parser("convert", help="convert captions + features (or raw images) into shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--split", default="", help="the split label of the manifest and samples (default: from the "
                   "input); precomp: also the file prefix, SPLIT_caps.txt and SPLIT_ims.npy")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--on-error", default="error", choices=POLICIES, help="bad input: stop, or skip and count")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset (or unfinished conversion) in --out")
    p.add_argument("--source", default="", help="the samples' 'source' field (default: the format)")

    g = p.add_argument_group("captions (multi30k, flickr8k, karpathy; for lmdb and images via --captions-format)")
    g.add_argument("--captions-format", choices=CAPTION_FORMATS, help="lmdb/images: where the captions come from")
    g.add_argument("--prefix", help="multi30k: DIR/SPLIT, for DIR/SPLIT_images.txt and DIR/SPLIT.{1..5}.LANG[.gz]")
    g.add_argument("--lang", default="en", help="multi30k caption language")
    g.add_argument("--images-list", help="multi30k: the image list (instead of --prefix)")
    g.add_argument("--caption-files", nargs="+", help="multi30k: caption files, line i ↔ image i")
    g.add_argument("--token-file", help="flickr8k: Flickr8k.token.txt[.gz]")
    g.add_argument("--split-list", help="flickr8k: Flickr_8k.{train,dev,test}Images.txt")
    g.add_argument("--karpathy-json", help="karpathy: dataset_{coco,flickr30k,flickr8k}.json")
    g.add_argument("--karpathy-split", default="", help="karpathy: splits to keep, comma separated (e.g. test)")
    g.add_argument("--precomp-dir", help="precomp: the folder holding SPLIT_caps.txt, SPLIT_ims.npy [, SPLIT_ids.txt]")

    g = p.add_argument_group("features")
    g.add_argument("--features", choices=("images", "precomp", "lmdb"), default="images",
                   help="caption formats: where the features come from")
    g.add_argument("--image-dir", help="features=images: folder the caption files' image names are in")
    g.add_argument("--ims", help="features=precomp: an [N, R, D] .npy aligned with the caption records")
    g.add_argument("--boxes", help="precomp: optional [N, R, 4+] .npy of normalized boxes")
    g.add_argument("--lmdb", action="append", help="lmdb: a UNITER img_db directory (img_db/coco_val2014) or the "
                   "LMDB inside it; repeat for images split over several (Karpathy's COCO train: train2014 and val2014)")
    g.add_argument("--lmdb-key", default="auto", help="lmdb key template over {image_id} {filename} {stem}; auto: "
                   "STEM.npz, stem.npz, or UNITER's name (coco_val2014_%%012d.npz, flickr30k_%%012d.npz)")
    g.add_argument("--conf-th", type=float, default=0.2, help="lmdb/uniter: detector confidence threshold (-1: "
                   "--num-bb regions each); picks the img_db's feat_th{conf}_max{max}_min{min} LMDB and nbb json")
    g.add_argument("--min-bb", type=int, default=10, help="lmdb/uniter: fewest regions kept")
    g.add_argument("--max-bb", type=int, default=100, help="lmdb/uniter: most regions kept")
    g.add_argument("--num-bb", type=int, default=36, help="lmdb/uniter with --conf-th -1: regions per image")
    g.add_argument("--compressed", action="store_true", help="lmdb/uniter: read the img_db's _compressed (npz) "
                   "LMDB (default: the plain one, else the compressed one)")
    g.add_argument("--no-cls", action="store_true", help="lmdb/uniter: leave out the soft labels (kept whenever "
                   "the img_db has them)")
    g = p.add_argument_group("uniter (UNITER/LightningDOT databases)")
    g.add_argument("--img-db", action="append", help="an img_db directory as UNITER's loader takes it "
                   "(img_db/coco_val2014); repeat for captions over several")
    g.add_argument("--txt-db", help="a txt_db directory (itm_coco_test_base-cased.db)")
    g.add_argument("--tokenizer", help="the txt_db's vocab file or tokenizer directory, to decode input_ids when the "
                   "examples hold no text")
    g.add_argument("--input", help="images: a folder of images (captions in NAME.txt) or img2dataset shards")
    g.add_argument("--backbone", default="efficientnet-lite0", help="images: efficientnet-lite0 or hf:PATH")
    g.add_argument("--with-cls", action="store_true", help="images: store the backbone's class distributions")
    g.add_argument("--batch-size", type=int, default=8, help="images: backbone batch size")
    g.add_argument("--device", default="cpu", help="images: torch device of the backbone")
    p.set_defaults(func=func)


def _need(args, *names):
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise DataError(f"--format {args.format} needs {' and '.join(missing)}")


def read_captions(fmt: str, args, policy: ErrorPolicy):
    from ldot.data.convert import captions

    if fmt == "multi30k":
        if args.prefix:
            images_list, files = captions.multi30k_files(args.prefix, args.lang)
        else:
            _need(args, "images_list", "caption_files")
            images_list, files = args.images_list, args.caption_files
        return captions.read_multi30k(images_list, files, split=args.split, policy=policy)
    if fmt == "flickr8k":
        _need(args, "token_file")
        return captions.read_flickr8k(args.token_file, split_list=args.split_list, split=args.split, policy=policy)
    _need(args, "karpathy_json")
    return captions.read_karpathy(args.karpathy_json, splits=args.karpathy_split, policy=policy)


def _backbone(args):
    from ldot.data.features import make_backbone

    try:
        return make_backbone(args.backbone, with_cls=args.with_cls, batch_size=args.batch_size, device=args.device)
    except (ValueError, OSError) as exn:
        raise DataError(f"backbone {args.backbone}: {exn}") from None


def _lmdb(args):
    from ldot.data.convert.lmdb import LmdbFeatures

    _need(args, "lmdb")
    return LmdbFeatures(args.lmdb, key_format=args.lmdb_key, conf_th=args.conf_th, min_bb=args.min_bb,
                        max_bb=args.max_bb, num_bb=args.num_bb, compressed=True if args.compressed else None,
                        keep_cls=not args.no_cls)


def _uniter(args, policy: ErrorPolicy):
    from ldot.data.convert import uniter

    _need(args, "img_db", "txt_db")
    dbs = uniter.open_img_dbs(args.img_db, args)
    try:
        txt_db = uniter.TxtDb(args.txt_db)
        try:
            records = uniter.read_txt_db(txt_db, dbs, split=args.split or uniter.default_split(args.txt_db),
                                         tokenizer=args.tokenizer, policy=policy)
        finally:
            txt_db.close()
        if not records:
            raise DataError(f"no captions of {args.txt_db} have their image in {', '.join(args.img_db)}")
        return uniter.uniter_features(dbs), records
    except BaseException:
        for db in dbs:
            db.close()
        raise


def build(args, policy: ErrorPolicy):
    """(source, items, split, total) for the requested format."""
    from ldot.data.convert import images, precomp
    from ldot.data.convert.join import numbered

    fmt = args.format
    if fmt == "precomp":
        _need(args, "precomp_dir", "split")
        caps, ims, ids = precomp.precomp_files(args.precomp_dir, args.split)
        records, n_images = precomp.read_precomp_captions(caps, split=args.split, ids_file=ids, policy=policy)
        source = precomp.PrecompFeatures(ims, num_images=n_images, boxes=args.boxes)
        return source, numbered(records), records
    if fmt == "images":
        _need(args, "input")
        backbone = _backbone(args)
        if args.captions_format:
            records = read_captions(args.captions_format, args, policy)
            pairs = images.captioned_folder_items(args.input, records)
        elif Path(args.input).is_dir() and not images.shard_list(args.input):
            records, pairs = None, images.folder_items(args.input, split=args.split or "all", policy=policy)
        else:
            records, pairs = None, images.img2dataset_items(args.input, split=args.split or "all", policy=policy)
        return images.ImageFeatures(backbone), numbered(pairs), records
    if fmt == "uniter":
        source, records = _uniter(args, policy)
        return source, numbered(records), records
    if fmt == "lmdb":
        _need(args, "captions_format")
        records = read_captions(args.captions_format, args, policy)
        return _lmdb(args), numbered(records), records
    records = read_captions(fmt, args, policy)
    if args.features == "images":
        _need(args, "image_dir")
        source = images.ImageFeatures(_backbone(args))
        return source, numbered(images.record_items(args.image_dir, records)), records
    if args.features == "precomp":
        _need(args, "ims")
        return precomp.PrecompFeatures(args.ims, num_images=len(records), boxes=args.boxes), numbered(records), records
    return _lmdb(args), numbered(records), records


def run_convert(args) -> int:
    from ldot.data.convert.join import convert

    policy = ErrorPolicy(args.on_error)
    source, items, records = build(args, policy)
    split = args.split or (",".join(sorted({r.split for r in records})) if records else "all")
    fingerprint = json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in ("func", "overwrite")},
                             default=str)
    total = len(records) if records is not None and not (args.format == "images" and args.captions_format) else None
    try:
        m = convert(items, source, args.out, split=split, source_name=args.source or args.format, policy=policy,
                    shard_size=args.shard_size, overwrite=args.overwrite, fingerprint=fingerprint, limit=args.limit,
                    total=total)
    finally:
        if hasattr(source, "close"):
            source.close()  # the LMDB sources' environments: a process may open the same one again
    skipped = f", skipped {m.extra['skipped']}" if m.extra.get("skipped") else ""
    print(f"convert {args.format}: {m.num_samples} images, {m.num_captions} captions in {len(m.shards)} shards "
          f"→ {args.out} (feature dim {m.feature_dim}, class dim {m.class_dim}){skipped}")
    return 0
