"""UNITER/LightningDOT databases → shards: a txt_db (the captions) joined to one or more img_dbs (the regions).

A txt_db (UNITER's prepro.py, e.g. ``itm_coco_test_base-cased.db``) is an LMDB of lz4-frame-compressed
msgpack examples keyed by caption id, each naming its image's features as ``img_fname``
(``coco_val2014_000000391895.npz``) and holding ``input_ids`` (WordPiece ids, no [CLS]/[SEP]) and, for
the retrieval dbs, the caption's ``raw`` text; beside it ``txt2img.json`` (caption id → img_fname),
``img2txts.json``, ``id2len.json`` and ``meta.json`` (the tokenizer it used, its [CLS]/[SEP] ids and
v_range). One sample per image: its captions in txt2img order, their raw text (or their input_ids
decoded with the tokenizer the user names when no text is stored), the caption ids kept as
``caption_ids``, the image named by its img_fname without ``.npz``. Regions come from the img_db that
holds the img_fname (see lmdb.ImgDb).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from ldot.data.convert.captions import CaptionRecord, normalize_caption
from ldot.data.convert.lmdb import ImgDb, ImgDbFeatures
from ldot.data.errors import DataError
from ldot.data.reader import ErrorPolicy

TEXT_FIELDS = ("raw", "caption", "sent", "sentence")  # where UNITER's prepro variants keep the text


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise DataError(f"unreadable JSON ({exn})", shard=str(path), reason="invalid_json") from None


class TxtDb:
    """A UNITER txt_db directory, read as its TxtLmdb/TxtTokLmdb read it."""

    def __init__(self, path: str | Path):
        import lmdb

        self.dir = Path(path)
        if not (self.dir / "data.mdb").is_file():
            raise DataError("not a txt_db (no data.mdb: give the .db directory UNITER's prepro.py wrote)",
                            shard=str(self.dir), reason="missing_member")
        self.meta = _read_json(self.dir / "meta.json") if (self.dir / "meta.json").is_file() else {}
        self.env = lmdb.open(str(self.dir), readonly=True, lock=False, readahead=False)
        self.txn = self.env.begin()

    def example(self, key: str) -> dict:
        import lz4.frame
        import msgpack

        raw = self.txn.get(key.encode())
        if raw is None:
            raise DataError("caption id is in txt2img.json but not in the LMDB", shard=str(self.dir), key=key,
                            reason="missing_member")
        try:
            data = lz4.frame.decompress(raw)
        except RuntimeError as exn:  # lz4's error type for a corrupt frame
            raise DataError(f"value is not an lz4 frame ({exn})", shard=str(self.dir), key=key,
                            reason="undecodable") from None
        try:
            ex = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exn:  # msgpack raises several types; all mean this value is broken
            raise DataError(f"value is not msgpack ({type(exn).__name__}: {exn})", shard=str(self.dir), key=key,
                            reason="undecodable") from None
        if not isinstance(ex, dict):
            raise DataError(f"value is a {type(ex).__name__}, not an example map", shard=str(self.dir), key=key,
                            reason="undecodable")
        return ex

    def groups(self) -> dict[str, list[str]]:
        """img_fname → caption ids, in the db's order (txt2img.json, else img2txts.json)."""
        if (self.dir / "txt2img.json").is_file():
            txt2img = _read_json(self.dir / "txt2img.json")
            groups: dict[str, list[str]] = {}
            for txt_id, fname in txt2img.items():
                if not isinstance(fname, str):
                    raise DataError(f"txt2img.json names {fname!r} for caption {txt_id}: one image per caption is "
                                    "what a retrieval db has (NLVR2-style pairs are not captions)",
                                    shard=str(self.dir / "txt2img.json"), reason="invalid_json")
                groups.setdefault(fname, []).append(str(txt_id))
            return groups
        if (self.dir / "img2txts.json").is_file():
            return {k: [str(x) for x in v] for k, v in _read_json(self.dir / "img2txts.json").items()}
        raise DataError("has neither txt2img.json nor img2txts.json", shard=str(self.dir), reason="missing_member")

    def close(self) -> None:
        self.txn.abort()
        self.env.close()


def wordpiece_decoder(path: str | Path, meta: dict):
    """ids → text with the vocabulary the user names (a vocab file or tokenizer directory); checked against
    meta.json's v_range, whose end is the vocabulary size the db was tokenized with."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    from ldot.vocab import is_cased, read_vocab, vocab_source

    try:
        kind, p = vocab_source(path)
    except FileNotFoundError as exn:
        raise DataError(f"--tokenizer {exn}") from None
    if kind == "dir" and (p / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(p / "tokenizer.json"))
    else:
        vocab = p / "vocab.txt" if kind == "dir" else p
        tok = BertWordPieceTokenizer(str(vocab), lowercase=not is_cased(read_vocab(vocab)))
    size = tok.get_vocab_size()
    v_range = meta.get("v_range")
    if isinstance(v_range, list) and len(v_range) == 2 and v_range[1] != size:
        named = meta.get("bert") or meta.get("toker") or meta.get("tokenizer") or "its tokenizer"
        raise DataError(f"--tokenizer {path}: {size} tokens, but the txt_db was tokenized with {named} "
                        f"({v_range[1]} tokens, meta.json v_range)")
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def default_split(txt_db: str | Path) -> str:
    """itm_coco_test_base-cased.db → test; anything else: the directory's name without .db."""
    name = Path(txt_db).name
    m = re.match(r"itm_[a-z0-9]+_([a-z]+)_", name)
    return m[1] if m else name.removesuffix(".db")


def read_txt_db(txt_db: TxtDb, dbs: list[ImgDb], *, split: str, tokenizer: str | None,
                policy: ErrorPolicy) -> list[CaptionRecord]:
    """One record per image of the txt_db, its captions in the db's order; images no img_db holds and
    undecodable examples go to the policy (counted per image and per caption)."""
    decode = None
    records = []
    for fname, ids in txt_db.groups().items():
        if not any(fname in db for db in dbs):
            policy(DataError(f"image of {len(ids)} caption(s) ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}) "
                             f"is in no img_db ({', '.join(db.path for db in dbs)})", shard=str(txt_db.dir),
                             key=fname, reason="missing_image"))
            continue
        caps, kept = [], []
        for txt_id in ids:
            try:
                ex = txt_db.example(txt_id)
                text = next((ex[f] for f in TEXT_FIELDS if isinstance(ex.get(f), str) and ex[f].strip()), None)
                if text is None:
                    if not isinstance(ex.get("input_ids"), list):
                        raise DataError("example has no text and no input_ids", shard=str(txt_db.dir), key=txt_id,
                                        reason="empty_caption")
                    if decode is None:
                        if not tokenizer:
                            raise DataError(f"examples hold input_ids but no text: give --tokenizer (the vocab of "
                                            f"{txt_db.meta.get('bert') or txt_db.meta.get('toker') or 'the tokenizer'}"
                                            " named in meta.json)", shard=str(txt_db.dir), key=txt_id)
                        decode = wordpiece_decoder(tokenizer, txt_db.meta)
                    text = decode(ex["input_ids"])
                text = normalize_caption(text)
                if not text:
                    raise DataError("empty caption", shard=str(txt_db.dir), key=txt_id, reason="empty_caption")
            except DataError as err:
                policy(err)
                continue
            caps.append(text)
            kept.append(txt_id)
        if caps:
            records.append(CaptionRecord(fname.removesuffix(".npz"), fname, caps, split, len(records),
                                         extra={"caption_ids": kept}))
    return records


def uniter_features(dbs: list[ImgDb]) -> ImgDbFeatures:
    """Each record's regions under its img_fname, from whichever img_db holds it."""
    return ImgDbFeatures(dbs, lambda r: [r.filename], "uniter:" + ",".join(Path(d.path).parent.name for d in dbs))


def open_img_dbs(paths, args) -> list[ImgDb]:
    return [ImgDb(p, conf_th=args.conf_th, max_bb=args.max_bb, min_bb=args.min_bb, num_bb=args.num_bb,
                  compressed=True if args.compressed else None, keep_cls=not args.no_cls) for p in paths]
